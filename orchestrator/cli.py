"""``zimage-orch``: demo, generate, batch, validate, plan, serve, bench, pool."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path

from zimage_common.config import Config, load_config
from zimage_common.errors import InvalidRequestError, ZImageError

from .cli_args import at_least, int_list, port, positive_float

log = logging.getLogger("zimage")

DEMO_PROMPTS = [
    "a red fox in fresh snow, morning light",
    "a lighthouse on a cliff during a storm",
    "a bowl of ramen, studio photograph",
    "an astronaut reading a newspaper on the moon",
    "a watercolor map of an imaginary island",
    "a steam train crossing a stone bridge",
    "a cat wearing a tiny wizard hat",
    "neon street market at night, rain",
    "a field of sunflowers under a purple sky",
    "a paper boat on a puddle, macro photo",
    "an old library with floating books",
    "a robot gardener watering tomatoes",
    "a snowy mountain cabin with warm windows",
    "a koi pond seen from above",
    "a hot air balloon over a desert canyon",
    "a sketch of a hummingbird in flight",
]


def _quiet_libraries(log_format: str = "text") -> None:
    """Environment for Ray and the model libraries; set before Ray is imported (Ray reads these at import)."""
    from zimage_common.logging_setup import RAY_DEDUP_ALLOW

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Ray's deduplication of worker lines would merge different replicas' lines (and lose request ids): never for
    # our lines.
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", RAY_DEDUP_ALLOW)
    if log_format == "json":
        # Forwarded replica lines without Ray's "(PipelineWorker pid=...)" prefix, so each line is one JSON object.
        os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


# ---- demo / generate -------------------------------------------------------------------------------------------
async def _run_prompts(config: Config, prompts: list[str], out: Path, params: dict, label: str) -> dict:
    from tqdm import tqdm

    from .deployment import Deployment

    t_start = time.perf_counter()
    dep = await Deployment.start(config)
    t_ready = time.perf_counter()
    try:
        requests = await dep.build_requests(prompts, **params)
        t0 = time.perf_counter()
        with tqdm(total=len(requests), desc=label, unit="img") as bar:

            async def one(req):
                res = await dep.submit(req)
                bar.update(1)
                return res

            results = await asyncio.gather(*(one(r) for r in requests))
        elapsed = time.perf_counter() - t0
    finally:
        await dep.shutdown()
    from .benchmark.report import summarize

    for i, r in enumerate(results):
        if r.ok:
            (out / f"{i:03d}-seed{r.seed}.png").write_bytes(r.png)
    stats = summarize(label, results, elapsed)
    per_replica = dict(Counter(r.replica_id for r in results if r.ok))
    summary = {
        "images": stats.images,
        "failed": stats.failed,
        "errors": stats.errors,
        "replicas_used": sorted(per_replica),
        "images_per_replica": per_replica,
        "batches": sum(stats.batch_sizes.values()),
        "batch_sizes": sorted((int(s) for s, n in stats.batch_sizes.items() for _ in range(n)), reverse=True),
        "throughput_img_s": stats.throughput_img_s,
        "latency_p50_s": stats.latency_p50_s,
        "latency_p95_s": stats.latency_p95_s,
        "queue_p50_s": stats.queue_p50_s,
        "elapsed_s": stats.elapsed_s,
        "startup_s": round(t_ready - t_start, 3),
        "size": f"{requests[0].width}x{requests[0].height}" if requests else None,
        "num_inference_steps": requests[0].num_inference_steps if requests else None,
        "model_source": config.model.source,
        "plan": dep.plan.to_dict() if dep.plan else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def cmd_demo(args) -> int:
    config = load_config(args.config, args.set)
    prompts = (DEMO_PROMPTS * ((args.images + len(DEMO_PROMPTS) - 1) // len(DEMO_PROMPTS)))[: args.images]
    return _run_and_report(config, prompts, Path(args.out), {"seed": args.seed}, "demo")


def cmd_generate(args) -> int:
    config = load_config(args.config, args.set)
    from .requests import parse_size

    width, height = parse_size(args.size, config.defaults)
    params = {"n": args.n, "width": width, "height": height, "seed": args.seed,
              "num_inference_steps": args.steps, "guidance_scale": args.guidance,
              "negative_prompt": args.negative_prompt}
    needs = [(args.mask, "--mask", "--image"), (args.strength is not None, "--strength", "--image"),
             (args.control_scale is not None, "--control-scale", "--control-image")]
    for given, option, needed in needs:
        if given and not (args.image if needed == "--image" else args.control_image):
            raise InvalidRequestError(f"{option} needs {needed}", param=option)
    if args.negative_prompt is not None and not (args.guidance if args.guidance is not None
                                                 else config.defaults.guidance_scale):
        log.warning("--negative-prompt has no effect at guidance 0 (Z-Image-Turbo's default); pass --guidance too")
    # Every input file read and its header checked before the deployment starts (minutes of model loading on a
    # GPU), the errors naming the option: a wrong path or a file that is no image fails at once.
    files = _read_inputs(config, {"--image": args.image, "--mask": [args.mask] if args.mask else [],
                                  "--control-image": [args.control_image] if args.control_image else []})
    if args.image:  # an edit: img2img, or inpainting with --mask (orchestrator/image_input.py has the rules)
        if args.size is None:
            params["width"] = params["height"] = None  # the first image's own size
        params.update(image=files["--image"], mask=(files["--mask"] or [None])[0], strength=args.strength)
    if args.control_image:  # ControlNet (needs model.controlnet in the config)
        params.update(control_image=files["--control-image"][0], controlnet_conditioning_scale=args.control_scale)
    return _run_and_report(config, list(args.prompt), Path(args.out), params, "generate")


def _read_inputs(config: Config, paths: dict[str, list[str]]) -> dict[str, list[bytes]]:
    """The bytes of the files each option names, each file's header checked as an upload's is (readable, an image
    of a format the service takes, within ``limits``; nothing decoded), the errors naming the option."""
    from .image_input import file_bytes, stored_pixels

    out = {}
    for param, names in paths.items():
        out[param] = [file_bytes(name, param) for name in names]
        for data in out[param]:
            stored_pixels(data, param, config.limits)
    return out


def _run_and_report(config: Config, prompts: list[str], out: Path, params: dict, label: str) -> int:
    from .cli_args import output_dir
    from .deployment import check_bf16_blocks, requests_for

    # Everything that can be checked without a deployment is, before one starts (minutes of model loading on a
    # GPU): the model options, each prompt's requests under the config (the largest side the plan can place and
    # the adapters the replicas know are checked once it has started), then the output directory.
    check_bf16_blocks(config.model)
    for prompt in prompts:
        requests_for(config, prompt, **params)
    output_dir(out)
    summary = asyncio.run(_run_prompts(config, prompts, out, params, label))
    print(
        f"\n{summary['images']} image(s) in {summary['elapsed_s']:.2f}s "
        f"({summary['throughput_img_s']:.2f} img/s), p50 latency {summary['latency_p50_s']:.2f}s, "
        f"replicas used {summary['replicas_used']}, batch sizes {summary['batch_sizes']}"
    )
    if summary["failed"]:
        print(f"{summary['failed']} request(s) failed: {summary['errors']}", file=sys.stderr)
    print(f"images and summary.json in {out}/")
    return 0 if summary["failed"] == 0 else 1


# ---- validate / plan -------------------------------------------------------------------------------------------
def cmd_validate(args) -> int:
    for path in args.paths:
        try:
            cfg = load_config(path, args.set)
            from .deployment import check_bf16_blocks, plan_for

            check_bf16_blocks(cfg.model)
            inv = planning_inventory(cfg)
            if inv is not None:
                plan_for(cfg, inv)
        except (ZImageError, ValueError) as e:
            msg = str(e)
            print(f"INVALID {msg if msg.startswith(str(Path(path))) else f'{path}: {msg}'}", file=sys.stderr)
            return 1
        print(f"ok      {path}")
    return 0


def planning_inventory(cfg):
    """The inventory a config declares for planning without Ray: ``cluster.nodes``, else the local Ray's
    ``cluster.num_gpus`` (as start-up makes it); None when it declares neither. ``validate`` and ``plan`` both plan
    with it, so one never passes what the other refuses."""
    from placement import Inventory

    from .deployment import declared_inventory

    inv = declared_inventory(cfg)
    if inv is None and cfg.cluster.num_gpus:
        inv = Inventory.from_nodes([("local", cfg.cluster.num_gpus, cfg.cluster.gpu_memory_gib or 24.0)])
    return inv


def cmd_plan(args) -> int:
    from placement import PlacementError

    from .deployment import plan_for

    cfg = load_config(args.config, args.set)
    inv = planning_inventory(cfg)
    if inv is None:
        print(f"{args.config}: cluster.nodes (or cluster.num_gpus, at least 1) must be set to plan without Ray",
              file=sys.stderr)
        return 2
    try:
        p = plan_for(cfg, inv)
    except PlacementError as e:
        print(f"{args.config}: cannot place: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(p.to_dict(), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"{args.config}: mode {p.mode}, {p.model} at {p.width}x{p.height}")
    for col in ("node", "gpu", "components", "est. peak GiB", "capacity GiB"):
        t.add_column(col)
    precision = dict(p.precisions)
    for g in p.gpus:
        comps = [f"{c} ({precision.get(c.split('.', 1)[1], '?')})" for c in g.components]
        peak = f"{g.estimated_peak_gib:.1f}"
        if g.load_peak_gib > g.estimated_peak_gib:  # quantized on the device after loading in bf16
            peak += f" (start-up {g.load_peak_gib:.1f})"
        t.add_row(g.node, str(g.gpu), ", ".join(comps) or "-", peak, f"{g.capacity_gib:.1f}")
    console.print(t)
    t = Table(title="replicas")
    for col in ("replica", "node", "gpus", "device map", "token budget", "max batch", "largest image"):
        t.add_column(col)
    for r in p.replicas:
        side = int(r.max_pixels**0.5) // 16 * 16
        t.add_row(r.replica_id, r.node, str(list(r.gpus)),
                  _device_map_text(r.device_map) + (f" (te shared from {r.encoder_replica})"
                                                     if r.encoder_replica else ""), f"{r.max_batch_tokens:,}",
                  f"{r.max_batch_size} at {p.width}x{p.height}",
                  f"{r.max_pixels / 1e6:.1f} MP (~{side}x{side})")
    console.print(t)
    for n in p.notes:
        console.print(f"note: {n}")
    return 0


def _device_map_text(device_map: dict[str, int]) -> str:
    if len(device_map) == 3 and len(set(device_map.values())) == 1:
        return f"all on {next(iter(device_map.values()))}"
    short = {"text_encoder": "te", "transformer": "dit", "vae": "vae"}
    return " ".join(f"{short[c]}:{i}" for c, i in device_map.items())


# ---- entry point -----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zimage-orch", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--log-format", choices=("text", "json"),
                    default=(os.environ.get("ZIMAGE_LOG_FORMAT") or "text").lower(),
                    help="log lines as text or as one JSON object per line, replicas included (default: "
                         "$ZIMAGE_LOG_FORMAT or text)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="serve a set of prompts through two replicas of the tiny model on a local Ray")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--config", default=None, help="config file (default: the embedded local-CPU default)")
    p.add_argument("--images", type=at_least(1), default=16)
    p.add_argument("--seed", type=at_least(0), default=1234)
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a config field")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("generate", help="generate images for prompts with a config")
    p.add_argument("--config", default=None)
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--n", type=at_least(1), default=1)
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the config's defaults)")
    p.add_argument("--seed", type=at_least(0), default=None)
    p.add_argument("--steps", type=at_least(1), default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="edit this image (img2img; repeat for several, each edited on its own); without --size the "
                   "output has the first image's size")
    p.add_argument("--mask", default=None, metavar="PNG", help="inpaint: the mask's transparent pixels are repainted")
    p.add_argument("--strength", type=float, default=None, help="0-1: how much of the schedule runs (edits)")
    p.add_argument("--control-image", default=None, metavar="FILE",
                   help="ControlNet control image (needs model.controlnet), resized to the output size")
    p.add_argument("--control-scale", type=float, default=None, help="controlnet_conditioning_scale (default: the "
                   "config's model.controlnet.conditioning_scale)")
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a config field")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("validate", help="validate config files; exit non-zero on the first bad one")
    p.add_argument("paths", nargs="+")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="override a config field in every file before checking it (as serve and bench take it)")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("plan", help="print the placement plan of a config (no Ray, no GPU needed)")
    p.add_argument("config")
    p.add_argument("--json", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a config field")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("serve", help="start the deployment and the OpenAI-compatible HTTP server")
    p.add_argument("config", nargs="?", default=None, help="config file (default: the embedded local-CPU one)")
    p.add_argument("--host", default=None, help="bind address (default: server.host, 127.0.0.1)")
    p.add_argument("--port", type=port, default=None, help="port (default: server.port, 8000)")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a config field")
    p.set_defaults(fn=lambda a: _lazy("server").cmd_serve(a))

    p = sub.add_parser("bench", help="benchmark a deployment (and plain diffusers side by side)")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("--concurrency", type=int_list(1), default="1,4", help="closed-loop concurrencies, comma-separated")
    p.add_argument("--rate", type=positive_float, default=None, help="open loop: requests per second (Poisson)")
    p.add_argument("--duration", type=positive_float, default=30.0, help="open loop: seconds")
    p.add_argument("--requests", type=at_least(1), default=16, help="closed loop: requests per concurrency level")
    p.add_argument("--repeat", type=at_least(1), default=1, metavar="N",
                   help="run the --workload phases N times in turn on the same deployment (uniform, varied, "
                   "uniform, varied, ...), new requests each round; reports each phase's MP/s against the uniform "
                   "phase of its round, and the mean and spread of that ratio over the rounds")
    p.add_argument("--warmup", type=at_least(0), default=4, help="requests sent first and not counted")
    p.add_argument("--sizes", default=None, help="WxH[,WxH...]: one size, or a mix drawn at random (default: the "
                   "config's default size; with --http and no config, the server's)")
    p.add_argument("--workload", default=None,
                   help="phases on the same deployment, comma-separated: uniform (short bench prompts), varied "
                   "(prompts of 3-160 words), mixed (3-160 words and five common sizes), random (3-160 words and a "
                   "new size per request over the whole allowed range: 256-2048 px a side, aspect 1:3 to 3:1, within "
                   "limits.max_pixels), random-1mp (the same at 0.75-1.25 MP: an app's aspect-ratio menu), img2img and "
                   "inpaint "
                   "(edits of a synthetic input image at --sizes), edit-mix (text-to-image, img2img and inpaint "
                   "interleaved), control and control-mix (text-to-image with a ControlNet control image, alone and "
                   "beside plain requests; needs model.controlnet); default uniform")
    p.add_argument("--seed", type=int, default=0,
                   help="the request streams' seed (sizes of the random workloads, prompts, image seeds)")
    p.add_argument("--strength", type=float, default=0.6, help="edit workloads: img2img / inpaint strength")
    p.add_argument("--edit-steps", type=at_least(1), default=None,
                   help="edit workloads: the edits' schedule length (default: --steps); e.g. 15 at strength 0.6 runs "
                   "9 steps, so edits share batches with 9-step text-to-image")
    p.add_argument("--steps", type=at_least(1), default=None, help="denoising steps (default: the config's)")
    p.add_argument("--baseline", action="store_true", help="also time plain diffusers, batch 1, in-process")
    p.add_argument("--baseline-requests", type=at_least(1), default=5)
    p.add_argument("--http", default=None, help="benchmark a running server at this URL instead")
    p.add_argument("--api-key", default=None)
    p.add_argument("--out", default="bench-out", help="directory for bench.json and bench.png")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="override a config field, e.g. --set model.compile=true (repeatable)")
    p.add_argument("--label", default=None, help="a name for this run in the report")
    p.add_argument("--matrix", default=None, metavar="FILE",
                   help="run entries of a benchmark matrix (benchmarks/matrix.yaml) instead: see --run, --list")
    p.add_argument("--run", default=None, metavar="NAMES", help="with --matrix: runs or groups, comma-separated")
    p.add_argument("--list", action="store_true", help="with --matrix: list its runs and groups")
    p.add_argument("--dry-run", action="store_true", help="with --matrix: print the commands only")
    p.add_argument("--lanes", type=at_least(1), default=1, metavar="N",
                   help="with --matrix: run one-GPU entries side by side on N GPUs of this machine, one GPU each")
    p.set_defaults(fn=lambda a: _lazy("benchmark.run").cmd_bench(a))

    _lazy("batch_cli").add_parser(sub)  # `batch`: a resumable batch job (orchestrator/batch_cli.py)
    _lazy("pool_cli").add_parser(sub)  # `pool`: a replica pool shared by front doors (orchestrator/pool_cli.py)
    return ap


def _lazy(name: str):
    import importlib

    return importlib.import_module(f"orchestrator.{name}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_format not in ("text", "json"):
        parser.error(f"ZIMAGE_LOG_FORMAT={args.log_format!r}: use text or json")
    from zimage_common.logging_setup import configure

    # Every line carries the request id it is about (and, from replicas, the replica); json: one object per line.
    # Replicas log in the same format (zimage_common/logging_setup.py).
    configure(args.log_format, logging.DEBUG if args.verbose else logging.INFO)
    _quiet_libraries(args.log_format)
    from placement.planner import PlacementError

    try:
        return args.fn(args)
    except (ZImageError, PlacementError) as e:  # the input's or the config's: one line, never a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
