"""``router.scheduling = "step"`` (requests join a running set where the join policy says it pays) against
``"batch"`` (a running set takes no newcomer: whole batches one after another), on one warm deployment.

For each workload (``uniform``: the config's default size, 1024x1024 on the GPU configs; ``mixed``: five sizes and
prompts of 3 to 160 words, as ``zimage-orch bench --workload mixed``), with both values on the same replicas
(``dep.router.scheduling`` set between phases: the router's dispatch is the same for both, only the join policy the
calls carry to the replicas' step loops changes, so the replicas serve both without a second warm-up):

1. lone-request latency (requests one at a time; the target divides by the lower of the two schedulers'), and for
   ``mixed`` per size (``--lone`` requests of each size, prompts of 3 to 160 words), so each open-loop phase's mean
   is also compared with the mean lone latency of its own requests' sizes, the lower of the two schedulers'
   (``lone_mean_s``, ``mean_over_lone``): the issue's target (mean at most 1.5x a lone request's latency at 80%
   load) for a mix of sizes;
2. saturation throughput (closed loop at ``--concurrency``);
3. open loop, Poisson arrivals at ``--loads`` of the measured capacity (whole-batch saturation throughput, so both
   schedulers see the same arrival times and requests): mean, p50 and p95 latency, throughput, time to first step;
   and beside each, what the arrivals alone make of it (``fcfs_reference``): the mean of a first-come-first-served
   server in which each request takes its lone latency, on these arrivals and expected over other draws at the same
   rate. A short phase is one draw; 48 arrivals at 80% load at 1024^2 (seed 0; H200 cards, tree 4602d3d) gave such
   a server a mean of 1.5x the service time where the expectation is 2.8x.

Writes ``OUT/step_batching.json`` and ``OUT/step_batching.png`` (mean and p95 latency against load, both
schedulers, and 1.5x the lone latency: the issue's target at 80% load).

    python benchmarks/step_batching.py benchmarks/configs/gpu-random.yaml --set model.compile=true \\
        --set model.compile_cache_dir=/tmp/zc --out $OUT
    python benchmarks/step_batching.py --tiny --out /tmp/sb      # CPU, toy model: the pipeline end to end
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.benchmark.loadgen import (  # noqa: E402
    REALISTIC_SIZES,
    RequestMaker,
    api_sender,
    closed_loop,
    open_loop,
    poisson_arrivals,
)
from orchestrator.benchmark.report import percentile  # noqa: E402
from orchestrator.benchmark.run import _environment  # noqa: E402
from zimage_common.config import load_config  # noqa: E402

log = logging.getLogger("step_batching")

TINY = ["model.source=tiny", "model.dtype=float32", "deployment.replicas=1", "deployment.cpu_per_replica=0",
        "deployment.torch_threads=1", "defaults.width=64", "defaults.height=64", "defaults.num_inference_steps=3",
        "cluster.num_gpus=1", "cluster.num_cpus=4", "cluster.gpu_memory_gib=24", "deployment.warmup_sizes=[]"]
TINY_MIXED = [(32, 32), (64, 64), (64, 48), (48, 80), (80, 48)]


def stats(results: list, elapsed: float) -> dict:
    ok = [r for r in results if r.ok]
    lat = [r.latency_s for r in ok]
    return {"requests": len(results), "failed": len(results) - len(ok),
            "errors": sorted({str(r.error)[:200] for r in results if not r.ok})[:3],
            "elapsed_s": round(elapsed, 3), "throughput_img_s": round(len(ok) / elapsed, 4) if elapsed else 0.0,
            "latency_mean_s": round(sum(lat) / len(lat), 4) if lat else 0.0,
            "latency_p50_s": round(percentile(lat, 0.5), 4), "latency_p95_s": round(percentile(lat, 0.95), 4),
            "queue_mean_s": round(sum(r.queue_s for r in ok) / len(ok), 4) if ok else 0.0,
            "megapixels_s": round(sum(r.width * r.height for r in ok) / 1e6 / elapsed, 4) if elapsed else 0.0,
            # per request: encode, time in the loop or batch's denoise, decode, and the replica's whole call
            "stage_p50_s": {name: round(percentile([getattr(r.stage_times, name) for r in ok], 0.5), 4)
                            for name in ("encode_s", "denoise_s", "decode_s", "total_s")} if ok else {},
            "call_sizes": dict(sorted(Counter(str(r.batch_size) for r in ok).items(), key=lambda kv: int(kv[0])))}


def own_lone(results: list, by_size: dict, mean: float) -> dict:
    """The mean lone latency of these requests' own sizes (a size's lone latency: the lower of the two schedulers'),
    and the phase's mean over it."""
    lone = [min((v for v in by_size.get(f"{r.width}x{r.height}", {}).values() if v), default=None)
            for r in results if r.ok]
    lone = [v for v in lone if v]
    if not lone:
        return {}
    own = sum(lone) / len(lone)
    return {"lone_mean_s": round(own, 4), "mean_over_lone": round(mean / own, 3)}


SIZE = re.compile(r"(\d+)x(\d+)")


def parse_size(name: str) -> tuple[int, int]:
    w, h = SIZE.fullmatch(name).groups()
    return int(w), int(h)


def against(out: dict, ref: dict) -> dict:
    """Each scheduler of this run against the reference run's whole-batch scheduling, phase by phase (the same
    arrivals): saturation throughput, and mean and p95 latency at each load, as ratios (this run / reference)."""
    base = {r["load"]: r for r in ref["open_loop"] if r["scheduler"] == "batch"}
    ref_sat = ref["saturation"]["batch"]["throughput_img_s"]
    res = {}
    for s, sat in out["saturation"].items():
        rows = {}
        for r in out["open_loop"]:
            b = base.get(r["load"])
            if r["scheduler"] == s and b:
                rows[str(r["load"])] = {"mean": round(r["latency_mean_s"] / b["latency_mean_s"], 3),
                                        "p95": round(r["latency_p95_s"] / b["latency_p95_s"], 3),
                                        "mean_over_fcfs": round(r["latency_mean_s"] / r["fcfs_mean_s"], 3)
                                        if r.get("fcfs_mean_s") else None}
        res[s] = {"saturation": round(sat["throughput_img_s"] / ref_sat, 3) if ref_sat else None, "loads": rows}
    return res


def fcfs_mean(rate: float, seed: int, services: list[float]) -> float:
    """Mean response time of one first-come-first-served server in which request i takes ``services[i]`` seconds,
    for the arrivals ``open_loop(rate, n=len(services), seed=seed)`` makes (``poisson_arrivals``)."""
    free = total = 0.0
    for t, s in zip(poisson_arrivals(rate, len(services), seed), services):
        free = max(t, free) + s
        total += free - t
    return total / len(services) if services else 0.0


def fcfs_reference(rate: float, seed: int, services: list[float], draws: int = 2000) -> dict:
    """What the phase's arrivals alone would give: a FCFS server in which each request takes its lone latency (no
    batching gain, no overhead), on the phase's own arrivals (``fcfs_mean_s``), and on ``draws`` other draws of
    Poisson arrivals at the same rate (``fcfs_expected_mean_s``), with the share of those draws that come out lower
    than the phase's (``arrivals_percentile``: a phase whose arrivals happened to be sparse comes out low). One
    short phase is one draw of a random process; these say how lucky its draw was."""
    if not services:
        return {}
    own = fcfs_mean(rate, seed, services)
    others = [fcfs_mean(rate, 10_000 + i, services) for i in range(draws)]
    return {"fcfs_mean_s": round(own, 4), "fcfs_expected_mean_s": round(sum(others) / draws, 4),
            "arrivals_percentile": round(sum(1 for v in others if v < own) / draws, 3)}


class FirstSteps:
    """Time from arrival to first step, per phase (the router's observer hook)."""

    def __init__(self):
        self.values: list[float] = []

    def take(self) -> dict:
        v, self.values = self.values, []
        return {"first_step_mean_s": round(sum(v) / len(v), 4) if v else None,
                "first_step_p95_s": round(percentile(v, 0.95), 4) if v else None}


async def run(args) -> dict:
    from orchestrator.deployment import Deployment
    from orchestrator.router import RouterObserver

    overrides = (TINY if args.tiny else []) + list(args.set) + ["router.scheduling=step"]
    config = load_config(args.config, overrides)
    first = FirstSteps()

    class Observer(RouterObserver):
        def first_step(self, replica_id, waited_s):
            first.values.append(waited_s)

    workloads = [w.strip() for w in args.workload.split(",")]
    loads = [float(x) for x in args.loads.split(",")]
    schedulers = tuple(s.strip() for s in args.schedulers.split(","))
    reference = json.loads(Path(args.reference).read_text()) if args.reference else None
    if "batch" not in schedulers and reference is None:
        raise SystemExit("--schedulers without batch needs --reference: the open-loop rates are fractions of "
                         "whole-batch capacity, taken from the reference report")
    report: dict = {"command": " ".join(sys.argv), "config": args.config, **_environment(), "loads": loads,
                    "workloads": {}, "requests_per_phase": args.requests}
    t0 = time.perf_counter()
    dep = await Deployment.start(config, observer=Observer())
    report["startup_s"] = round(time.perf_counter() - t0, 2)
    send = api_sender(dep)

    def maker(workload: str, seed: int) -> RequestMaker:
        if SIZE.fullmatch(workload):  # one size, prompts of 3 to 160 words
            return RequestMaker.for_workload("varied", config, [parse_size(workload)], args.steps, seed=seed)
        sizes = None
        if workload == "mixed" and args.tiny:
            sizes = TINY_MIXED
        return RequestMaker.for_workload(workload, config, sizes or [(config.defaults.width, config.defaults.height)]
                                         if workload != "mixed" else sizes, args.steps, seed=seed)

    def use(scheduler: str) -> None:
        dep.router.scheduling = scheduler

    mixed_sizes = TINY_MIXED if args.tiny else REALISTIC_SIZES

    try:
        t_bench = time.perf_counter()
        for scheduler in schedulers:  # warm both paths (and every size of the workloads) before measuring
            use(scheduler)
            for workload in workloads:
                await closed_loop(send, maker(workload, 99), args.concurrency, args.warmup)
                # and a request alone (of each size for mixed): a batch of one is a shape of its own (unwarmed, the
                # first lone 512^2 requests under whole-batch scheduling averaged 1.009 s against 0.55 s under load
                # on an H200, tree 4602d3d)
                sizes = mixed_sizes if workload == "mixed" else [None]
                for size in sizes:
                    one = maker(workload, 98) if size is None else \
                        RequestMaker.for_workload("varied", config, [size], args.steps, seed=98)
                    await closed_loop(send, one, 1, 1)
        first.take()
        for workload in workloads:
            out: dict = {"lone": {}, "saturation": {}, "open_loop": []}
            by_size: dict[str, dict[str, float]] = {}  # "WxH" -> scheduler -> mean lone latency
            for scheduler in schedulers:
                use(scheduler)
                res, el = await closed_loop(send, maker(workload, 7), 1, args.lone)
                out["lone"][scheduler] = {**stats(res, el), **first.take()}
                if workload == "mixed":
                    for w, h in mixed_sizes:
                        one = RequestMaker.for_workload("varied", config, [(w, h)], args.steps, seed=7)
                        res, _ = await closed_loop(send, one, 1, args.lone)
                        lat = [r.latency_s for r in res if r.ok]
                        by_size.setdefault(f"{w}x{h}", {})[scheduler] = round(sum(lat) / len(lat), 4) if lat else None
                    first.take()
                res, el = await closed_loop(send, maker(workload, 11), args.concurrency, args.saturation)
                out["saturation"][scheduler] = {**stats(res, el), **first.take()}
                log.info("%s %s: lone %.3fs, saturation %.3f img/s", workload, scheduler,
                         out["lone"][scheduler]["latency_mean_s"], out["saturation"][scheduler]["throughput_img_s"])
            ref = (reference or {}).get("workloads", {}).get(workload)
            if ref is not None:  # the reference's arrivals: the same rates and seeds, so phases pair one to one
                capacity = ref["capacity_img_s"]
                for size, v in ref.get("lone_by_size", {}).items():
                    by_size.setdefault(size, {}).update({f"reference-{k}": x for k, x in v.items()})
            else:
                capacity = out["saturation"]["batch"]["throughput_img_s"]
            out["capacity_img_s"] = capacity
            # a lone request's latency: the lower of the two schedulers' (as per size for mixed, own_lone), not
            # whole-batch scheduling's, the higher of the two at 1024^2 (1.09 against 1.02 s on one H100, a7e65de)
            lone = min([v["latency_mean_s"] for v in out["lone"].values() if v.get("latency_mean_s")]
                       + [v for v in [(ref or {}).get("target", {}).get("lone_latency_s")] if v], default=None)
            for k, load in enumerate(loads):
                rate = load * capacity
                for scheduler in schedulers:
                    use(scheduler)
                    res, el = await open_loop(send, maker(workload, 100 + k), rate, n=args.requests, seed=k)
                    row = {"load": load, "rate_rps": round(rate, 4), "scheduler": scheduler, **stats(res, el),
                           **first.take()}
                    if by_size:
                        row.update(own_lone(res, by_size, row["latency_mean_s"]))
                    services = [min((v for v in by_size.get(f"{r.width}x{r.height}", {}).values() if v),
                                    default=lone) for r in res]
                    if lone and all(services):
                        row.update(fcfs_reference(rate, k, services))
                    out["open_loop"].append(row)
                    log.info("%s %s load %.2f (%.3f/s): mean %.3fs p95 %.3fs; a FCFS server of lone latencies: "
                             "%.3fs on these arrivals, %.3fs expected (these arrivals at percentile %.2f)", workload,
                             scheduler, load, rate, row["latency_mean_s"], row["latency_p95_s"],
                             row.get("fcfs_mean_s", 0), row.get("fcfs_expected_mean_s", 0),
                             row.get("arrivals_percentile", 0))
            at80 = {r["scheduler"]: r["latency_mean_s"] for r in out["open_loop"] if abs(r["load"] - 0.8) < 1e-9}
            if by_size:
                out["lone_by_size"] = by_size
            out["target"] = {"lone_latency_s": lone,
                             "mean_at_80_over_lone": {s: round(v / lone, 3) for s, v in at80.items()} if lone else {},
                             # a mix of sizes: over the mean lone latency of the phase's own requests' sizes
                             "mean_at_80_over_own_lone": {r["scheduler"]: r["mean_over_lone"] for r in out["open_loop"]
                                                          if abs(r["load"] - 0.8) < 1e-9 and "mean_over_lone" in r},
                             "saturation_over_capacity": {
                                 s: round(v["throughput_img_s"] / capacity, 3) for s, v in out["saturation"].items()}
                             if capacity else {}}
            if ref is not None:
                out["against_reference"] = against(out, ref)
            report["workloads"][workload] = out
        report["bench_s"] = round(time.perf_counter() - t_bench, 1)
        health = await dep.replica_health()
        report["compiles_after_ready"] = {rid: h.compiles_after_ready for rid, h in health.items()
                                          if not isinstance(h, str)}
    finally:
        await dep.shutdown()
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["workloads"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        w = report["workloads"][name]
        for scheduler, color in (("batch", "tab:red"), ("step", "tab:blue")):
            if scheduler not in w["saturation"]:
                continue
            rows = [r for r in w["open_loop"] if r["scheduler"] == scheduler]
            xs = [r["load"] for r in rows]
            ax.plot(xs, [r["latency_mean_s"] for r in rows], "o-", color=color, label=f"{scheduler}: mean")
            ax.plot(xs, [r["latency_p95_s"] for r in rows], "s:", color=color, label=f"{scheduler}: p95")
        lone = w["target"]["lone_latency_s"]
        ax.axhline(lone, color="gray", ls="--", lw=1, label="lone request")
        ax.axhline(1.5 * lone, color="black", ls="--", lw=1, label="1.5x lone (target at 80%)")
        ax.set_xlabel(f"load (fraction of {w['capacity_img_s']:.2f} img/s, whole-batch saturation)")
        ax.set_ylabel("latency (s)")
        sat = w["saturation"]
        ax.set_title(f"{name}: saturation " + ", ".join(f"{s} {v['throughput_img_s']:.2f}" for s, v in sat.items())
                     + " img/s", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"step-level vs whole-batch scheduling on {report.get('card')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None, help="deployment YAML (default: the embedded CPU config)")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a config field")
    p.add_argument("--tiny", action="store_true", help="the toy model at toy sizes on the CPU (checks the script)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--workload", default="uniform,mixed",
                   help="uniform (the default size), mixed, or WxH (that size, prompts of 3 to 160 words)")
    p.add_argument("--schedulers", default="batch,step", help="router.scheduling values to measure")
    p.add_argument("--reference", default=None,
                   help="another run's step_batching.json: its capacities (so the same arrival rates and seeds) and "
                   "its whole-batch rows, against which this run's rows are given as ratios")
    p.add_argument("--loads", default="0.5,0.8,0.95", help="open-loop rates as fractions of measured capacity")
    p.add_argument("--requests", type=int, default=12, help="requests per open-loop phase")
    p.add_argument("--lone", type=int, default=3, help="requests of the lone-latency phase")
    p.add_argument("--saturation", type=int, default=16, help="requests of the saturation phase")
    p.add_argument("--concurrency", type=int, default=8, help="clients of the saturation phase")
    p.add_argument("--warmup", type=int, default=4, help="warm-up requests per scheduler and workload")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the config's)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = asyncio.run(run(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_batching.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "step_batching.png")
    for name, w in report["workloads"].items():
        print(f"{name}: capacity {w['capacity_img_s']} img/s, lone {w['target']['lone_latency_s']}s, "
              f"mean@80%/lone {w['target']['mean_at_80_over_lone']}, "
              f"mean@80%/own sizes' lone {w['target']['mean_at_80_over_own_lone'] or '-'}, "
              f"saturation/capacity {w['target']['saturation_over_capacity']}")
        if "against_reference" in w:
            print(f"  against the reference's whole-batch rows: {json.dumps(w['against_reference'])}")
        for r in w["open_loop"]:
            print(f"  {r['scheduler']:5s} load {r['load']:.2f}: mean {r['latency_mean_s']:.3f}s "
                  f"p95 {r['latency_p95_s']:.3f}s failed {r['failed']}; FCFS of lone latencies "
                  f"{r.get('fcfs_mean_s', '-')}s on these arrivals, {r.get('fcfs_expected_mean_s', '-')}s expected "
                  f"(arrivals at percentile {r.get('arrivals_percentile', '-')})")
    print(f"wrote {out / 'step_batching.json'} and {out / 'step_batching.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
