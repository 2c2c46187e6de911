"""What ``zimage-orch bench`` reports: each phase's statistics (``RunStats``, ``summarize``), the ratios between
phases and to the plain-diffusers baseline, and the outputs: ``bench.json``, the plot ``bench.png`` and a table.

matplotlib (the plot) is the ``bench`` extra's, imported only when the plot is drawn: without it the JSON and the
table are still written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from zimage_common.messages import ImageResult

from .sizes import bucket_stats, phase_tflop_s

BENCH_EXTRA = "pip install 'zimage-orchestrator[bench]'"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class RunStats:
    label: str
    concurrency: int | None
    rate_rps: float | None
    requests: int
    images: int
    failed: int
    elapsed_s: float
    throughput_img_s: float
    megapixels_s: float
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float
    queue_p50_s: float
    queue_p95_s: float
    batch_sizes: dict[str, int] = field(default_factory=dict)
    replica_busy_fraction: dict[str, float] = field(default_factory=dict)
    stage_p50_s: dict[str, float] = field(default_factory=dict)
    # every batch of the phase in dispatch order: its replica, size and stage seconds, so a phase's slow batches show
    # apart from its typical one
    batch_stages: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    workload: str = "uniform"
    # closed loop: images/s between the concurrency-th completion and the last (the ramp-up's first round of
    # requests and its start-up excluded), beside the whole phase's; None where the phase is too short for it
    steady_img_s: float | None = None
    # the phase's arithmetic per second (orchestrator/benchmark/sizes.py request_tflop) and, per size bucket, latency
    # and seconds per PFLOP: how well the GPU is used whatever the sizes (set where the steps are known)
    tflop_s: float | None = None
    size_buckets: dict[str, dict] = field(default_factory=dict)


def _batch_record(r: ImageResult) -> dict:
    st = r.stage_times
    rec = {"batch": r.batch_id, "replica": r.replica_id, "size": r.batch_size}
    for name in ("encode_s", "denoise_s", "decode_s", "total_s"):
        rec[name] = round(getattr(st, name), 4)
    return rec


def summarize(label: str, results: list[ImageResult], elapsed: float, concurrency=None, rate=None,
              workload: str = "uniform", steps: int | None = None) -> RunStats:
    ok = [r for r in results if r.ok]
    lat = [r.latency_s for r in ok]
    queue = [r.queue_s for r in ok]
    batches: dict[int, ImageResult] = {}
    for r in ok:
        batches.setdefault(r.batch_id, r)
    sizes: dict[str, int] = {}
    busy: dict[str, float] = {}
    for r in batches.values():
        sizes[str(r.batch_size)] = sizes.get(str(r.batch_size), 0) + 1
        busy[r.replica_id] = busy.get(r.replica_id, 0.0) + r.stage_times.total_s
    stage = {}
    if batches:
        for name in ("encode_s", "image_encode_s", "denoise_s", "decode_s", "total_s"):
            stage[name] = round(percentile([getattr(b.stage_times, name) for b in batches.values()], 0.5), 4)
    return RunStats(
        label=label, concurrency=concurrency, rate_rps=rate, requests=len(results), images=len(ok),
        failed=len(results) - len(ok), elapsed_s=round(elapsed, 3),
        throughput_img_s=round(len(ok) / elapsed, 4) if elapsed > 0 else 0.0,
        megapixels_s=round(sum(r.width * r.height for r in ok) / 1e6 / elapsed, 4) if elapsed > 0 else 0.0,
        latency_p50_s=round(percentile(lat, 0.5), 4), latency_p95_s=round(percentile(lat, 0.95), 4),
        latency_p99_s=round(percentile(lat, 0.99), 4), queue_p50_s=round(percentile(queue, 0.5), 4),
        queue_p95_s=round(percentile(queue, 0.95), 4),
        batch_sizes=dict(sorted(sizes.items(), key=lambda kv: int(kv[0]))),
        replica_busy_fraction={k: round(v / elapsed, 3) for k, v in sorted(busy.items())} if elapsed else {},
        stage_p50_s=stage,
        batch_stages=[_batch_record(b) for b in sorted(batches.values(), key=lambda b: b.batch_id)],
        errors=sorted({f"{r.error_type}: {r.error}" for r in results if not r.ok})[:5],
        workload=workload,
        tflop_s=phase_tflop_s(results, elapsed, steps) if steps else None,
        size_buckets=bucket_stats(results, steps, percentile) if steps else {},
    )


def phase_ratios(report: dict) -> None:
    """Each phase's megapixels/s over the uniform phase's of the same round and concurrency (or rate)
    (``megapixels_vs_uniform``: the realistic-traffic targets), and with several rounds (``--repeat``) per phase
    and concurrency the ratio's mean, min and max over them (``phase_ratios``): one phase is one draw, and these
    ratios moved by several points between runs (docs/benchmarks-history.md)."""
    uniform = {(r.get("round", 1), r["concurrency"], r["rate_rps"]): r["megapixels_s"]
               for r in report["runs"] if r.get("workload") == "uniform"}
    uniform_tflop = {(r.get("round", 1), r["concurrency"], r["rate_rps"]): r.get("tflop_s")
                     for r in report["runs"] if r.get("workload") == "uniform"}
    spread: dict[str, list[float]] = {}
    for r in report["runs"]:
        base = uniform.get((r.get("round", 1), r["concurrency"], r["rate_rps"]))
        if not base or r.get("workload") == "uniform":
            continue
        r["megapixels_vs_uniform"] = round(r["megapixels_s"] / base, 4)
        base_tflop = uniform_tflop.get((r.get("round", 1), r["concurrency"], r["rate_rps"]))
        if base_tflop and r.get("tflop_s"):
            r["tflop_vs_uniform"] = round(r["tflop_s"] / base_tflop, 4)
        key = f"{r['workload']}-{'c' + str(r['concurrency']) if r['concurrency'] else 'rate' + str(r['rate_rps'])}"
        spread.setdefault(key, []).append(r["megapixels_vs_uniform"])
    if any(len(v) > 1 for v in spread.values()):
        report["phase_ratios"] = {k: {"per_round": v, "mean": round(sum(v) / len(v), 4), "min": min(v), "max": max(v)}
                                  for k, v in spread.items()}


def _ratios(report: dict, makers: dict | None = None) -> None:
    """Each run against plain diffusers on the same traffic: the baseline's time per image at each size, weighted
    by the sizes the run's workload draws (one size: that size's baseline)."""
    base = report.get("baseline", {}).get("sizes", {})
    if not base:
        return
    for run in report["runs"]:
        maker = (makers or {}).get(run.get("workload", "uniform"))
        sizes = [f"{w}x{h}" for w, h in (maker.sizes if maker and maker.sizes else [])] or report["sizes"]
        if not all(s in base for s in sizes):
            continue
        per_img = sum(1 / base[s]["throughput_img_s"] for s in sizes) / len(sizes)
        mpix = sum(int(s.split("x")[0]) * int(s.split("x")[1]) for s in sizes) / len(sizes) / 1e6
        run["baseline_img_s"] = round(1 / per_img, 4)
        run["baseline_megapixels_s"] = round(mpix / per_img, 4)
        run["throughput_vs_baseline"] = round(run["throughput_img_s"] * per_img, 3)
        run["megapixels_vs_baseline"] = round(run["megapixels_s"] / (mpix / per_img), 3)
        if len(sizes) == 1:
            run["latency_p50_vs_baseline"] = round(run["latency_p50_s"] / base[sizes[0]]["latency_p50_s"], 3)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if r["concurrency"] is not None and r.get("round", 1) == 1]  # --repeat: 1st
    fig, ax1 = plt.subplots(figsize=(7, 4.5))
    ax2 = ax1.twinx()
    for k, workload in enumerate(dict.fromkeys(r.get("workload", "uniform") for r in runs)):
        rs = [r for r in runs if r.get("workload", "uniform") == workload]
        xs = [r["concurrency"] for r in rs]
        marks = "osd^v"[k % 5]
        ax1.plot(xs, [r["megapixels_s"] for r in rs], marks + "-", color="tab:blue", label=f"{workload} MP/s")
        ax2.plot(xs, [r["latency_p95_s"] for r in rs], marks + ":", color="tab:red", label=f"{workload} p95")
    base = report.get("baseline", {}).get("sizes", {})
    if base and len(report["sizes"]) == 1:
        w, h = (int(v) for v in report["sizes"][0].split("x"))
        ax1.axhline(base[report["sizes"][0]]["throughput_img_s"] * w * h / 1e6, color="tab:blue", ls="--",
                    label="plain diffusers bs1 MP/s")
    ax1.set_xlabel("concurrency (closed loop)")
    ax1.set_ylabel("megapixels / s", color="tab:blue")
    ax2.set_ylabel("p95 latency (s)", color="tab:red")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax1.set_title(f"{report.get('config') or 'embedded default'} on {report.get('card')} "
                  f"({', '.join(report['sizes'])})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    """``bench.json``, ``bench.png`` (where matplotlib is installed: the ``bench`` extra) and the table; the
    phase ratios over rounds (``--repeat``) as lines."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    try:
        plot(report, out / "bench.png")
        plotted = True
    except ModuleNotFoundError as e:
        if e.name != "matplotlib" and not (e.name or "").startswith("matplotlib."):
            raise
        plotted = False
    _print_table(report)
    for phase, v in report.get("phase_ratios", {}).items():
        print(f"{phase}: MP/s vs uniform over {len(v['per_round'])} rounds: mean {v['mean']:.4f}, min {v['min']:.4f}, "
              f"max {v['max']:.4f} ({', '.join(f'{x:.4f}' for x in v['per_round'])})")
    if plotted:
        print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    else:
        print(f"wrote {out / 'bench.json'}; no bench.png: the plot needs matplotlib ({BENCH_EXTRA})")


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{report.get('card')} · {', '.join(report['sizes'])} · commit {report.get('commit')}")
    for col in ("run", "img/s", "MP/s", "MP/s vs uniform", "TFLOP/s vs uniform", "x baseline", "p50 s", "p95 s",
                "p99 s", "queue p50 s",
                "batches", "busy"):
        t.add_column(col)
    for size, b in report.get("baseline", {}).get("sizes", {}).items():
        t.add_row(f"diffusers bs1 {size}", f"{b['throughput_img_s']:.3f}", "", "", "", "1.00",
                  f"{b['latency_p50_s']:.3f}", "", "", "", "", "")
    for r in report["runs"]:
        t.add_row(r["label"], f"{r['throughput_img_s']:.3f}", f"{r['megapixels_s']:.3f}",
                  f"{r.get('megapixels_vs_uniform', '')}", f"{r.get('tflop_vs_uniform', '')}",
                  f"{r.get('throughput_vs_baseline', '')}",
                  f"{r['latency_p50_s']:.3f}", f"{r['latency_p95_s']:.3f}",
                  f"{r['latency_p99_s']:.3f}", f"{r['queue_p50_s']:.3f}",
                  json.dumps(r["batch_sizes"]), json.dumps(r["replica_busy_fraction"]))
    Console(width=160).print(t)
