"""A batch job's images/s against the closed-loop benchmark's, on one deployment in one run (issue #34: a job of
realistic sizes reaches >= 0.95 of the closed loop).

    python benchmarks/batch_rate.py --out $OUT                        # the CPU demo (tiny model, local Ray)
    python benchmarks/batch_rate.py benchmarks/configs/gpu-random.yaml --set model.compile=true \\
        --set model.quantization=fp8 --lines 2000 --closed 96 --out $OUT

One deployment serves both phases, so start-up and compilation are paid once and both see the same warm replicas:
``--warmup`` requests, then the closed loop (``--concurrency`` clients sending ``--closed`` of the job's own lines,
in the job's mix of sizes; its steady rate as ``zimage-orch bench`` reports it: from the ``concurrency``-th
completion to the last), then, once the interactive reserve has lapsed (``batches.reserve_s``), the job of
``--lines`` requests of the workload (``batch_job_input.py``'s lines) through ``zimage-orch batch``'s own code path
(``orchestrator/batch_cli.run_job``: its window, its SQLite records, every image written as a file), whose rate is
images over the job's wall time, its ramp-up and drain included: a short job's tail weighs on it. Both rates are
also given as TFLOP/s, each request's own arithmetic (``sizes.request_tflop`` at its size and caption tokens). The
job's work runs at batch-job CPU priority, so on a host shared with other work its rate drops where the closed
loop's does not. Writes batch_rate.json (and the job's input, state and images) in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from batch_job_input import write_job  # noqa: E402


async def measure(config, out: Path, lines: int, closed: int, concurrency: int, warmup: int, workload: str,
                  seed: int, window: int | None = None) -> dict:
    from orchestrator.batch_cli import run_job
    from orchestrator.benchmark.loadgen import api_sender, closed_loop, steady_throughput
    from orchestrator.benchmark.sizes import request_tflop
    from orchestrator.deployment import Deployment

    out.mkdir(parents=True, exist_ok=True)
    job_input = out / "job.jsonl"
    write_job(job_input, lines, workload, seed=seed)
    t0 = time.perf_counter()
    dep = await Deployment.start(config)
    startup_s = time.perf_counter() - t0
    send = api_sender(dep)
    maker = _SameMix(job_input, warmup + closed, seed)
    try:
        if warmup:
            await closed_loop(send, maker, concurrency, warmup)
        done_at: list[float] = []
        results, closed_s = await closed_loop(send, maker, concurrency, closed, done_at=done_at)
    except BaseException:
        await dep.shutdown()
        raise
    closed_rate = steady_throughput(done_at, concurrency)
    failed = sum(not r.ok for r in results)

    # The closed loop's requests are interactive: for batches.reserve_s after the last of them a job leaves replicas
    # idle and runs small batches for interactive work to come (jobs_config.py). `zimage-orch batch` runs with no
    # interactive traffic, so the job starts once that has lapsed.
    await asyncio.sleep(config.batches.reserve_s)

    async def same_deployment(_config):
        return dep  # run_job shuts it down when the job ends

    summary = await run_job(config, job_input, str(out / "job"), deployment_factory=same_deployment, window=window,
                            progress=False)
    job_rate = summary["this_run"]["images_per_s"]
    steps = config.defaults.num_inference_steps
    closed_tflop = [request_tflop(r.width, r.height, r.prompt_tokens, steps) for r in results if r.ok]
    job_tflop = _job_tflop(job_input, out / "job" / "output.jsonl", steps)
    closed_tflop_s = closed_rate * sum(closed_tflop) / len(closed_tflop) if closed_rate and closed_tflop else None
    job_tflop_s = sum(job_tflop) / summary["this_run"]["elapsed_s"] if job_tflop else None
    return {
        "workload": workload, "startup_s": round(startup_s, 1),
        "closed": {"requests": closed, "concurrency": concurrency, "failed": failed, "wall_s": round(closed_s, 2),
                   "images_per_s": closed_rate, "images_per_s_wall": round(closed / closed_s, 4)},
        "job": {"lines": lines, "done": summary["done"], "failed": summary["failed"], "window": summary["window"],
                "elapsed_s": summary["this_run"]["elapsed_s"], "images_per_s": job_rate,
                "finished": summary["finished"], "slowest": summary["slowest"][:3]},
        "ratio": round(job_rate / closed_rate, 4) if job_rate and closed_rate else None,
        # each phase's own arithmetic per second (sizes.request_tflop at each request's size and caption tokens):
        # the phases draw their sizes at random, and a few hundred draws differ in mix by more than the target
        "closed_tflop_per_s": _round(closed_tflop_s), "job_tflop_per_s": _round(job_tflop_s),
        "tflop_ratio": round(job_tflop_s / closed_tflop_s, 4) if job_tflop_s and closed_tflop_s else None,
        "mean_tflop_per_image": {"closed": _round(sum(closed_tflop) / max(1, len(closed_tflop))),
                                 "job": _round(sum(job_tflop) / max(1, len(job_tflop)))},
    }


class _SameMix:
    """The closed loop's requests: ``count`` of the job's own lines (prompts and sizes), in the job's proportions of
    each size (largest remainders), shuffled: a hundred random draws of five sizes differ from a few thousand by
    more than the 5% the comparison is about (on one H100, 26% of one closed loop's were 512x512 against 17.5% of
    its job's), so images/s compare the same mix."""

    def __init__(self, job_input: Path, count: int, seed: int):
        import random

        by_size: dict[str, list[dict]] = {}
        for text in job_input.read_text().splitlines():
            body = json.loads(text)["body"]
            by_size.setdefault(body["size"], []).append(body)
        total = sum(len(v) for v in by_size.values())
        quota = {k: count * len(v) / total for k, v in by_size.items()}
        take = {k: int(q) for k, q in quota.items()}
        for k in sorted(quota, key=lambda k: quota[k] - take[k], reverse=True)[:count - sum(take.values())]:
            take[k] += 1
        self.bodies = [b for k, v in by_size.items() for b in (v * (1 + take[k] // max(1, len(v))))[:take[k]]]
        random.Random(seed).shuffle(self.bodies)
        self.i = 0

    def params(self) -> dict:
        b = self.bodies[self.i % len(self.bodies)]
        self.i += 1
        w, h = (int(v) for v in b["size"].split("x"))
        return {"prompt": b["prompt"], "width": w, "height": h, "seed": self.i, "num_inference_steps": None}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _job_tflop(job_input: Path, output: Path, steps: int) -> list[float]:
    """Each finished line's arithmetic: its size from the input, its caption tokens from its response's usage."""
    from orchestrator.benchmark.sizes import request_tflop

    sizes = {}
    for text in job_input.read_text().splitlines():
        line = json.loads(text)
        sizes[line["custom_id"]] = tuple(int(v) for v in line["body"]["size"].split("x"))
    out = []
    for text in output.read_text().splitlines():
        rec = json.loads(text)
        body = (rec.get("response") or {}).get("body") or {}
        if rec.get("error") or "data" not in body:
            continue
        tokens = (body.get("usage") or {}).get("input_tokens_details", {}).get("text_tokens")
        out += [request_tflop(*sizes[rec["custom_id"]], tokens, steps)] * len(body["data"])
    return out


def main() -> int:
    from zimage_common.config import load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=None, help="deployment config (default: the embedded CPU demo)")
    ap.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    ap.add_argument("--lines", type=int, default=200, help="the job's requests")
    ap.add_argument("--closed", type=int, default=48, help="the closed loop's requests")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--workload", choices=("mixed", "varied", "uniform"), default="mixed")
    ap.add_argument("--window", type=int, default=None, help="the job's window (default: the CLI's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    config = load_config(args.config, args.set)
    report = asyncio.run(measure(config, Path(args.out), args.lines, args.closed, args.concurrency, args.warmup,
                                 args.workload, args.seed, args.window))
    report.update(command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    (Path(args.out) / "batch_rate.json").write_text(json.dumps(report, indent=2))
    c, j = report["closed"], report["job"]
    print(f"closed loop: {c['images_per_s']} img/s ({c['requests']} requests at c{c['concurrency']}, "
          f"{c['failed']} failed); job: {j['images_per_s']} img/s ({j['done']} done, {j['failed']} failed, "
          f"window {j['window']}, {j['elapsed_s']} s); ratio {report['ratio']}; TFLOP/s closed "
          f"{report['closed_tflop_per_s']}, job {report['job_tflop_per_s']}, ratio {report['tflop_ratio']}")
    return 0 if j["finished"] and not j["failed"] and not c["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
