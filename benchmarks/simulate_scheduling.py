"""A model of one replica under Poisson arrivals: whole-batch against step-level scheduling, to compare join
policies (``router.step_free_tokens``, ``step_join_window``, ``step_short_ratio``) without a GPU. **A simulation,
not a measurement**: its numbers say which policies are worth a GPU run, and what no policy can reach.

The step loop's admission is the real code (``actors.steploop.StepLoop._admit`` with ``JoinPolicy``) run on
simulated samples; whole-batch batching follows the router (up to ``router.max_batch_size`` 4 requests within the
token budget, first come first served; two batches in flight, the second encoded beside the first; a busy replica
takes a partial batch only once its batch is in its last quarter). Time is a cost model fitted to bf16 runs on H200
cards (tree 4602d3d, 2026-11-27): a denoising step costs each sample ``b * L + e * L^2`` seconds (L its packed
tokens; the square term is its attention) plus ``r * exp(-T / tau)`` for a set of T tokens in all (a small set
leaves the GPU part idle); a
call's encode ``--encode``, a decode ``--decode-per-mp`` per megapixel. Fitted to: one 1024^2 sample 0.091 s a step,
four 0.393 s, eight 512^2 samples 0.162 s, one 0.035-0.056 s (the loop's pace log and the denoise stage). It is
rough: lone latency comes out 0.45 s at 512^2 and 1.11 s at 1024^2 against 0.39 and 0.97-1.06 s measured, two 512^2
samples 0.058 s a step against 0.056-0.070, three 0.074 against 0.084. Left out: the router's limit on what waits at
a replica (``STEP_QUEUE_DEPTH``), one encode at a time, the loop's layout rebuild at each join and its per-step
overheads. At 512^2 the measured step loop was slower than this model (mean 0.93 s at 80% load against 0.70 s for
the same arrivals), so where the model and a GPU run differ, the GPU run is right and the difference is overhead
worth finding.

For each workload and load (a fraction of whole-batch saturation throughput, as ``step_batching.py`` uses), it
runs ``--draws`` independent draws of ``--requests`` Poisson arrivals and reports the mean (over draws) of each
phase's mean latency and p95, and the mean latency over the lone latency of the phase's own requests (the issue's
measure). ``--seed0`` also reports the single draw ``step_batching.py``'s phases use (seed k for the k-th load), to
set beside a GPU run.

    python benchmarks/simulate_scheduling.py --workload 512,1024,mixed --policies default,free0,free2048,window0
    python benchmarks/simulate_scheduling.py --workload 1024 --loads 0.8 --requests 48 --seed0
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.benchmark.loadgen import poisson_arrivals  # noqa: E402
from zimage_common.config import JoinPolicy  # noqa: E402

SIZES = {"512": [(512, 512)], "1024": [(1024, 1024)],
         "mixed": [(512, 512), (1024, 1024), (1024, 768), (768, 1344), (1344, 768)]}
POLICIES = {  # name -> JoinPolicy(free_tokens, window, short_ratio)
    "default": JoinPolicy(),
    "free0": JoinPolicy(0, JoinPolicy.window, JoinPolicy.short_ratio),
    "free2048": JoinPolicy(2048, JoinPolicy.window, JoinPolicy.short_ratio),
    "free8192": JoinPolicy(8192, JoinPolicy.window, JoinPolicy.short_ratio),
    "window0": JoinPolicy(JoinPolicy.free_tokens, 0, JoinPolicy.short_ratio),
    "noshort": JoinPolicy(JoinPolicy.free_tokens, JoinPolicy.window, 0.0),
    "fcfs-sets": JoinPolicy(never=True),  # never join a running set (router.scheduling=batch): sets one by one
    "join-all": JoinPolicy(10**9, 10**9, 1.0),  # always join: processor sharing
}


@dataclass
class Model:
    step_b: float = 1.62e-5  # s per sample token per step
    step_e: float = 1.68e-9  # s per squared sample tokens per step (attention)
    step_r: float = 0.03  # s: a small set's idle GPU
    step_tau: float = 4000.0  # tokens: how fast that fades
    encode: float = 0.06  # s per call
    decode_per_mp: float = 0.052  # s per megapixel decoded
    overhead: float = 0.0  # s per request outside the stages (router, result)
    steps: int = 9
    max_batch: int = 4  # router.max_batch_size
    budget: int = 4 * 4384  # the replica's token budget (a batch of four 1024^2 samples with long captions)
    caption: tuple[int, int] = (32, 320)  # caption tokens, drawn uniformly, rounded up to 32

    def step(self, lengths: list[int]) -> float:
        total = sum(lengths)
        return sum(self.step_b * n + self.step_e * n * n for n in lengths) + self.step_r * math.exp(
            -total / self.step_tau)

    def decode(self, pixels: int) -> float:
        return self.decode_per_mp * pixels / 2**20

    def lone(self, r: Req) -> float:
        return self.encode + self.steps * self.step([r.tokens]) + self.decode(r.pixels) + self.overhead


@dataclass
class Req:
    i: int
    arrival: float
    pixels: int
    tokens: int
    done: float | None = None


@dataclass
class Sample:
    """What ``StepLoop._admit`` reads of a running sample."""

    req: Req
    tokens: int
    num_steps: int
    step: int = 0
    start: int = 0
    name: str = ""
    loras: tuple = ()
    cancelled: bool = False
    priority: int = 0  # (one priority: nothing is parked)
    ready: float = 0.0  # when its encode is done
    group: object = None  # (no call of its own: the loop's policy applies)

    def work(self) -> int:
        return self.tokens * max(self.num_steps - self.step, 0)

    def adapters(self) -> set[str]:
        return set()


def requests(model: Model, sizes: list[tuple[int, int]], rate: float, n: int, seed: int) -> list[Req]:
    """``open_loop``'s arrivals for ``seed`` (``poisson_arrivals``), sizes and captions drawn from another stream of
    the same seed."""
    draw = random.Random(seed + 7919)
    out = []
    for i, t in enumerate(poisson_arrivals(rate, n, seed)):
        w, h = draw.choice(sizes)
        cap = -(-draw.randint(*model.caption) // 32) * 32
        out.append(Req(i, t, w * h, (w // 16) * (h // 16) + cap))
    return out


def whole_batch(model: Model, reqs: list[Req]) -> None:
    """Batches of up to ``max_batch`` within the budget, first come first served; two in flight (the second's encode
    beside the first's denoise); a busy replica takes a partial batch once its batch is in its last quarter."""
    queue: list[Req] = []
    pending = sorted(reqs, key=lambda r: r.arrival)
    t = 0.0
    device_free = 0.0  # when the batch on the devices ends
    batch_start = 0.0
    k = 0
    while k < len(pending) or queue:
        if not queue:
            t = max(t, pending[k].arrival)
        while k < len(pending) and pending[k].arrival <= t:
            queue.append(pending[k])
            k += 1
        busy = device_free > t
        if busy and len(queue) < model.max_batch and t < batch_start + 0.75 * (device_free - batch_start):
            # wait for more requests or for the running batch's last quarter
            nxt = [batch_start + 0.75 * (device_free - batch_start)]
            if k < len(pending):
                nxt.append(pending[k].arrival)
            t = min(nxt)
            continue
        batch, tokens = [], 0
        for r in list(queue):
            if len(batch) == model.max_batch or (batch and tokens + r.tokens > model.budget):
                break
            batch.append(r)
            tokens += r.tokens
        for r in batch:
            queue.remove(r)
        encoded = t + model.encode
        start = max(encoded, device_free)
        end = start + model.steps * model.step([r.tokens for r in batch]) + sum(model.decode(r.pixels) for r in batch)
        for r in batch:
            r.done = end + model.overhead
        batch_start, device_free = start, end
        # the next batch is formed once this one is on the devices (two in flight)
        t = max(t, start)


def step_level(model: Model, reqs: list[Req], policy: JoinPolicy) -> None:
    """Each request's encode on arrival (its own stream, beside the loop), then the real ``StepLoop._admit`` at
    every step; a finished sample's decode runs beside the loop."""
    from actors.steploop import StepLoop

    loop = StepLoop(None, max_tokens=model.budget, max_samples=2 * model.max_batch, policy=policy)
    ready = [(r.arrival + model.encode, r.i, r) for r in reqs]
    heapq.heapify(ready)
    t = 0.0
    while ready or loop._waiting or loop._running:
        while ready and ready[0][0] <= t:
            _, _, r = heapq.heappop(ready)
            loop._waiting.append(Sample(r, r.tokens, model.steps, name=str(r.i)))
        if not loop._running and not loop._waiting:
            t = ready[0][0]
            continue
        loop._admit()
        running = list(loop._running)
        t += model.step([s.tokens for s in running])
        for s in running:
            s.step += 1
            if s.step >= s.num_steps:
                s.req.done = t + model.decode(s.req.pixels) + model.overhead
        loop._running = [s for s in running if s.step < s.num_steps]


def phase(model: Model, scheduler: str, policy: JoinPolicy, sizes, rate: float, n: int, seed: int) -> dict:
    reqs = requests(model, sizes, rate, n, seed)
    if scheduler == "batch":
        whole_batch(model, reqs)
    else:
        step_level(model, reqs, policy)
    lat = sorted(r.done - r.arrival for r in reqs)
    lone = sum(model.lone(r) for r in reqs) / n
    mean = sum(lat) / n
    return {"mean": mean, "p95": lat[min(n - 1, int(0.95 * n))], "over_lone": mean / lone}


def capacity(model: Model, sizes, n: int = 400) -> float:
    """Whole-batch saturation throughput: every request waiting at once."""
    reqs = requests(model, sizes, 1e9, n, 12345)
    whole_batch(model, reqs)
    return n / max(r.done for r in reqs)


@dataclass
class Result:
    workload: str
    load: float
    scheduler: str
    policy: str
    mean_s: float
    p95_s: float
    mean_over_lone: float
    seed0: dict = field(default_factory=dict)


def run(args) -> dict:
    model = Model(**{k: v for k, v in vars(args).items() if k in Model.__dataclass_fields__ and v is not None})
    loads = [float(x) for x in args.loads.split(",")]
    policies = [p.strip() for p in args.policies.split(",")]
    given = {k: float(v) for k, v in (x.split("=") for x in args.capacity.split(",") if x)} if args.capacity else {}
    out: dict = {"model": vars(model) | {"caption": list(model.caption)}, "draws": args.draws,
                 "requests": args.requests, "workloads": {}}
    for workload in args.workload.split(","):
        sizes = SIZES[workload]
        cap = given.get(workload) or capacity(model, sizes)
        lone = sum(model.lone(r) for r in requests(model, sizes, 1.0, 200, 1)) / 200
        rows = []
        for k, load in enumerate(loads):
            for scheduler, name in [("batch", "-")] + [("step", p) for p in policies]:
                policy = POLICIES.get(name, JoinPolicy())
                draws = [phase(model, scheduler, policy, sizes, load * cap, args.requests, 10_000 + d)
                         for d in range(args.draws)]
                res = Result(workload, load, scheduler, name, *(round(sum(d[key] for d in draws) / len(draws), 4)
                                                                 for key in ("mean", "p95", "over_lone")))
                if args.seed0:
                    res.seed0 = {key: round(v, 4) for key, v in
                                 phase(model, scheduler, policy, sizes, load * cap, args.requests, k).items()}
                rows.append(vars(res))
        out["workloads"][workload] = {"capacity_img_s": round(cap, 4), "lone_mean_s": round(lone, 4), "rows": rows}
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="512,1024,mixed", help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--loads", default="0.5,0.8,0.95", help="fractions of whole-batch saturation throughput")
    p.add_argument("--policies", default="default,free0,free2048,window0,noshort,fcfs-sets,join-all",
                   help=f"step-level join policies, of {', '.join(POLICIES)}")
    p.add_argument("--requests", type=int, default=48, help="requests per phase (a phase starts empty)")
    p.add_argument("--draws", type=int, default=200, help="independent draws of arrivals per phase")
    p.add_argument("--seed0", action="store_true", help="also the draw step_batching.py's phases use")
    p.add_argument("--capacity", default=None, metavar="W=IMG_S,...",
                   help="the load's 100%% per workload, e.g. a GPU run's measured whole-batch saturation throughput "
                   "(default: the model's)")
    for name in ("step_b", "step_e", "step_r", "step_tau", "encode", "decode_per_mp", "overhead"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=float, default=None)
    p.add_argument("--out", default=None, help="write the report here (JSON)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    for workload, w in report["workloads"].items():
        print(f"{workload}: whole-batch capacity {w['capacity_img_s']} img/s, mean lone latency {w['lone_mean_s']} s")
        for r in w["rows"]:
            seed0 = f"   seed-k draw: mean {r['seed0']['mean']:.3f}" if r["seed0"] else ""
            print(f"  load {r['load']:.2f} {r['scheduler']:5s} {r['policy']:9s} mean {r['mean_s']:.3f} s  "
                  f"p95 {r['p95_s']:.3f} s  mean/lone {r['mean_over_lone']:.2f}{seed0}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
