"""One replica in the probe's own process (no Ray, no router), made from a config and ``--set`` overrides, for the
probe scripts (run as ``python3 benchmarks/<script>.py``, which puts this folder on sys.path; they put the
repository root there before importing this)."""

from __future__ import annotations

import argparse
import time

from zimage_common.config import Config, load_config

TINY = ["model.source=tiny", "model.dtype=float32", "defaults.width=64", "defaults.height=64",
        "defaults.num_inference_steps=3"]


def add_replica_args(p: argparse.ArgumentParser) -> None:
    """The arguments every such probe takes: its output file, the config, overrides, and ``--tiny`` (the toy model
    on the CPU, which checks the script only)."""
    p.add_argument("out")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    p.add_argument("--tiny", action="store_true")


def start_replica(args: argparse.Namespace):
    """``(config, worker, seconds to ready)``: a ``PipelineWorker`` as a deployment would make it, warmed up at
    the config's default size."""
    from actors.worker import PipelineWorker, WarmupSpec

    cfg: Config = load_config(args.config, (TINY if args.tiny else []) + list(args.set))
    w, h = cfg.defaults.width, cfg.defaults.height
    worker = PipelineWorker("probe", cfg.model, warmup=WarmupSpec(((w, h),), min(2, cfg.defaults.num_inference_steps),
                                                   cfg.limits.max_pixels, cfg.router.max_batch_tokens,
                                                   cfg.router.max_batch_size),
                            torch_threads=cfg.deployment.torch_threads, max_batch_tokens=cfg.router.max_batch_tokens,
                            max_batch_size=cfg.router.max_batch_size)
    t0 = time.perf_counter()
    worker.start()
    return cfg, worker, time.perf_counter() - t0


def report_head(cfg: Config, startup_s: float, **extra) -> dict:
    """The top of a probe's JSON report: its command, date, commit (``ZIMAGE_COMMIT`` where the tree's .git is
    stale), torch, card, the replica's seconds to ready, the default size and step count, ``extra``, and an empty
    ``phases`` for the probe to fill."""
    import sys

    from orchestrator.benchmark.run import _environment

    return {"command": " ".join(sys.argv), **_environment(), "startup_s": round(startup_s, 1),
            "size": f"{cfg.defaults.width}x{cfg.defaults.height}", "steps": cfg.defaults.num_inference_steps,
            **extra, "phases": {}}
