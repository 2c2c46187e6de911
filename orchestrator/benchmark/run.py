"""``zimage-orch bench CONFIG``: load generator, side-by-side baseline, JSON and a plot.

Closed loops at each concurrency or an open loop (Poisson arrivals), over the workloads of ``loadgen``, through the
Python API or HTTP (``--http URL``); ``--baseline`` times a plain diffusers ``ZImagePipeline`` (batch 1, sequential,
same model and prompts) in the same run, so every result is also a ratio. Reports images/s, megapixels/s,
p50/p95/p99 latency, queue time, batch sizes, busy fractions, peak memory and graphs compiled after ready."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from zimage_common.config import Config, load_config
from zimage_common.errors import InvalidRequestError
from zimage_common.prompts import PROMPTS

from ..cli_args import output_dir
from .loadgen import (
    EDIT_KINDS,
    WORKLOADS,
    RequestMaker,
    api_sender,
    batch_size_delta,
    closed_loop,
    http_sender,
    mixed_batches,
    open_loop,
    server_batch_counts,
    steady_throughput,
)
from .report import _ratios, percentile, phase_ratios, summarize, write_report

log = logging.getLogger(__name__)


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


def parse_sizes(text: str | None, config: Config, check: bool = True) -> list[tuple[int, int]]:
    """``--sizes``' sizes; with ``check``, each refused as a request of that size would be (by this config's
    limits), before anything starts rather than after the deployment is up."""
    from ..requests import build_requests, parse_size

    if not text:
        return [(config.defaults.width, config.defaults.height)]
    sizes = [parse_size(s.strip(), config.defaults) for s in text.split(",")]
    for w, h in sizes if check else ():
        try:
            build_requests("size check", defaults=config.defaults, limits=config.limits, width=w, height=h, seed=0)
        except InvalidRequestError as e:
            raise InvalidRequestError(f"--sizes {w}x{h}: {e}", param="--sizes") from None
    return sizes


async def _bench(args, config: Config) -> dict:
    from tqdm import tqdm

    server_defaults = bool(args.http and not args.config and not args.sizes)
    sizes = None if server_defaults else parse_sizes(args.sizes, config, check=False)  # cmd_bench checked them
    workloads = _workloads(args)
    conc = args.concurrency or [1]
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
        from ..deployment import Deployment

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
                                    "compiles_warmup": h.compiles_warmup, "startup_s": h.startup_s,
                                    "encoder_graphs": h.encoder_graphs}
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
                log.info("%s: %.3f img/s, %.3f MP/s, p50 %.3fs, p95 %.3fs, p99 %.3fs, batches %s, stages p50 %s",
                         stats.label, stats.throughput_img_s, stats.megapixels_s, stats.latency_p50_s,
                         stats.latency_p95_s, stats.latency_p99_s, stats.batch_sizes, stats.stage_p50_s)
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


def _workloads(args) -> list[str]:
    """``--workload``'s phases, each a name of ``WORKLOADS``."""
    names = [w.strip() for w in (args.workload or "uniform").split(",")]
    bad = [w for w in names if w not in WORKLOADS]
    if bad:
        raise InvalidRequestError(f"--workload: unknown {bad}; choose from {', '.join(WORKLOADS)}", param="--workload")
    return names


def cmd_bench(args) -> int:
    import sys

    matrix_only = [o for o, given in (("--run", args.run), ("--list", args.list), ("--dry-run", args.dry_run),
                                      ("--lanes", args.lanes != 1)) if given]
    if matrix_only and not args.matrix:
        raise InvalidRequestError(f"{', '.join(matrix_only)}: only with --matrix FILE", param=matrix_only[0])
    if args.matrix:
        from .matrix import list_matrix, run_matrix

        try:
            if args.list or not args.run:
                return list_matrix(args.matrix)
            return run_matrix(args.matrix, args.run, args.out, dry_run=args.dry_run, lanes=args.lanes)
        except (OSError, ValueError) as e:  # the matrix file or --run: the user's to fix
            print(f"error: {e}", file=sys.stderr)
            return 2

    args.argv = sys.argv[2:] if len(sys.argv) > 2 else []
    config = load_config(args.config, args.set)
    _workloads(args)  # refused before the output directory is made
    if args.sizes and not args.http:  # a server named by --http answers each request by its own limits
        parse_sizes(args.sizes, config)
    output_dir(args.out)  # before the run, not after it: its results would be lost
    try:
        report = asyncio.run(_bench(args, config))
    except Exception as e:
        if args.http and type(e).__module__.startswith("httpx"):  # the server named by --http, not this run
            raise InvalidRequestError(f"--http {args.http}: {type(e).__name__}: {e}", param="--http") from None
        raise
    report["label"] = args.label
    report["overrides"] = args.set
    write_report(report, Path(args.out))
    return 0 if all(r["failed"] == 0 for r in report["runs"]) else 1

