"""The decode stage's time in every way a replica serves (a regression check): one replica in this process (no Ray,
no router), the config's model, the same calls the router makes.

A decode runs on the decode stage's long-lived thread (``actors/stages.py``): cuDNN caches its plans per thread, so a
decode on a thread that had not warmed them up took about ten times as long (docs/benchmarks-history.md). For each
phase this probe records, per decoded image, the wall time of the VAE call, its GPU time (CUDA events around it on
the stream it runs on) and whether torch.compile ran it eager: after warm-up the stance is ``fail_on_recompile``, so
an eager fallback (a guard that fails) raises instead of running slowly, and the request fails with the guard's
message in the report. Phases:

1. ``lone``: calls of one request, one after another, from the main thread (the one that ran the warm-up);
2. ``batch-poisson`` / ``step-poisson``: calls of one request arriving at ``--rate`` per second (seeded
   exponential gaps), each from its own thread as Ray's actor threads run them, with the join policy of
   ``router.scheduling`` "batch" (never join a running set) and "step".

Writes ``OUT.json``. ``--tiny`` runs it on the CPU with the toy model (no CUDA events: GPU times are null).

    python3 benchmarks/probe_step_decode.py OUT.json benchmarks/configs/gpu-random.yaml --set model.compile=true \\
        --set model.compile_cache_dir=/tmp/zc
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from probe_replica import add_replica_args, report_head, start_replica  # noqa: E402

from zimage_common.messages import Batch, ImageRequest  # noqa: E402


class DecodeTimes:
    """Wraps ``engine.decode_one``: wall and GPU seconds of every call, and the thread that made it."""

    def __init__(self, engine):
        self.engine = engine
        self.rows: list[dict] = []
        self._lock = threading.Lock()
        inner = engine.decode_one

        def timed(latent):
            cuda = latent.is_cuda
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            out = inner(latent)  # ends with the image on the CPU: the stream is synchronized
            wall = time.perf_counter() - t0
            gpu = None
            if cuda:
                end.record()
                end.synchronize()
                gpu = start.elapsed_time(end) / 1e3
            with self._lock:
                self.rows.append({"wall_s": round(wall, 4), "gpu_s": None if gpu is None else round(gpu, 4),
                                  "thread": threading.current_thread().name})
            return out

        engine.decode_one = timed

    def take(self) -> list[dict]:
        with self._lock:
            rows, self.rows = self.rows, []
        return rows


def summary(rows: list[dict], results: list) -> dict:
    walls = [r["wall_s"] for r in rows]
    gpus = [r["gpu_s"] for r in rows if r["gpu_s"] is not None]
    failed = [r for r in results if not r.ok]
    return {"decodes": len(rows),
            "decode_wall_p50_s": round(statistics.median(walls), 4) if walls else None,
            "decode_wall_max_s": max(walls) if walls else None,
            "decode_gpu_p50_s": round(statistics.median(gpus), 4) if gpus else None,
            "stage_decode_p50_s": round(statistics.median(r.stage_times.decode_s for r in results if r.ok), 4)
            if len(failed) < len(results) else None,
            "failed": len(failed), "errors": sorted({str(r.error)[:300] for r in failed})[:3], "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_replica_args(p)
    p.add_argument("--rate", type=float, default=0.64, help="arrivals per second in the Poisson phases")
    p.add_argument("--requests", type=int, default=12, help="requests per phase")
    args = p.parse_args()

    cfg, worker, startup_s = start_replica(args)
    w, h = cfg.defaults.width, cfg.defaults.height
    steps = cfg.defaults.num_inference_steps
    report = report_head(cfg, startup_s, rate_rps=args.rate)
    if cfg.model.compile and torch.cuda.is_available():
        torch.compiler.set_stance("fail_on_recompile")  # an eager fallback raises instead of running slowly
    times = DecodeTimes(worker.engine)
    ids = iter(range(1_000_000))

    def request() -> ImageRequest:
        i = next(ids)
        return ImageRequest(f"p{i}", f"a photograph of a lighthouse at dusk, number {i}", 1000 + i, w, h, steps, 0.0)

    # 1. calls of one, one after another
    results = [worker.run_batch(Batch(next(ids), (request(),))).results[0] for _ in range(3)]
    report["phases"]["lone"] = summary(times.take(), results)

    # 2. Poisson arrivals, calls of one, each in its own thread (as Ray's), under each router.scheduling's policy
    for scheduling in ("batch", "step"):
        join = cfg.router.model_copy(update={"scheduling": scheduling}).join_policy()
        rng = random.Random(7)
        out: list = []
        threads = []
        for _ in range(args.requests):
            batch = Batch(next(ids), (request(),), join=join)
            t = threading.Thread(target=lambda b=batch: out.append(worker.run_batch(b).results[0]), daemon=True)
            t.start()
            threads.append(t)
            time.sleep(rng.expovariate(args.rate))
        for t in threads:
            t.join(timeout=600)
        report["phases"][f"{scheduling}-poisson"] = summary(times.take(), out)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for name, ph in report["phases"].items():
        print(f"{name:14s} decodes {ph['decodes']:3d}  wall p50 {ph['decode_wall_p50_s']}  gpu p50 "
              f"{ph['decode_gpu_p50_s']}  stage p50 {ph['stage_decode_p50_s']}  failed {ph['failed']} {ph['errors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
