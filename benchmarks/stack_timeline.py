"""Where a process's main thread spent its start-up, from ``benchmarks/stack_sampler`` samples.

    python3 benchmarks/stack_timeline.py DIR [--bucket 0.5] [--top 25]

For each process that wrote samples: a line per ``bucket`` seconds with the main thread's most frequent state (the
modules being imported, or the innermost frame of the project and the innermost frame overall), then the states
that took the most time in all. Times are wall clock, so the driver's and the actors' lines line up.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

OURS = ("/actors/", "/orchestrator/", "/placement/")


def state(rec: dict) -> str:
    mods = rec.get("mods") or []
    main = rec.get("main") or []
    if len(mods) > 1:  # importing (mods[0] is the script or the worker's main module)
        chain = [m for m in mods[1:] if m != "__main__"]
        return "import " + " > ".join(chain[:1] + chain[-2:] if len(chain) > 3 else chain)
    inner = main[-1] if main else "?"
    own = next((f for f in reversed(main) if any(o in f for o in OURS)), None)
    short = lambda f: os.path.basename(f.split(" ")[0]) + " " + f.split(" ", 1)[-1]  # noqa: E731
    return (short(own) + " | " if own else "") + short(inner)


def coarse(rec: dict) -> str:
    """The state by package: which top-level package is being imported, or the project's innermost frame."""
    mods = [m for m in (rec.get("mods") or [])[1:] if m != "__main__"]
    if mods:
        inner_pkgs = [m.split(".")[0] for m in mods]
        return f"import {inner_pkgs[0]} (in it: {inner_pkgs[-1]})"
    main = rec.get("main") or []
    own = next((f for f in reversed(main) if any(o in f for o in OURS)), None)
    return (os.path.basename(own.split(" ")[0]) + " " + own.split(" ", 1)[-1]) if own else "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir")
    p.add_argument("--bucket", type=float, default=0.5)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    for f in sorted(Path(args.dir).glob("*.jsonl")):
        recs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if not recs:
            continue
        t0 = recs[0]["t"]
        print(f"== pid {f.stem}: {len(recs)} samples, {time.strftime('%H:%M:%S', time.gmtime(t0))} "
              f"+{recs[-1]['t'] - t0:.1f}s")
        buckets: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        total: collections.Counter = collections.Counter()
        by_pkg: collections.Counter = collections.Counter()
        prev_t = None
        for r in recs:
            s = state(r)
            buckets[int((r["t"] - t0) / args.bucket)][s] += 1
            dt = (r["t"] - prev_t) if prev_t is not None else 0.0
            total[s] += dt
            by_pkg[coarse(r)] += dt
            prev_t = r["t"]
        last = None
        for b in sorted(buckets):
            top = buckets[b].most_common(1)[0][0]
            at = t0 + b * args.bucket
            stamp = f"{time.strftime('%H:%M:%S', time.gmtime(at))}.{int(at % 1 * 10)}"
            line = f"{stamp} +{b * args.bucket:6.1f}s  {top[:150]}"
            if top != last:
                print(line)
            last = top
        print("-- most time, by package imported or project frame:")
        for s, secs in by_pkg.most_common(args.top):
            print(f"{secs:7.2f}s  {s[:160]}")
        print("-- most time:")
        for s, secs in total.most_common(args.top):
            print(f"{secs:7.2f}s  {s[:160]}")


if __name__ == "__main__":
    main()
