"""Interactive latency with and without an HTTP batch job running, in one run on one warm server.

    python benchmarks/batch_priority.py                 # the CPU demo: tiny model, two replicas, local Ray
    python benchmarks/batch_priority.py --fake          # fake replicas with a GPU-like batch cost (no Ray)
    python benchmarks/batch_priority.py CONFIG --rate 0.5 --requests 60 --job-lines 400 --rounds 1

The run is ``--rounds`` rounds, each of two segments with the same arrivals: interactive requests (open loop,
Poisson arrivals at --rate) with no job, then a batch job of --job-lines requests submitted through POST /v1/files
and /v1/batches and the same interactive requests again while it runs; the round ends when the job has finished.
--requests interactive requests a side are split over the rounds. Alternating the sides in time keeps what else
the machine runs meanwhile (a shared machine's other work comes and goes) from landing on one side only. It
reports each side's p50/p95 latency over every round, the p95 ratio (target <= 1.10), each round's own ratio
(the spread), each job's status, counts and images/s, and where an interactive request's time went on each side
(router queue, the replica's encode, denoise and decode, the rest of the replica call, the front door's HTTP).
Writes batch_priority.json in --out.
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
    """``count`` requests at Poisson arrivals of ``rate``/s; each one's latency, in request order (every one must
    succeed). The same ``seed`` gives the same arrivals, prompts and image seeds."""
    import httpx

    rng = random.Random(seed)
    gaps = [rng.expovariate(rate) for _ in range(count)]
    latencies = [0.0] * count

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(i: int) -> None:
            t0 = time.perf_counter()
            r = await client.post("/v1/images/generations", json={**body, "prompt": f"interactive {i}", "seed": i})
            assert r.status_code == 200, r.text
            latencies[i] = time.perf_counter() - t0

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


class Trace:
    """Where each interactive request's time went, from the in-process server's router observer: its wait in the
    router's queue and the replica's stage times, by prompt (a segment's prompts are unique)."""

    def __init__(self, observer):
        from zimage_common.messages import INTERACTIVE

        self.records: dict[str, dict] = {}
        self._by_id: dict[str, dict] = {}
        dispatched, finished = observer.dispatched, observer.finished

        def on_dispatched(replica_id, batch, queue_times):
            for r, q in zip(batch.requests, queue_times):
                if r.priority == INTERACTIVE:
                    self._by_id[r.request_id] = self.records[r.prompt] = {"queue_s": q}
            return dispatched(replica_id, batch, queue_times)

        def on_finished(result):
            rec = self._by_id.pop(result.request_id, None)
            if rec is not None and result.ok:
                t = result.stage_times
                rec.update(router_s=result.latency_s, encode_s=t.encode_s, denoise_s=t.denoise_s,
                           decode_s=t.decode_s)
            return finished(result)

        observer.dispatched, observer.finished = on_dispatched, on_finished

    def take(self, latencies: list[float]) -> list[dict]:
        """The segment's requests (``interactive``'s latencies, in request order) broken down; clears the records."""
        rows = []
        for i, lat in enumerate(latencies):
            rec = self.records.get(f"interactive {i}")
            if rec is None or "router_s" not in rec:
                continue
            stages = rec["encode_s"] + rec["denoise_s"] + rec["decode_s"]
            rows.append({"queue_s": rec["queue_s"], "encode_s": rec["encode_s"], "denoise_s": rec["denoise_s"],
                         "decode_s": rec["decode_s"], "rest_of_call_s": rec["router_s"] - rec["queue_s"] - stages,
                         "http_s": lat - rec["router_s"]})
        self.records.clear()
        self._by_id.clear()
        return rows


def breakdown(rows: list[dict]) -> dict:
    """p50 and p95 of each part over ``Trace.take``'s rows."""
    if not rows:
        return {}
    return {k: {"p50_s": round(statistics.median(r[k] for r in rows), 5), "p95_s": round(p95([r[k] for r in rows]), 5)}
            for k in rows[0]}


async def measure(url: str, rate: float, count: int, job_lines: int, body: dict, seed: int = 7,
                  job_timeout_s: float = 3600, rounds: int = 1, trace: Trace | None = None) -> dict:
    """``rounds`` rounds of a segment without a job and one with a job running, the same arrivals in both (the
    module's docstring); ``count`` requests a side in all. Each job must outlast its segment."""
    await interactive(url, rate, min(4, count), seed + 1000, body)  # warm: the first requests set up connections
    sizes = [count // rounds + (r < count % rounds) for r in range(rounds)]
    alone: list[float] = []
    busy: list[float] = []
    parts: dict[str, list[dict]] = {"alone": [], "with_job": []}
    out_rounds = []
    for r, n in enumerate(sizes):
        if trace is not None:
            trace.take([])
        a = await interactive(url, rate, n, seed + r, body)
        if trace is not None:
            parts["alone"] += trace.take(a)
        batch_id = await asyncio.to_thread(submit_job, url, job_lines, body)
        t_job = time.perf_counter()
        while (await asyncio.to_thread(job_state, url, batch_id))["status"] != "in_progress":
            await asyncio.sleep(0.05)
        b = await interactive(url, rate, n, seed + r, body)
        if trace is not None:
            parts["with_job"] += trace.take(b)
        during = await asyncio.to_thread(job_state, url, batch_id)
        while (state := await asyncio.to_thread(job_state, url, batch_id))["status"] not in (
                "completed", "failed", "expired", "cancelled"):
            assert time.perf_counter() - t_job < job_timeout_s, state
            await asyncio.sleep(0.2)
        job_s = time.perf_counter() - t_job
        counts = state["request_counts"]
        alone += a
        busy += b
        out_rounds.append({
            "requests": n, "alone_p95_s": p95(a), "with_job_p95_s": p95(b), "p95_ratio": p95(b) / p95(a),
            "job": {"status": state["status"], "request_counts": counts, "seconds": job_s,
                    "images_per_s": counts["completed"] / job_s,
                    "completed_when_interactive_phase_ended": during["request_counts"]["completed"],
                    "still_running_at_phase_end": during["status"] == "in_progress"}})
    jobs = [x["job"] for x in out_rounds]
    completed = sum(j["request_counts"]["completed"] for j in jobs)
    seconds = sum(j["seconds"] for j in jobs)
    ratios = [x["p95_ratio"] for x in out_rounds]
    return {
        "rate": rate, "requests": count, "rounds": rounds, "body": body,
        "alone": {"p50_s": statistics.median(alone), "p95_s": p95(alone)},
        "with_job": {"p50_s": statistics.median(busy), "p95_s": p95(busy)},
        "p95_ratio": p95(busy) / p95(alone),
        "round_p95_ratios": {"min": min(ratios), "max": max(ratios), "each": ratios},
        "breakdown": {side: breakdown(rows) for side, rows in parts.items()},
        "latencies_s": {"alone": sorted(round(x, 4) for x in alone), "with_job": sorted(round(x, 4) for x in busy)},
        "job": {"status": "completed" if all(j["status"] == "completed" for j in jobs) else
                next(j["status"] for j in jobs if j["status"] != "completed"),
                "request_counts": {k: sum(j["request_counts"][k] for j in jobs) for k in jobs[0]["request_counts"]},
                "seconds": seconds, "images_per_s": completed / seconds,
                "completed_when_interactive_phase_ended": sum(j["completed_when_interactive_phase_ended"]
                                                              for j in jobs),
                "still_running_at_phase_end": all(j["still_running_at_phase_end"] for j in jobs)},
        "per_round": out_rounds,
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
    ap.add_argument("--requests", type=int, default=200, help="interactive requests a side, over every round")
    ap.add_argument("--job-lines", type=int, default=1200, help="each round's job (it must outlast its segment)")
    ap.add_argument("--rounds", type=int, default=5)
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
    app = create_app(config, deployment_factory=factory)
    trace = Trace(app.state.service.observer)
    with _Server(app) as url:
        result = asyncio.run(measure(url, args.rate, args.requests, args.job_lines, body, rounds=args.rounds,
                                     trace=trace))
    result["config"] = args.config or "<embedded CPU demo>"
    result["fake"] = args.fake
    result["reserve"] = {"replicas": config.batches.reserve_replicas, "seconds": config.batches.reserve_s}
    (out / "batch_priority.json").write_text(json.dumps(result, indent=2))
    a, b = result["alone"], result["with_job"]
    spread = result["round_p95_ratios"]
    print(f"interactive p50/p95 alone {a['p50_s']:.3f}/{a['p95_s']:.3f}s, with a job {b['p50_s']:.3f}/"
          f"{b['p95_s']:.3f}s: p95 ratio {result['p95_ratio']:.3f} (target <= 1.10); rounds "
          f"{spread['min']:.3f}-{spread['max']:.3f}")
    for side, parts in result["breakdown"].items():
        print(f"  {side:8s} " + ", ".join(f"{k[:-2]} {v['p50_s'] * 1000:.1f}/{v['p95_s'] * 1000:.1f}ms"
                                          for k, v in parts.items()))
    j = result["job"]
    print(f"job {j['status']}: {j['request_counts']} in {j['seconds']:.1f}s ({j['images_per_s']:.2f} img/s); "
          f"still running when the interactive phase ended: {j['still_running_at_phase_end']}")
    return 0 if result["p95_ratio"] <= 1.10 and j["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
