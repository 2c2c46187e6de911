"""``zimage-orch bench CONFIG``: load generator, side-by-side baseline, JSON and a plot.

- Closed loop at each concurrency C (C clients, each sending its next request when the last returns), or an open
  loop at a fixed request rate (Poisson arrivals); fixed or mixed sizes; N requests or T seconds; warm-up excluded.
- Through the Python API (the deployment runs in this process's Ray driver) or through HTTP (``--http URL``).
- ``--baseline``: the seed's recipe in the same run: a plain diffusers ``ZImagePipeline`` in this process on one
  device, batch 1, sequential, same model source and prompts. Every result is also reported as a ratio to it.
- Reports images/s, p50/p95/p99 latency, queue time, batch sizes, per-replica busy fraction, peak memory per device.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import random
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import Config, load_config
from .messages import ImageResult

log = logging.getLogger(__name__)

PROMPTS = [
    "a photograph of an astronaut riding a horse on mars, cinematic lighting",
    "a watercolor painting of a quiet harbor town at dawn, soft pastel colors",
    "a close-up portrait of an elderly fisherman with a weathered face, 85mm lens",
    "a futuristic city skyline at night with flying cars and neon signs in the rain",
    "a bowl of steaming ramen with a soft boiled egg, studio food photography",
    "an isometric illustration of a cozy library with floating books and warm lamps",
    "a red fox curled up asleep in fresh snow under a pine tree, morning light",
    "a vintage poster for a steam train journey through snowy mountains",
]


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
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float
    queue_p50_s: float
    queue_p95_s: float
    batch_sizes: dict[str, int] = field(default_factory=dict)
    replica_busy_fraction: dict[str, float] = field(default_factory=dict)
    stage_p50_s: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def summarize(label: str, results: list[ImageResult], elapsed: float, concurrency=None, rate=None) -> RunStats:
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
        for name in ("encode_s", "denoise_s", "decode_s", "total_s"):
            stage[name] = round(percentile([getattr(b.stage_times, name) for b in batches.values()], 0.5), 4)
    return RunStats(
        label=label, concurrency=concurrency, rate_rps=rate, requests=len(results), images=len(ok),
        failed=len(results) - len(ok), elapsed_s=round(elapsed, 3),
        throughput_img_s=round(len(ok) / elapsed, 4) if elapsed > 0 else 0.0,
        latency_p50_s=round(percentile(lat, 0.5), 4), latency_p95_s=round(percentile(lat, 0.95), 4),
        latency_p99_s=round(percentile(lat, 0.99), 4), queue_p50_s=round(percentile(queue, 0.5), 4),
        queue_p95_s=round(percentile(queue, 0.95), 4),
        batch_sizes=dict(sorted(sizes.items(), key=lambda kv: int(kv[0]))),
        replica_busy_fraction={k: round(v / elapsed, 3) for k, v in sorted(busy.items())} if elapsed else {},
        stage_p50_s=stage,
        errors=sorted({f"{r.error_type}: {r.error}" for r in results if not r.ok})[:5],
    )


# ---- load generators -------------------------------------------------------------------------------------------
class RequestMaker:
    """Deterministic request stream: prompt i, seed i, size drawn from ``sizes`` (mixed when several)."""

    def __init__(self, config: Config, sizes: list[tuple[int, int]], steps: int | None, seed: int = 0):
        self.config = config
        self.sizes = sizes
        self.steps = steps
        self.rng = random.Random(seed)
        self.i = 0

    def params(self) -> dict:
        w, h = self.sizes[0] if len(self.sizes) == 1 else self.rng.choice(self.sizes)
        self.i += 1
        return {"prompt": PROMPTS[self.i % len(PROMPTS)], "width": w, "height": h, "seed": self.i,
                "num_inference_steps": self.steps}


async def closed_loop(send, maker: RequestMaker, concurrency: int, n: int, bar=None) -> tuple[list, float]:
    results: list = []
    remaining = [n]

    async def client():
        while remaining[0] > 0:
            remaining[0] -= 1
            results.append(await send(maker.params()))
            if bar is not None:
                bar.update(1)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


async def open_loop(send, maker: RequestMaker, rate: float, duration: float, bar=None) -> tuple[list, float]:
    rng = random.Random(1)
    tasks = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < duration:
        tasks.append(asyncio.ensure_future(send(maker.params())))
        if bar is not None:
            tasks[-1].add_done_callback(lambda _: bar.update(1))
        await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - t0


# ---- senders: Python API and HTTP ------------------------------------------------------------------------------
def api_sender(dep):
    async def send(p: dict) -> ImageResult:
        (req,) = dep.requests_for(p["prompt"], width=p["width"], height=p["height"], seed=p["seed"],
                                  num_inference_steps=p["num_inference_steps"])
        try:
            return await dep.submit(req)
        except Exception as e:  # noqa: BLE001 - rejections count as failures in the stats
            return ImageResult(req.request_id, ok=False, error=str(e), error_type=type(e).__name__)

    return send


def http_sender(client, url: str, api_key: str | None):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def send(p: dict) -> ImageResult:
        body = {"prompt": p["prompt"], "size": f"{p['width']}x{p['height']}", "seed": p["seed"]}
        if p["num_inference_steps"]:
            body["num_inference_steps"] = p["num_inference_steps"]
        t0 = time.perf_counter()
        try:
            r = await client.post(f"{url}/v1/images/generations", json=body, headers=headers)
        except Exception as e:  # noqa: BLE001
            return ImageResult("http", ok=False, error=str(e), error_type=type(e).__name__)
        lat = time.perf_counter() - t0
        if r.status_code != 200:
            return ImageResult("http", ok=False, error=r.text[:200], error_type=str(r.status_code), latency_s=lat)
        return ImageResult("http", ok=True, batch_id=-1, latency_s=lat)

    return send


# ---- baseline: the seed's recipe -------------------------------------------------------------------------------
def run_baseline(config: Config, sizes: list[tuple[int, int]], n: int, warmup: int, steps: int | None) -> dict:
    """Plain ``ZImagePipeline`` on one device, batch 1, sequential; returns stats per size. Frees its memory."""
    import gc

    import torch

    from actors.loading import load_components, resolve_dtype
    from diffusers import ZImagePipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(config.model.dtype, device)
    comps, _, load_s = load_components(config.model, dtype, dict.fromkeys(("transformer", "text_encoder", "vae"),
                                                                       device))
    pipe = ZImagePipeline(**comps).to(device)
    pipe.set_progress_bar_config(disable=True)
    steps = steps or config.defaults.num_inference_steps
    out = {"device": device, "dtype": str(dtype).removeprefix("torch."), "load_s": round(load_s, 2), "sizes": {}}
    try:
        for w, h in sizes:
            def one(i):
                pipe(PROMPTS[i % len(PROMPTS)], height=h, width=w, num_inference_steps=steps,
                     guidance_scale=config.defaults.guidance_scale,
                     generator=torch.Generator(device).manual_seed(i))

            for i in range(warmup):
                one(i)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for i in range(n):
                t0 = time.perf_counter()
                one(i)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            out["sizes"][f"{w}x{h}"] = {
                "images": n, "latency_p50_s": round(percentile(times, 0.5), 4),
                "throughput_img_s": round(n / sum(times), 4), "peak_memory_gib": round(peak, 2) if peak else None}
    finally:
        pipe = comps = None  # noqa: F841 - drop the references so the memory can go
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


# ---- the command -----------------------------------------------------------------------------------------------
def _environment() -> dict:
    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    # ZIMAGE_COMMIT first: a copied tree (the GPU machine's) may carry a stale .git or none.
    env["commit"] = os.environ.get("ZIMAGE_COMMIT")
    if not env["commit"]:
        try:
            env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            env["commit"] = None
    try:
        import torch

        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["card"] = torch.cuda.get_device_name(0)
            env["gpus"] = torch.cuda.device_count()
        else:
            env["card"] = "cpu"
    except ImportError:
        env["card"] = "unknown"
    return env


def parse_sizes(text: str | None, config: Config) -> list[tuple[int, int]]:
    from .requests import parse_size

    if not text:
        return [(config.defaults.width, config.defaults.height)]
    return [parse_size(s, config.defaults) for s in text.split(",")]


async def _bench(args, config: Config) -> dict:
    from tqdm import tqdm

    sizes = parse_sizes(args.sizes, config)
    conc = [int(c) for c in args.concurrency.split(",")] if args.concurrency else [1]
    report: dict = {"command": "zimage-orch " + " ".join(args.argv), "config": args.config, **_environment(),
                    "sizes": [f"{w}x{h}" for w, h in sizes], "runs": []}
    if args.baseline:
        log.info("baseline: plain ZImagePipeline, batch 1, sequential, %d image(s) per size", args.baseline_requests)
        report["baseline"] = run_baseline(config, sizes, args.baseline_requests, 1, args.steps)

    dep = None
    client = None
    if args.http:
        import httpx

        client = httpx.AsyncClient(timeout=config.router.request_timeout_s + 30)
        send = http_sender(client, args.http.rstrip("/"), args.api_key)
    else:
        from .deployment import Deployment

        t0 = time.perf_counter()
        dep = await Deployment.start(config)
        report["startup_s"] = round(time.perf_counter() - t0, 2)
        report["plan"] = dep.plan.to_dict()
        report["replicas"] = {rid: {"device_map": h.device_map, "dtype": h.dtype, "load_s": round(h.load_s, 2),
                                    "warmup_s": round(h.warmup_s, 2), "numerics": h.numerics}
                              for rid, h in dep.health.items()}
        send = api_sender(dep)
    try:
        maker = RequestMaker(config, sizes, args.steps)
        if args.warmup:
            await closed_loop(send, maker, max(conc), args.warmup)
        runs = [("rate", args.rate)] if args.rate else [("concurrency", c) for c in conc]
        for kind, value in runs:
            n = args.requests if kind == "concurrency" else None
            with tqdm(total=n, desc=f"{kind} {value}", unit="img") as bar:
                if kind == "concurrency":
                    results, elapsed = await closed_loop(send, maker, value, args.requests, bar)
                    stats = summarize(f"c{value}", results, elapsed, concurrency=value)
                else:
                    results, elapsed = await open_loop(send, maker, value, args.duration, bar)
                    stats = summarize(f"rate{value}", results, elapsed, rate=value)
            report["runs"].append(asdict(stats))
            log.info("%s: %.3f img/s, p50 %.3fs, p95 %.3fs, batches %s", stats.label, stats.throughput_img_s,
                     stats.latency_p50_s, stats.latency_p95_s, stats.batch_sizes)
        if dep is not None:
            health = await dep.replica_health()
            report["peak_memory_gib"] = {
                rid: {d: round(b / 2**30, 2) for d, b in h.peak_memory_bytes.items()}
                for rid, h in health.items() if not isinstance(h, str)}
    finally:
        if dep is not None:
            await dep.shutdown()
        if client is not None:
            await client.aclose()
    _ratios(report)
    return report


def _ratios(report: dict) -> None:
    base = report.get("baseline", {}).get("sizes", {})
    if not base or len(report["sizes"]) != 1:
        return
    b = base[report["sizes"][0]]
    for run in report["runs"]:
        run["throughput_vs_baseline"] = round(run["throughput_img_s"] / b["throughput_img_s"], 3)
        run["latency_p50_vs_baseline"] = round(run["latency_p50_s"] / b["latency_p50_s"], 3)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if r["concurrency"] is not None]
    fig, ax1 = plt.subplots(figsize=(7, 4.5))
    xs = [r["concurrency"] for r in runs]
    ax1.plot(xs, [r["throughput_img_s"] for r in runs], "o-", color="tab:blue", label="orchestrator img/s")
    base = report.get("baseline", {}).get("sizes", {})
    if base and len(report["sizes"]) == 1:
        ax1.axhline(base[report["sizes"][0]]["throughput_img_s"], color="tab:blue", ls="--",
                    label="plain diffusers bs1 img/s")
    ax1.set_xlabel("concurrency (closed loop)")
    ax1.set_ylabel("images / s", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(xs, [r["latency_p50_s"] for r in runs], "s-", color="tab:red", label="p50 latency")
    ax2.plot(xs, [r["latency_p95_s"] for r in runs], "^:", color="tab:red", label="p95 latency")
    ax2.set_ylabel("latency (s)", color="tab:red")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax1.set_title(f"{report.get('config') or 'embedded default'} on {report.get('card')} "
                  f"({', '.join(report['sizes'])})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_bench(args) -> int:
    import sys

    args.argv = sys.argv[2:] if len(sys.argv) > 2 else []
    config = load_config(args.config, args.set)
    report = asyncio.run(_bench(args, config))
    report["label"] = args.label
    report["overrides"] = args.set
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "bench.png")
    _print_table(report)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return 0 if all(r["failed"] == 0 for r in report["runs"]) else 1


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{report.get('card')} · {', '.join(report['sizes'])} · commit {report.get('commit')}")
    for col in ("run", "img/s", "x baseline", "p50 s", "p95 s", "queue p50 s", "batches", "busy"):
        t.add_column(col)
    for size, b in report.get("baseline", {}).get("sizes", {}).items():
        t.add_row(f"diffusers bs1 {size}", f"{b['throughput_img_s']:.3f}", "1.00", f"{b['latency_p50_s']:.3f}",
                  "", "", "", "")
    for r in report["runs"]:
        t.add_row(r["label"], f"{r['throughput_img_s']:.3f}", f"{r.get('throughput_vs_baseline', '')}",
                  f"{r['latency_p50_s']:.3f}", f"{r['latency_p95_s']:.3f}", f"{r['queue_p50_s']:.3f}",
                  json.dumps(r["batch_sizes"]), json.dumps(r["replica_busy_fraction"]))
    Console(width=160).print(t)
