"""Routing cost over pool size: does the router's work per request stay flat from 8 to 1,024 replicas, and does
offered load beyond capacity level off at capacity (no collapse)?

One real ``Router`` (the production class, a real asyncio loop and ``MonotonicClock``) over N simulated replicas.
A simulated replica is a GPU that runs the calls it is given one after another: a call of k 1024x1024 images takes
the service time of ``simulate_scheduling.Model`` (fitted to H200 bf16 runs: encode, nine steps whose time grows
with the packed tokens, decode), scaled so that one image alone takes ``--lone-s`` (0.67 s: an H100 with fp8); four
images, what one 18,432-token set holds at 1024x1024, take 2.34 s (1.71 images/s: a modest batching gain). It
returns results without images. Open-loop Poisson arrivals at ``--load`` (1.2) times the pool's capacity
(N x 4 / service(4)) for ``--duration`` seconds; the router's queue holds one set a replica (``queue_limit`` 4N),
beyond which arrivals are refused (429), as a deployment under overload does.

Per N it reports offered, capacity and delivered images/s (over the window after ``--warmup``), delivered/capacity,
the router's CPU time per request (thread CPU time inside its own code: admission, loop passes, deliveries; what the
asyncio machinery of the load generator and of the simulated replicas costs is not in it), the whole process's CPU
time per request (all of it: load generator, replicas, router), the replicas the scheduler looked at per request
(kinds and replicas, ``Router.examined``), p50/p95 latency of the requests served in the window, and the most
tokens any replica held (never over its budget: two sets).

When real time would need more arrivals a second than one process can make, ``--speedup k`` divides service times
by k and multiplies the arrival rate by k (reported).

    python benchmarks/routing_scale.py --replicas 8,32,128,512,1024 --out $OUT      # about 4.5 minutes
    python benchmarks/routing_scale.py --replicas 8,64 --duration 5 --warmup 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from simulate_scheduling import Model  # noqa: E402

from orchestrator.dispatch_policy import STEP_QUEUE_DEPTH  # noqa: E402
from orchestrator.router import MonotonicClock, Router  # noqa: E402
from zimage_common.config import RouterConfig  # noqa: E402
from zimage_common.errors import QueueFullError  # noqa: E402
from zimage_common.messages import BatchResult, ImageRequest, ImageResult, StageTimes  # noqa: E402

SIZE = 1024
BUDGET = RouterConfig().max_batch_tokens  # 18,432: four 1024x1024 images with their prompts
PROMPT = "a lighthouse on a cliff at dusk, waves below, long exposure"


@dataclass
class ServiceTime:
    """Seconds one call of k 1024x1024 images takes on a simulated GPU."""

    lone_s: float = 0.67
    speedup: float = 1.0
    model: Model = field(default_factory=Model)

    def __post_init__(self):
        tokens = ImageRequest("x", PROMPT, 0, SIZE, SIZE, 9, 0.0).tokens
        self._raw = {k: self._model(k, tokens) for k in range(1, 17)}
        self._scale = self.lone_s / self._raw[1] / self.speedup

    def _model(self, k: int, tokens: int) -> float:
        m = self.model
        return m.encode + m.steps * m.step([tokens] * k) + k * m.decode(SIZE * SIZE)

    def __call__(self, k: int) -> float:
        return self._raw[min(k, 16)] * self._scale

    @property
    def set_size(self) -> int:
        return BUDGET // ImageRequest("x", PROMPT, 0, SIZE, SIZE, 9, 0.0).tokens

    def capacity(self, n: int) -> float:
        """Images a second n replicas deliver with full sets."""
        return n * self.set_size / self(self.set_size)


class SimReplica:
    """A GPU with a step loop, coarsely: the calls it is given wait in order, and whenever its device is free it
    runs the next set (up to one set's worth of their images, across calls), taking ``service(k)``; a call is
    answered once all its images have run. The router keeps up to two sets' worth at it."""

    max_pixels = SIZE * SIZE
    max_batch_tokens = BUDGET

    def __init__(self, replica_id: str, service: ServiceTime, clock):
        self.replica_id = replica_id
        self.service, self.clock = service, clock
        self.waiting: list[list] = []  # [call's future, images not started, images not done]
        self.device: asyncio.Task | None = None
        self.tokens = self.images = 0
        self.peak_tokens = self.peak_images = 0
        self.sets = 0

    async def run(self, batch, on_progress=None) -> BatchResult:
        self.tokens += batch.tokens
        self.images += len(batch)
        self.peak_tokens, self.peak_images = max(self.peak_tokens, self.tokens), max(self.peak_images, self.images)
        done = asyncio.get_running_loop().create_future()
        self.waiting.append([done, len(batch), len(batch)])
        if self.device is None or self.device.done():
            self.device = asyncio.ensure_future(self._device())
        try:
            took = await done
        finally:
            self.tokens -= batch.tokens
            self.images -= len(batch)
        times = StageTimes(total_s=took)
        return BatchResult(batch.batch_id, self.replica_id, tuple(
            ImageResult(r.request_id, True, self.replica_id, batch.batch_id, len(batch), r.seed, r.width, r.height,
                        stage_times=times) for r in batch.requests), times)

    async def _device(self) -> None:
        started = self.clock.now()
        while self.waiting:
            room, members = self.service.set_size, []
            for call in self.waiting:
                if room == 0:
                    break
                k = min(room, call[1])
                if k:
                    call[1] -= k
                    room -= k
                    members.append((call, k))
            k = self.service.set_size - room
            await self.clock.sleep(self.service(k))
            self.sets += 1
            for call, n in members:
                call[2] -= n
                if call[2] == 0:
                    self.waiting.remove(call)
                    call[0].set_result(self.clock.now() - started)

    async def queue_len(self) -> int:
        """What a pooled replica reports (``--shared``): the images it holds."""
        return self.images

    def stop(self) -> None:
        if self.device is not None:
            self.device.cancel()


class SimPool:
    """The router's replica pool; ``listed`` counts the replicas it handed out (a roster read costs one each)."""

    def __init__(self, replicas):
        self.replicas = replicas
        self.listed = 0

    def live(self):
        self.listed += len(self.replicas)
        return self.replicas

    def members(self):
        self.listed += len(self.replicas)
        return self.replicas

    def report_failure(self, replica_id, error):
        raise AssertionError(f"a simulated replica failed: {replica_id}: {error}")


class RouterCPU:
    """Thread CPU time spent inside the router's own code, by wrapping its entry points on the instance: admission,
    each loop pass, each returned call. (A tree before ``_pass`` existed: the pieces its loop called.)"""

    METHODS = ("admit", "_pass", "_returned", "_deliver")
    BEFORE_PASS = ("admit", "_forget_gone", "_expire", "_free", "_dispatch", "_next_deadline", "_deliver")

    def __init__(self, router):
        self.seconds = 0.0
        for name in self.METHODS if hasattr(router, "_pass") else self.BEFORE_PASS:
            if hasattr(router, name):
                setattr(router, name, self._timed(getattr(router, name)))
        if not hasattr(router, "_pass"):
            router.scheduler.schedule = self._timed(router.scheduler.schedule)

    def _timed(self, fn):
        def timed(*args, **kwargs):
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - t0

        return timed


async def run_pool(n: int, duration: float, warmup: float, load: float = 1.2, service: ServiceTime | None = None,
                   clock=None, seed: int = 1, router_kw: dict | None = None) -> dict:
    """N simulated replicas behind one router, Poisson arrivals at ``load`` x capacity for ``duration`` seconds (of
    ``clock``); what was delivered in the window after ``warmup``."""
    service = service or ServiceTime()
    clock = clock or MonotonicClock()
    replicas = [SimReplica(f"r{i}", service, clock) for i in range(n)]
    config = RouterConfig(queue_limit=max(64, service.set_size * n), request_timeout_s=600.0)
    pool = SimPool(replicas)
    router = Router(pool, config, clock=clock, **(router_kw or {}))
    cpu = RouterCPU(router)
    rate = load * service.capacity(n)
    rng = random.Random(seed)
    served: list[tuple[float, float]] = []  # (done at, latency) of each request served
    stats = {"arrivals": 0, "rejected": 0, "failed": 0, "in_window": 0}
    tasks: set[asyncio.Task] = set()

    def record(t0: float, task: asyncio.Task) -> None:
        tasks.discard(task)
        if task.cancelled():
            return
        r = task.result()
        if r.ok:
            served.append((clock.now(), clock.now() - t0))
        else:
            stats["failed"] += 1

    router.start()
    await asyncio.sleep(0)
    start = clock.now()
    examined0 = _examined(router)
    cpu0, proc0 = cpu.seconds, time.process_time()
    cpu_w = proc_w = ex_w = None
    next_at, i = start, 0
    while True:
        now = clock.now()
        if now - start >= duration:
            break
        if cpu_w is None and now - start >= warmup:
            cpu_w, proc_w, ex_w = cpu.seconds, time.process_time(), _examined(router)
            stats["in_window"] = 0
        while next_at <= now:  # every arrival due by now (the loop may wake late under load)
            i += 1
            stats["arrivals"] += 1
            stats["in_window"] += 1
            request = ImageRequest(f"q{i}", PROMPT, i, SIZE, SIZE, 9, 0.0)
            try:
                (waiter,) = router.admit([request])
            except QueueFullError:
                stats["rejected"] += 1
            else:
                task = asyncio.ensure_future(waiter)
                tasks.add(task)
                task.add_done_callback(lambda t, t0=next_at: record(t0, t))
            next_at += rng.expovariate(rate)
        await clock.sleep(next_at - clock.now())
    end = clock.now()
    if cpu_w is None:
        cpu_w, proc_w, ex_w = cpu0, proc0, examined0
    router_s, proc_s, examined = cpu.seconds - cpu_w, time.process_time() - proc_w, _examined(router) - ex_w
    await router.stop()
    for t in list(tasks):
        t.cancel()
    for r in replicas:
        r.stop()
    await asyncio.sleep(0)
    window = end - (start + warmup)
    done = [(t, lat) for t, lat in served if t >= start + warmup]
    latencies = sorted(lat for _, lat in done)
    admitted_in_window = max(1, stats["in_window"])
    return {
        "replicas": n,
        "offered_per_s": stats["in_window"] / window,
        "capacity_per_s": service.capacity(n),
        "delivered_per_s": len(done) / window,
        "delivered_over_capacity": len(done) / window / service.capacity(n),
        "router_us_per_request": 1e6 * router_s / admitted_in_window,
        "process_cpu_us_per_request": 1e6 * proc_s / admitted_in_window,
        "examined_per_request": examined / admitted_in_window,
        "roster_reads_per_request": pool.listed / max(1, stats["arrivals"]),
        "p50_s": statistics.median(latencies) if latencies else None,
        "p95_s": latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
        "arrivals": stats["arrivals"],
        "arrivals_in_window": stats["in_window"],
        "served_in_window": len(done),
        "served": len(served),
        "rejected": stats["rejected"],
        "failed": stats["failed"],
        "window_s": window,
        "peak_tokens": max(r.peak_tokens for r in replicas),
        "peak_images": max(r.peak_images for r in replicas),
        "budget_tokens": STEP_QUEUE_DEPTH * BUDGET,
        "budget_images": STEP_QUEUE_DEPTH * config.max_batch_size,
    }


def _examined(router) -> int:
    return getattr(router, "examined", 0)  # (a tree before the counter: 0)


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", default="8,32,128,512,1024", help="pool sizes, comma-separated")
    ap.add_argument("--duration", type=float, default=50.0, help="seconds of arrivals per pool size")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds before the measured window (the pool fills)")
    ap.add_argument("--load", type=float, default=1.2, help="offered load over the pool's capacity")
    ap.add_argument("--lone-s", type=float, default=0.67, help="seconds of one 1024x1024 image alone")
    ap.add_argument("--speedup", type=float, default=1.0, help="service times / k, arrival rate x k")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--shared", action="store_true", help="the router as one of a pool's front doors: power of two "
                    "choices over the replicas' reported queues (the only router here, so the same work)")
    ap.add_argument("--out", default=None, help="folder for routing_scale.json")
    args = ap.parse_args(argv)
    service = ServiceTime(args.lone_s, args.speedup)
    rows = []
    print(f"service: 1 image {service(1):.3f} s, {service.set_size} images {service(service.set_size):.3f} s; "
          f"load {args.load}x capacity; speedup {args.speedup}", flush=True)
    head = ("N", "offered/s", "capacity/s", "delivered/s", "deliv/cap", "router us/req", "process us/req",
            "examined/req", "p50 s", "p95 s", "peak tokens")
    print(" | ".join(head), flush=True)
    for n in [int(x) for x in args.replicas.split(",")]:
        row = asyncio.run(run_pool(n, args.duration, args.warmup, args.load, service, seed=args.seed,
                                   router_kw={"shared": True} if args.shared else None))
        rows.append(row)
        print(f"{n} | {row['offered_per_s']:.1f} | {row['capacity_per_s']:.1f} | {row['delivered_per_s']:.1f} | "
              f"{row['delivered_over_capacity']:.3f} | {row['router_us_per_request']:.1f} | "
              f"{row['process_cpu_us_per_request']:.1f} | {row['examined_per_request']:.2f} | "
              f"{row['p50_s']:.2f} | {row['p95_s']:.2f} | {row['peak_tokens']}/{row['budget_tokens']}", flush=True)
    report = {
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else "routing_scale.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "commit": _commit(), "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
        "machine": platform.platform(), "python": platform.python_version(),
        "service": {"lone_s": service(1), f"set_of_{service.set_size}_s": service(service.set_size),
                    "speedup": args.speedup},
        "load": args.load, "duration_s": args.duration, "warmup_s": args.warmup, "shared": args.shared, "rows": rows,
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "routing_scale.json").write_text(json.dumps(report, indent=2))
        print(f"wrote {out / 'routing_scale.json'}")


if __name__ == "__main__":
    main()
