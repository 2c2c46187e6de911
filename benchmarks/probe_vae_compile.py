"""The VAE decoder compiled per size (one static graph each, as the engine compiled it before 5cfb2b1) against one graph
with dynamic height and width: what each costs at start-up (the first decode of each size: dynamo's trace, the inductor
cache, cuDNN's algorithm search) and per decode afterwards, at the warm-up sizes and at two sizes no warm-up covers.

    python3 benchmarks/probe_vae_compile.py OUT.json [--cache DIR] [--rounds 2]
    python3 benchmarks/probe_vae_compile.py OUT.json --tiny   # the tiny VAE on the CPU, eager only (checks the script)

Round 1 fills the compile cache (cold unless DIR already holds these graphs), round 2 starts from a reset dynamo with
the cache warm: its first decodes are what a restarted replica pays. Images are one sample each, bf16, channels-last,
as the engine decodes them (``actors/engine.py`` ``decode_one``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WARMUP_SIZES = [(1024, 1024), (512, 512), (768, 1344), (1344, 768), (1024, 768)]
OTHER_SIZES = [(1152, 896), (640, 1536)]  # not in the warm-up: static graphs would compile (or run eager) here


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--cache", default="/tmp/zc-vae-probe")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()

    import torch
    from diffusers import AutoencoderKL

    from actors.compile_cache import enable_compile_cache
    from actors.models import FULL_VAE_CONFIG, TINY_VAE_CONFIG

    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    sizes = WARMUP_SIZES + OTHER_SIZES if cuda else [(64, 64), (64, 96)]
    torch.backends.cudnn.benchmark = True
    with torch.device(device):
        vae = AutoencoderKL(**(FULL_VAE_CONFIG if cuda else TINY_VAE_CONFIG)).to(dtype).eval().requires_grad_(False)
    vae.to(memory_format=torch.channels_last)
    eager_decoder = vae.decoder
    if cuda:
        enable_compile_cache(Path(args.cache))
    import torch._dynamo
    from torch._dynamo.utils import counters

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def decode(w: int, h: int) -> float:
        lat = torch.randn(1, 16, h // 8, w // 8, device=device, dtype=dtype)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            vae.decode(lat, return_dict=False)
        sync()
        return time.perf_counter() - t0

    report: dict = {"card": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                    "sizes": [f"{w}x{h}" for w, h in sizes], "modes": {}}
    modes = ["eager", "static", "dynamic"] if cuda else ["eager"]
    for rnd in range(1, args.rounds + 1):
        for mode in modes:
            torch._dynamo.reset()
            graphs0 = counters["stats"]["unique_graphs"]
            vae.decoder = eager_decoder if mode == "eager" else torch.compile(eager_decoder,
                                                                              dynamic=mode == "dynamic")
            first, steady = {}, {}
            for w, h in (WARMUP_SIZES if mode == "static" else sizes):  # static: outside them it would compile again
                first[f"{w}x{h}"] = round(decode(w, h), 3)
                steady[f"{w}x{h}"] = round(statistics.median(decode(w, h) for _ in range(args.repeats)), 4)
            entry = {"first_s": first, "first_total_s": round(sum(first.values()), 2), "decode_s": steady,
                     "graphs": counters["stats"]["unique_graphs"] - graphs0}
            report["modes"].setdefault(mode, {})[f"round{rnd}"] = entry
            print(f"round {rnd} {mode}: first decodes {entry['first_total_s']} s, graphs {entry['graphs']}, "
                  f"decode s {steady}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
