"""``zimage-orch bench CONFIG``: load generator, side-by-side baseline, JSON and a plot.

- Closed loop at each concurrency C (C clients, each sending its next request when the last returns), or an open
  loop at a fixed request rate (Poisson arrivals); fixed or mixed sizes; N requests or T seconds; warm-up excluded.
- Workloads (``--workload``, each a phase on the same warm deployment): ``uniform`` (the short bench prompts at
  ``--sizes``), ``varied`` (prompts of 3 to 160 words at ``--sizes``), ``mixed`` (prompts of 3 to 160 words and
  five common sizes: 512x512, 1024x1024, 1024x768, 768x1344, 1344x768) - what real users send.
- Through the Python API (the deployment runs in this process's Ray driver) or through HTTP (``--http URL``).
- ``--baseline``: the seed's recipe in the same run: a plain diffusers ``ZImagePipeline`` in this process on one
  device, batch 1, sequential, same model source and prompts. Every result is also reported as a ratio to it.
- Reports images/s and megapixels/s, p50/p95/p99 latency, queue time, batch sizes, per-replica busy fraction, peak
  memory per device, and the graphs each replica compiled after it became ready (the goal is none).
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
from functools import lru_cache
from pathlib import Path

from .bench_sizes import MENU_MP, bucket_stats, draw_size, phase_tflop_s
from .config import Config, load_config
from .messages import ImageResult
from .prompts import PROMPTS, varied_prompt  # noqa: F401 - PROMPTS is part of this module's interface

log = logging.getLogger(__name__)

REALISTIC_SIZES = [(512, 512), (1024, 1024), (1024, 768), (768, 1344), (1344, 768)]
WORKLOADS = ("uniform", "varied", "mixed", "random", "random-1mp",
             "img2img", "inpaint", "edit-mix", "control", "control-mix")
EDIT_KINDS = {"img2img": ("img2img",), "inpaint": ("inpaint",), "edit-mix": ("t2i", "img2img", "inpaint"),
              "control": ("control",), "control-mix": ("t2i", "control")}


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
    # seconds the devices stood idle before a batch took them, summed over the phase's batches (each replica's
    # first batch of the phase left out: its gap is the pause before the phase), by cause: "encoding" (the batch
    # was at the replica, its encode not done) and "starved" (no batch had reached the replica); whole-batch calls
    # without stage pipelining only (StageTimes.idle_encoding_s, idle_starved_s)
    device_idle_s: dict[str, float] = field(default_factory=dict)
    # every batch of the phase in dispatch order: its replica, size and stage seconds (with the
    # idle time before it), so a phase's slow batches show apart from its typical one
    batch_stages: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    workload: str = "uniform"
    # closed loop: images/s between the concurrency-th completion and the last (the ramp-up's first round of
    # requests and its start-up excluded), beside the whole phase's; None where the phase is too short for it
    steady_img_s: float | None = None
    # the phase's arithmetic per second (orchestrator/bench_sizes.py request_tflop) and, per size bucket, latency
    # and seconds per PFLOP: how well the GPU is used whatever the sizes (set where the steps are known)
    tflop_s: float | None = None
    size_buckets: dict[str, dict] = field(default_factory=dict)


def _batch_record(r: ImageResult) -> dict:
    st = r.stage_times
    rec = {"batch": r.batch_id, "replica": r.replica_id, "size": r.batch_size}
    for name in ("encode_s", "denoise_s", "decode_s", "total_s", "device_wait_s", "idle_encoding_s",
                 "idle_starved_s"):
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
        for name in ("encode_s", "image_encode_s", "denoise_s", "decode_s", "total_s", "device_wait_s"):
            stage[name] = round(percentile([getattr(b.stage_times, name) for b in batches.values()], 0.5), 4)
    firsts = {min(b.batch_id for b in batches.values() if b.replica_id == rid)
              for rid in {b.replica_id for b in batches.values()}}
    later = [b.stage_times for b in batches.values() if b.batch_id not in firsts]
    idle = {"encoding": round(sum(t.idle_encoding_s for t in later), 4),
            "starved": round(sum(t.idle_starved_s for t in later), 4)} if later else {}
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
        device_idle_s=idle,
        batch_stages=[_batch_record(b) for b in sorted(batches.values(), key=lambda b: b.batch_id)],
        errors=sorted({f"{r.error_type}: {r.error}" for r in results if not r.ok})[:5],
        workload=workload,
        tflop_s=phase_tflop_s(results, elapsed, steps) if steps else None,
        size_buckets=bucket_stats(results, steps, percentile) if steps else {},
    )


# ---- load generators -------------------------------------------------------------------------------------------
class RequestMaker:
    """Deterministic request stream: seed i, size drawn from ``sizes`` (mixed when several), prompt i of the
    bench prompts, or with ``varied`` a prompt of 3 to 160 words."""

    def __init__(self, config: Config | None, sizes: list[tuple[int, int]] | None, steps: int | None, seed: int = 0,
                 varied: bool = False, edits: tuple[str, ...] = (), strength: float = 0.6,
                 edit_steps: int | None = None, draw=None):
        self.config = config
        self.draw = draw  # rng -> (width, height): a new size per request (the random workloads)
        self.sizes = sizes  # None: let the server choose (its default size)
        self.steps = steps
        self.varied = varied
        self.edits = edits  # edit workloads: the kinds sent in turn (t2i, img2img, inpaint)
        self.strength = strength
        self.edit_steps = edit_steps
        self.rng = random.Random(seed)
        self.i = 0

    @classmethod
    def for_workload(cls, workload: str, config, sizes, steps, seed: int = 0, strength: float = 0.6,
                     edit_steps: int | None = None) -> RequestMaker:
        if workload == "mixed":
            return cls(config, sizes if sizes and len(sizes) > 1 else REALISTIC_SIZES, steps, seed, varied=True)
        if workload in ("random", "random-1mp"):
            max_pixels = config.limits.max_pixels if config is not None else 2048 * 2048
            area = MENU_MP if workload == "random-1mp" else None
            return cls(config, None, steps, seed, varied=True,
                       draw=lambda rng: draw_size(rng, max_pixels, area))
        if workload in EDIT_KINDS:
            if not sizes and config is not None:
                sizes = [(config.defaults.width, config.defaults.height)]
            return cls(config, sizes, steps, seed, edits=EDIT_KINDS[workload], strength=strength,
                       edit_steps=edit_steps)
        return cls(config, sizes, steps, seed, varied=workload == "varied")

    def params(self) -> dict:
        w = h = None
        if self.draw is not None:
            w, h = self.draw(self.rng)
        elif self.sizes:
            w, h = self.sizes[0] if len(self.sizes) == 1 else self.rng.choice(self.sizes)
        self.i += 1
        prompt = varied_prompt(self.rng) if self.varied else PROMPTS[self.i % len(PROMPTS)]
        p = {"prompt": prompt, "width": w, "height": h, "seed": self.i, "num_inference_steps": self.steps}
        kind = self.edits[self.i % len(self.edits)] if self.edits else "t2i"
        if kind == "control":  # text-to-image guided by a ControlNet (needs model.controlnet)
            p.update(kind=kind, control_image=edit_inputs(w, h)[0])
        elif kind != "t2i":
            image, mask = edit_inputs(w, h)
            p.update(kind=kind, image=image, mask=mask if kind == "inpaint" else None, strength=self.strength,
                     num_inference_steps=self.edit_steps or self.steps)
        return p


@lru_cache(maxsize=8)
def edit_inputs(width: int, height: int):
    """A synthetic input image for edit workloads (smooth gradients and rings: something a VAE encodes like a
    photo) and an inpainting mask (RGBA, transparent over the middle quarter), as uint8 arrays."""
    import numpy as np

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = np.hypot(x - width / 2, y - height / 2)
    image = np.stack([255 * x / width, 255 * y / height, 127.5 + 127.5 * np.sin(r / 23)], -1).astype(np.uint8)
    mask = np.full((height, width, 4), 255, np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4, 3] = 0
    return image, mask


@lru_cache(maxsize=8)
def _data_url(width: int, height: int) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(_png_of(width, height, 0)).decode()


@lru_cache(maxsize=16)
def _png_of(width: int, height: int, which: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(edit_inputs(width, height)[which]).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


async def closed_loop(send, maker: RequestMaker, concurrency: int, n: int, bar=None,
                      done_at: list[float] | None = None) -> tuple[list, float]:
    """``n`` requests from ``concurrency`` clients, each sending its next as its last returns; ``done_at`` (if given)
    collects each completion's time from the start, in completion order."""
    results: list = []
    remaining = [n]

    async def client():
        while remaining[0] > 0:
            remaining[0] -= 1
            results.append(await send(maker.params()))
            if done_at is not None:
                done_at.append(time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


def steady_throughput(done_at: list[float], concurrency: int) -> float | None:
    """Completions per second between the ``concurrency``-th completion and the last: a closed loop's rate once
    every client has had one answer, without the first round's start-up and with the drain's tail only at its end.
    None when fewer than ``2 * concurrency`` requests completed."""
    if len(done_at) < 2 * concurrency or concurrency < 1:
        return None
    span = done_at[-1] - done_at[concurrency - 1]
    return round((len(done_at) - concurrency) / span, 4) if span > 0 else None


def poisson_gaps(rate: float, seed: int):
    """The gaps between Poisson arrivals at ``rate`` per second, from ``seed``: ``open_loop`` waits each one after a
    send, so the same seed gives the same arrivals (``poisson_arrivals``)."""
    rng = random.Random(seed)
    while True:
        yield rng.expovariate(rate)


def poisson_arrivals(rate: float, n: int, seed: int) -> list[float]:
    """The send times ``open_loop(rate, n=n, seed=seed)`` aims at: the first at 0, then ``poisson_gaps``'s."""
    gaps = poisson_gaps(rate, seed)
    out, t = [], 0.0
    for _ in range(n):
        out.append(t)
        t += next(gaps)
    return out


async def open_loop(send, maker: RequestMaker, rate: float, duration: float | None = None, bar=None,
                    n: int | None = None, seed: int = 1) -> tuple[list, float]:
    """Poisson arrivals at ``rate`` per second (``poisson_gaps`` from ``seed``: the same arrivals for the same seed)
    for ``duration`` seconds and/or ``n`` requests; returns the results and the seconds from the first send to the
    last answer."""
    gaps = poisson_gaps(rate, seed)
    tasks = []
    t0 = time.perf_counter()
    while (n is None or len(tasks) < n) and (duration is None or time.perf_counter() - t0 < duration):
        tasks.append(asyncio.ensure_future(send(maker.params())))
        if bar is not None:
            tasks[-1].add_done_callback(lambda _: bar.update(1))
        await asyncio.sleep(next(gaps))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - t0


# ---- senders: Python API and HTTP ------------------------------------------------------------------------------
def api_sender(dep):
    kinds: dict[str, str] = {}  # request id -> t2i / img2img / inpaint, for mixed_batches

    async def send(p: dict) -> ImageResult:
        edit = {k: p[k] for k in ("image", "mask", "strength", "control_image") if p.get(k) is not None}
        (req,) = await dep.build_requests([p["prompt"]], width=p["width"], height=p["height"], seed=p["seed"],
                                          num_inference_steps=p["num_inference_steps"], **edit)
        kinds[req.request_id] = p.get("kind", "t2i")
        try:
            return await dep.submit(req)
        except Exception as e:  # noqa: BLE001 - rejections count as failures in the stats
            return ImageResult(req.request_id, ok=False, error=str(e), error_type=type(e).__name__)

    send.kinds = kinds
    return send


def mixed_batches(results: list[ImageResult], kinds: dict[str, str]) -> dict[str, int]:
    """How many batches of a run held each combination of request kinds (e.g. ``img2img+t2i``): whether edits
    shared packed batches with text-to-image."""
    by_batch: dict[int, set] = {}
    for r in results:
        if r.ok and r.request_id in kinds:
            by_batch.setdefault(r.batch_id, set()).add(kinds[r.request_id])
    out: dict[str, int] = {}
    for ks in by_batch.values():
        key = "+".join(sorted(ks))
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def http_sender(client, url: str, api_key: str | None):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def send(p: dict) -> ImageResult:
        body = {"prompt": p["prompt"], "seed": p["seed"]}
        if p["width"]:  # else the server's default size
            body["size"] = f"{p['width']}x{p['height']}"
        if p["num_inference_steps"]:
            body["num_inference_steps"] = p["num_inference_steps"]
        t0 = time.perf_counter()
        try:
            if p.get("image") is not None:  # an edit: multipart, the synthetic image (and mask) as PNG files
                w, h = p["width"], p["height"]
                files = [("image", ("image.png", _png_of(w, h, 0), "image/png"))]
                if p.get("mask") is not None:
                    files.append(("mask", ("mask.png", _png_of(w, h, 1), "image/png")))
                data = {k: str(v) for k, v in {**body, "strength": p["strength"]}.items()}
                r = await client.post(f"{url}/v1/images/edits", data=data, files=files, headers=headers)
            else:
                if p.get("control_image") is not None:
                    body["control_image"] = _data_url(p["width"], p["height"])
                r = await client.post(f"{url}/v1/images/generations", json=body, headers=headers)
        except Exception as e:  # noqa: BLE001
            return ImageResult("http", ok=False, error=str(e), error_type=type(e).__name__)
        lat = time.perf_counter() - t0
        if r.status_code != 200:
            return ImageResult("http", ok=False, error=r.text[:200], error_type=str(r.status_code), latency_s=lat)
        w, h = _png_size(r.json()["data"][0].get("b64_json") or "")
        return ImageResult("http", ok=True, batch_id=-1, latency_s=lat, width=w, height=h)

    return send


async def server_batch_counts(client, url: str, api_key: str | None = None) -> dict[float, float]:
    """The server's ``zimage_batch_size`` histogram (cumulative count per upper bound) from its /metrics (which
    needs the key when the server has keys)."""
    from prometheus_client.parser import text_string_to_metric_families

    r = await client.get(f"{url}/metrics", headers={"Authorization": f"Bearer {api_key}"} if api_key else None)
    r.raise_for_status()
    out: dict[float, float] = {}
    for family in text_string_to_metric_families(r.text):
        if family.name == "zimage_batch_size":
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    out[float(sample.labels["le"])] = sample.value
    return out


def batch_size_delta(before: dict[float, float], after: dict[float, float]) -> dict[str, int]:
    """Batches dispatched between two scrapes, by size (a bucket's range where buckets are wider than 1)."""
    sizes: dict[str, int] = {}
    prev_le, prev_n = 0.0, 0.0
    for le in sorted(after):
        n = after[le] - before.get(le, 0.0)
        if n - prev_n > 0:
            lo = int(prev_le) + 1
            key = "+Inf" if le == float("inf") else (str(int(le)) if lo >= int(le) else f"{lo}-{int(le)}")
            sizes[key] = int(n - prev_n)
        prev_le, prev_n = le, n
    return sizes


def _png_size(b64: str) -> tuple[int, int]:
    """(width, height) from a base64 PNG's header (IHDR), without decoding the image."""
    import base64
    import struct

    head = base64.b64decode(b64[:44] + "=" * (-len(b64[:44]) % 4))
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n":
        return 0, 0
    return struct.unpack(">II", head[16:24])


# ---- baseline: the seed's recipe -------------------------------------------------------------------------------
def run_baseline(config: Config, sizes: list[tuple[int, int]], n: int, warmup: int, steps: int | None) -> dict:
    """Plain ``ZImagePipeline`` on one device, batch 1, sequential; returns stats per size. Frees its memory."""
    import gc

    import torch
    from diffusers import ZImagePipeline

    from actors.loading import load_components, resolve_dtype

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
            def one(i, w=w, h=h):
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

    server_defaults = bool(args.http and not args.config and not args.sizes)
    sizes = None if server_defaults else parse_sizes(args.sizes, config)
    workloads = [w.strip() for w in (args.workload or "uniform").split(",")]
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad:
        raise SystemExit(f"--workload: unknown {bad}; choose from {', '.join(WORKLOADS)}")
    conc = [int(c) for c in args.concurrency.split(",")] if args.concurrency else [1]
    edit_opts = {"strength": getattr(args, "strength", 0.6), "edit_steps": getattr(args, "edit_steps", None)}
    makers = {w: RequestMaker.for_workload(w, config, sizes, args.steps, seed=args.seed + i, **edit_opts)
              for i, w in enumerate(workloads)}
    steps = args.steps or (config.defaults.num_inference_steps if config is not None else None)
    all_sizes = sorted({s for m in makers.values() for s in (m.sizes or [])})
    report: dict = {"command": "zimage-orch " + " ".join(args.argv), "config": args.config, **_environment(),
                    "sizes": [f"{w}x{h}" for w, h in all_sizes] or ["server default"], "workloads": workloads,
                    "runs": []}
    if args.baseline:
        log.info("baseline: plain ZImagePipeline, batch 1, sequential, %d image(s) per size", args.baseline_requests)
        report["baseline"] = run_baseline(config, all_sizes, args.baseline_requests, 1, args.steps)

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
        # where the start-up went: the deployment's phases, and each replica's own (ReplicaHealth.startup_s)
        report["startup_phases_s"] = {k: round(v, 2) for k, v in dep.startup_s.items()}
        log.info("ready in %.1fs: %s; replicas: %s", report["startup_s"], report["startup_phases_s"],
                 {rid: h.startup_s for rid, h in dep.health.items()})
        report["plan"] = dep.plan.to_dict()
        report["replicas"] = {rid: {"device_map": h.device_map, "dtype": h.dtype, "load_s": round(h.load_s, 2),
                                    "warmup_s": round(h.warmup_s, 2), "numerics": h.numerics,
                                    "compiles_warmup": h.compiles_warmup, "startup_s": h.startup_s}
                              for rid, h in dep.health.items()}
        send = api_sender(dep)
    try:
        if args.warmup:  # the last workload's traffic: the widest mix when mixed is among them
            await closed_loop(send, RequestMaker.for_workload(workloads[-1], config, sizes, args.steps, seed=99,
                                                              **edit_opts), max(conc), args.warmup)
        runs = [("rate", args.rate)] if args.rate else [("concurrency", c) for c in conc]
        rounds = max(1, getattr(args, "repeat", 1) or 1)
        for rnd, workload in ((r, w) for r in range(1, rounds + 1) for w in workloads):
            maker = makers[workload]
            for kind, value in runs:
                n = args.requests if kind == "concurrency" else None
                label = f"{workload}-{'c' if kind == 'concurrency' else 'rate'}{value}"
                if rounds > 1:
                    label += f"-r{rnd}"
                before = None if client is None else await server_batch_counts(client, args.http.rstrip("/"),
                                                                               args.api_key)
                with tqdm(total=n, desc=label, unit="img") as bar:
                    if kind == "concurrency":
                        done_at: list[float] = []
                        results, elapsed = await closed_loop(send, maker, value, args.requests, bar, done_at)
                        stats = summarize(label, results, elapsed, concurrency=value, workload=workload,
                                          steps=steps)
                        stats.steady_img_s = steady_throughput(done_at, value)
                    else:
                        results, elapsed = await open_loop(send, maker, value, args.duration, bar)
                        stats = summarize(label, results, elapsed, rate=value, workload=workload, steps=steps)
                if before is not None:  # over HTTP the responses carry no batch ids: ask the server
                    after = await server_batch_counts(client, args.http.rstrip("/"), args.api_key)
                    stats.batch_sizes = batch_size_delta(before, after)
                report["runs"].append({**asdict(stats), "round": rnd})
                if workload in EDIT_KINDS and getattr(send, "kinds", None) is not None:
                    report["runs"][-1]["batches_by_kinds"] = mixed_batches(results, send.kinds)
                log.info("%s: %.3f img/s, %.3f MP/s, p50 %.3fs, p95 %.3fs, p99 %.3fs, batches %s, stages p50 %s, "
                         "devices idle before batches %s", stats.label, stats.throughput_img_s, stats.megapixels_s,
                         stats.latency_p50_s, stats.latency_p95_s, stats.latency_p99_s, stats.batch_sizes,
                         stats.stage_p50_s, stats.device_idle_s or "-")
        if dep is not None:
            health = await dep.replica_health()
            report["peak_memory_gib"] = {
                rid: {d: round(b / 2**30, 2) for d, b in h.peak_memory_bytes.items()}
                for rid, h in health.items() if not isinstance(h, str)}
            report["compiles_after_ready"] = {rid: h.compiles_after_ready for rid, h in health.items()
                                              if not isinstance(h, str)}
            report["eager_fallbacks"] = {rid: h.eager_fallbacks for rid, h in health.items()
                                         if not isinstance(h, str)}
    finally:
        if dep is not None:
            await dep.shutdown()
        if client is not None:
            await client.aclose()
    _ratios(report, makers)
    phase_ratios(report)
    return report


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


def cmd_bench(args) -> int:
    import sys

    if args.matrix:
        from .matrix import list_matrix, run_matrix

        if args.list or not args.run:
            return list_matrix(args.matrix)
        return run_matrix(args.matrix, args.run, args.out, dry_run=args.dry_run, lanes=args.lanes)

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
    for phase, v in report.get("phase_ratios", {}).items():
        print(f"{phase}: MP/s vs uniform over {len(v['per_round'])} rounds: mean {v['mean']:.4f}, min {v['min']:.4f}, "
              f"max {v['max']:.4f} ({', '.join(f'{x:.4f}' for x in v['per_round'])})")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return 0 if all(r["failed"] == 0 for r in report["runs"]) else 1


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
