"""A start-up profiler for every Python process of a run (the driver, Ray's workers, the replica actors): put this
folder on PYTHONPATH and set ZIMAGE_STACK_SAMPLES=DIR. Each process samples its threads' stacks every 25 ms from a
daemon thread and appends them to DIR/<pid>.jsonl once it is one of ours (it has imported ``orchestrator.cli`` or
``actors.worker``); other processes keep at most their last 2,000 samples in memory and write nothing.

One line per sample: {"t": wall time, "main": [frames, outermost first, "file:line function"], "mods": [the modules
being imported, outermost first], "threads": {name: innermost frames}}. ``benchmarks/stack_timeline.py`` turns them
into a timeline. A probe only: nothing in the project imports it.
"""

import json
import os
import sys
import threading
import time

_DIR = os.environ.get("ZIMAGE_STACK_SAMPLES")


def _frames(frame, limit):
    out = []
    while frame is not None and len(out) < limit:
        code = frame.f_code
        out.append(f"{code.co_filename}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return out[::-1]


def _imports(frame):
    mods = []
    while frame is not None:
        if frame.f_code.co_name == "<module>":
            mods.append(frame.f_globals.get("__name__", "?"))
        frame = frame.f_back
    return mods[::-1]


def _sample_forever():
    main_id = threading.main_thread().ident
    me = threading.get_ident()
    buf = []
    path = os.path.join(_DIR, f"{os.getpid()}.jsonl")
    last_flush = time.time()
    while True:
        time.sleep(0.025)
        try:
            frames = sys._current_frames()
            names = {t.ident: t.name for t in threading.enumerate()}
            main = frames.get(main_id)
            rec = {"t": round(time.time(), 3), "main": _frames(main, 60), "mods": _imports(main),
                   "threads": {names.get(i, str(i)): _frames(f, 4)[::-1] for i, f in frames.items()
                               if i not in (main_id, me)}}
            buf.append(rec)
            del frames, main
        except Exception:  # noqa: BLE001 - a probe never breaks the process
            continue
        ours = "orchestrator.cli" in sys.modules or "actors.worker" in sys.modules
        if not ours:
            del buf[:-2000]
            continue
        if time.time() - last_flush > 1.0:
            with open(path, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in buf))
            buf.clear()
            last_flush = time.time()


if _DIR:
    os.makedirs(_DIR, exist_ok=True)
    threading.Thread(target=_sample_forever, name="stack-sampler", daemon=True).start()
