"""``zimage-orch bench --matrix benchmarks/matrix.yaml --run NAME``: the project's GPU runs, defined once.

Each entry is a ``zimage-orch bench`` argument list (``bench:``) or a probe script with its arguments
(``script:``), with the machine it needs and a time limit; groups name the entries of one device call. Entries run
one after another, each in its own process, writing ``OUT/NAME/bench.json`` (or the script's JSON) and
``OUT/NAME.log``, one summary line each. ``{out}`` in an entry's arguments is its output folder; ``ZIMAGE_COMMIT``
passes through to the reports.

    zimage-orch bench --matrix benchmarks/matrix.yaml --list
    zimage-orch bench --matrix benchmarks/matrix.yaml --run traffic --out /tmp/out      # a group
    zimage-orch bench --matrix benchmarks/matrix.yaml --run fp8-traffic,http-traffic --lanes 2   # side by side

``--lanes N`` runs one-GPU entries side by side on N GPUs (``CUDA_VISIBLE_DEVICES``), longest time limit first onto
the lane with the least time so far: each entry has a GPU to itself, and what lanes share (the host) is recorded."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Entry:
    name: str
    bench: str | None
    script: str | None
    machine: str
    timeout_s: float
    note: str = ""


def load_matrix(path: str | Path) -> tuple[dict[str, Entry], dict[str, list[str]]]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a matrix is a mapping with 'runs' (and 'groups'), got {type(data).__name__}")
    runs, groups = data.get("runs") or {}, data.get("groups") or {}
    if not isinstance(runs, dict) or not isinstance(groups, dict):
        raise ValueError(f"{path}: 'runs' and 'groups' are mappings (name: run, name: [runs])")
    entries: dict[str, Entry] = {}
    for name, e in runs.items():
        if not isinstance(e, dict) or bool(e.get("bench")) == bool(e.get("script")):
            raise ValueError(f"{path}: runs.{name}: give exactly one of 'bench' (zimage-orch bench arguments) or "
                             f"'script' (a probe script and its arguments)")
        try:
            if not isinstance(e.get("bench") or e.get("script"), str):
                raise ValueError("'bench' / 'script' is one string of arguments")
            shlex.split(e.get("bench") or e.get("script"))
            timeout_s = float(e.get("timeout_s", 600))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: runs.{name}: {err} (its command, or timeout_s: seconds)") from None
        entries[name] = Entry(name, e.get("bench"), e.get("script"), str(e.get("machine", "nvidia-h100-x1")),
                              timeout_s, str(e.get("note", "")))
    for g, names in groups.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path}: groups.{g}: a list of run names")
    groups = {k: list(v) for k, v in groups.items()}
    for g, names in groups.items():
        unknown = [n for n in names if n not in entries]
        if unknown:
            raise ValueError(f"{path}: groups.{g}: unknown run(s) {unknown}")
    return entries, groups


def select(entries: dict[str, Entry], groups: dict[str, list[str]], spec: str) -> list[Entry]:
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in groups:
            names += groups[item]
        elif item in entries:
            names.append(item)
        else:
            raise ValueError(f"--run: {item!r} is neither a run nor a group of the matrix; "
                             f"see --list")
    if not names:
        raise ValueError(f"--run {spec!r}: names no run; see --list")
    return [entries[n] for n in dict.fromkeys(names)]


def command(entry: Entry, out: Path) -> list[str]:
    args = shlex.split((entry.bench or entry.script).replace("{out}", str(out)))
    if entry.bench:
        return [sys.executable, "-m", "orchestrator.cli", "bench", *args, "--label", entry.name, "--out", str(out)]
    return [sys.executable, *args]


def summary_line(entry: Entry, out: Path, rc: int, seconds: float) -> str:
    head = f"{entry.name:28s} rc={rc:<4d} {seconds:6.0f}s"
    report = out / "bench.json"
    if not report.exists():
        return head + "  (no bench.json)" if entry.bench else head
    r = json.loads(report.read_text())
    runs = "; ".join(f"{x['label']} {x['throughput_img_s']:.3f} img/s {x.get('megapixels_s', 0):.3f} MP/s "
                     f"p95 {x['latency_p95_s']:.2f}s" for x in r.get("runs", []))
    return f"{head}  {r.get('card')}  {runs}"


ONE_GPU = ("nvidia-h100-x1", "nvidia-h200", "cpu")


def plan_lanes(chosen: list[Entry], lanes: int) -> list[list[Entry]]:
    """Entries into ``lanes`` lanes, longest time limit first onto the lane with the least time so far (each lane
    keeps the matrix's order among its own entries). Only one-GPU entries can share a machine this way."""
    wide = [e.name for e in chosen if e.machine not in ONE_GPU]
    if lanes > 1 and wide:
        raise ValueError(f"--lanes: {wide} need several GPUs each; run them without --lanes")
    order = {e.name: i for i, e in enumerate(chosen)}
    plan: list[list[Entry]] = [[] for _ in range(max(1, lanes))]
    for e in sorted(chosen, key=lambda e: -e.timeout_s):
        min(plan, key=lambda lane: sum(x.timeout_s for x in lane)).append(e)
    return [sorted(lane, key=lambda e: order[e.name]) for lane in plan if lane]


def run_entry(e: Entry, root: Path, env: dict) -> tuple[int, float]:
    out = root / e.name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(root / f"{e.name}.log", "w") as log:
        try:
            rc = subprocess.run(command(e, out), stdout=log, stderr=subprocess.STDOUT, timeout=e.timeout_s,
                                env=env).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def run_matrix(path: str, spec: str, out_dir: str, dry_run: bool = False, lanes: int = 1) -> int:
    entries, groups = load_matrix(path)
    chosen = select(entries, groups, spec)
    plan = plan_lanes(chosen, lanes)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    lines: dict[str, str] = {}
    codes: list[int] = []
    lock = threading.Lock()

    def lane(i: int, todo: list[Entry]) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if lanes > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        tag = f" [lane {i}: GPU {i}]" if lanes > 1 else ""
        for e in todo:
            with lock:
                print("+", shlex.join(command(e, root / e.name)) + tag, flush=True)
            if dry_run:
                continue
            rc, seconds = run_entry(e, root, env)
            line = summary_line(e, root / e.name, rc, seconds) + tag
            with lock:
                lines[e.name] = line
                codes.append(rc)
                print(line, flush=True)

    threads = [threading.Thread(target=lane, args=(i, todo)) for i, todo in enumerate(plan)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if lines:
        head = [f"({len(plan)} lanes side by side on one host, one GPU each)"] if len(plan) > 1 else []
        print("\n".join(["", "summary:", *head, *(lines[e.name] for e in chosen if e.name in lines)]))
    return 1 if any(codes) else 0


def list_matrix(path: str) -> int:
    entries, groups = load_matrix(path)
    for e in entries.values():
        print(f"{e.name:28s} {e.machine:16s} {e.timeout_s:5.0f}s  {e.note}")
    for g, names in groups.items():
        print(f"group {g}: {', '.join(names)}")
    return 0
