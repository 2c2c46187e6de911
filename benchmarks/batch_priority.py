"""Interactive latency with and without an HTTP batch job running, in one run on one warm server.

    python benchmarks/batch_priority.py                 # the CPU demo: tiny model, two replicas, local Ray
    python benchmarks/batch_priority.py --fake          # fake replicas with a GPU-like batch cost (no Ray)
    python benchmarks/batch_priority.py CONFIG --rate 0.5 --requests 60 --job-lines 400

Phase 1 sends interactive requests (open loop, Poisson arrivals at --rate) with no job; phase 2 submits a batch job
of --job-lines requests through POST /v1/files and /v1/batches, sends the same arrivals again while the job runs,
then waits for the job to finish. It reports each phase's p50/p95 latency, the p95 ratio (target <= 1.10), and
the job's status, counts and images/s. Writes batch_priority.json in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


async def interactive(url: str, rate: float, count: int, seed: int, body: dict) -> list[float]:
    """``count`` requests at Poisson arrivals of ``rate``/s; each one's latency (every one must succeed)."""
    import httpx

    rng = random.Random(seed)
    gaps = [rng.expovariate(rate) for _ in range(count)]
    latencies: list[float] = []

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(i: int) -> None:
            t0 = time.perf_counter()
            r = await client.post("/v1/images/generations", json={**body, "prompt": f"interactive {i}", "seed": i})
            assert r.status_code == 200, r.text
            latencies.append(time.perf_counter() - t0)

        tasks = []
        for i, gap in enumerate(gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*tasks)
    return latencies


def submit_job(url: str, lines: int, body: dict) -> str:
    import httpx

    data = "".join(json.dumps({"custom_id": f"job-{i}", "method": "POST", "url": "/v1/images/generations",
                               "body": {**body, "prompt": f"catalogue item {i}", "seed": i}}) + "\n"
                   for i in range(lines)).encode()
    f = httpx.post(f"{url}/v1/files", files={"file": ("job.jsonl", data)}, data={"purpose": "batch"}, timeout=60)
    f.raise_for_status()
    b = httpx.post(f"{url}/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": "/v1/images/generations",
                                              "completion_window": "24h"}, timeout=60)
    b.raise_for_status()
    return b.json()["id"]


def job_state(url: str, batch_id: str) -> dict:
    import httpx

    return httpx.get(f"{url}/v1/batches/{batch_id}", timeout=60).json()


async def measure(url: str, rate: float, count: int, job_lines: int, body: dict, seed: int = 7,
                  job_timeout_s: float = 3600) -> dict:
    """Phase 1 (no job) and phase 2 (a job running) on the server at ``url``; the job must outlast phase 2."""
    await interactive(url, rate, min(4, count), seed + 1, body)  # warm: the first requests set up connections
    alone = await interactive(url, rate, count, seed, body)
    batch_id = await asyncio.to_thread(submit_job, url, job_lines, body)
    t_job = time.perf_counter()
    while (await asyncio.to_thread(job_state, url, batch_id))["status"] != "in_progress":
        await asyncio.sleep(0.05)
    busy = await interactive(url, rate, count, seed, body)
    during = await asyncio.to_thread(job_state, url, batch_id)
    while (state := await asyncio.to_thread(job_state, url, batch_id))["status"] not in (
            "completed", "failed", "expired", "cancelled"):
        assert time.perf_counter() - t_job < job_timeout_s, state
        await asyncio.sleep(0.2)
    job_s = time.perf_counter() - t_job
    counts = state["request_counts"]
    return {
        "rate": rate, "requests": count, "body": body,
        "alone": {"p50_s": statistics.median(alone), "p95_s": p95(alone)},
        "with_job": {"p50_s": statistics.median(busy), "p95_s": p95(busy)},
        "p95_ratio": p95(busy) / p95(alone),
        "latencies_s": {"alone": sorted(round(x, 4) for x in alone), "with_job": sorted(round(x, 4) for x in busy)},
        "job": {"status": state["status"], "request_counts": counts, "seconds": job_s,
                "images_per_s": counts["completed"] / job_s,
                "completed_when_interactive_phase_ended": during["request_counts"]["completed"],
                "still_running_at_phase_end": during["status"] == "in_progress"},
    }


class _Server:
    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        import httpx

        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        while httpx.get(f"{url}/readyz").status_code != 200:
            time.sleep(0.2)
        return url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=None, help="default: the embedded CPU demo")
    ap.add_argument("--fake", action="store_true", help="fake replicas (tests/batch_fakes.py), no Ray")
    ap.add_argument("--rate", type=float, default=1.0, help="interactive requests per second")
    ap.add_argument("--requests", type=int, default=40, help="interactive requests per phase")
    ap.add_argument("--job-lines", type=int, default=300)
    ap.add_argument("--size", default=None, help="WxH of every request (default: the config's)")
    ap.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    ap.add_argument("--out", default="batch-priority-out")
    args = ap.parse_args()

    from orchestrator.server import create_app
    from zimage_common.config import load_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="zimage-prio-"))
    config = load_config(args.config, [f"outputs.directory={work / 'outputs'}",
                                       f"batches.directory={work / 'batches'}", *args.set])
    factory = None
    if args.fake:
        sys.path.insert(0, str(ROOT / "tests"))
        from batch_fakes import TimedBackend
        from batch_fakes import factory as fake_factory

        factory = fake_factory(TimedBackend(config.deployment.replicas, base_s=0.04, per_image_s=0.03))
    else:
        from orchestrator import ray_backend

        ray_backend.connect(config.cluster)
    body = {"size": args.size} if args.size else {}
    with _Server(create_app(config, deployment_factory=factory)) as url:
        result = asyncio.run(measure(url, args.rate, args.requests, args.job_lines, body))
    result["config"] = args.config or "<embedded CPU demo>"
    result["fake"] = args.fake
    result["reserve"] = {"replicas": config.batches.reserve_replicas, "seconds": config.batches.reserve_s}
    (out / "batch_priority.json").write_text(json.dumps(result, indent=2))
    a, b = result["alone"], result["with_job"]
    print(f"interactive p50/p95 alone {a['p50_s']:.3f}/{a['p95_s']:.3f}s, with a job {b['p50_s']:.3f}/"
          f"{b['p95_s']:.3f}s: p95 ratio {result['p95_ratio']:.3f} (target <= 1.10)")
    j = result["job"]
    print(f"job {j['status']}: {j['request_counts']} in {j['seconds']:.1f}s ({j['images_per_s']:.2f} img/s); "
          f"still running when the interactive phase ended: {j['still_running_at_phase_end']}")
    return 0 if result["p95_ratio"] <= 1.10 and j["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
