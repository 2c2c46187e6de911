"""Per-request LoRA throughput: batches with a different adapter on every sample against batches with none, in
the same process, alternating, on the same warm (compiled) engine.

    python3 benchmarks/lora_throughput.py --out lora.json                 # one GPU: full-size random weights,
                                                                          # compiled, 1024^2, batches of 4, rank 32
    python3 benchmarks/lora_throughput.py --tiny --out lora-cpu.json      # the CPU smoke run (tiny model, eager)

Weights are random (the real architecture at full size, built on the GPU) and so are the adapters: rank-32
factors on every linear a LoRA can target here (attention q/k/v/out, feed-forward w1/w2/w3, adaLN), generated in
diffusers' own layout (``transformer.<module>.lora_A.weight`` + PEFT metadata); the first goes through a
``.safetensors`` file and diffusers' Z-Image loader, as a registered adapter does. Each timed batch runs the full
engine (encode, 9 denoising steps, decode). Writes one JSON object: per mode the median batch time and img/s, the
denoise stage alone, the ratio of the two modes, graphs compiled after warm-up (should be 0), peak memory, and
two checks on the device: scale 0 against no adapter, and a sample in the mixed batch against its solo run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["a red fox in fresh snow, golden hour, detailed photograph",
           "a lighthouse on a rocky coast at dusk, long exposure, waves",
           "a bowl of ramen on a wooden table, steam, shallow depth of field",
           "an old tram in a narrow street of Lisbon, morning light, film photo"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the toy model on the CPU (smoke run)")
    ap.add_argument("--size", type=int, default=None, help="image side (default 1024; 64 with --tiny)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--adapters", type=int, default=4, help="distinct adapters in every LoRA batch")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--batches", type=int, default=6, help="timed batches per mode")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--fp8", action="store_true", help="fp8 transformer blocks (actors/quantize.py)")
    ap.add_argument("--out", type=Path, default=Path("lora_throughput.json"))
    args = ap.parse_args(argv)

    from actors.engine import Sample, ZImageEngine
    from actors.lora import (
        LoraStore,
        build_adapter,
        factors_from_state_dict,
        random_lora_state_dict,
        save_diffusers_lora,
    )
    from actors.models import build_components

    cuda = torch.cuda.is_available() and not args.tiny
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    size = args.size or (1024 if not args.tiny else 64)
    compile_ = cuda and not args.no_compile
    t0 = time.perf_counter()
    comps = build_components("tiny" if args.tiny else "full", device=dev, dtype=dtype, seed=0)
    devices = dict.fromkeys(("transformer", "text_encoder", "vae"), dev)
    eng = ZImageEngine(comps, devices, dtype)
    if args.fp8:
        from actors.quantize import quantize_fp8

        quantize_fp8(eng.transformer)
    build_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    store = eng.loras = LoraStore(eng.transformer, max_resident=args.adapters, dtype=dtype)
    names = [f"lora-{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        sd, meta = random_lora_state_dict(eng.transformer, args.rank, seed=100 + i, std=0.01)
        if i == 0:  # through a file and diffusers' loader, as a registered adapter
            with tempfile.TemporaryDirectory() as tmp:
                store.add(name, save_diffusers_lora(tmp, sd, meta))
        else:
            store.add_adapter(build_adapter(name, factors_from_state_dict(sd, meta, dtype), eng.transformer))
    adapters_s = time.perf_counter() - t0
    adapter_mib = sum(i["bytes"] for i in store.info()) / len(names) / 2**20

    def batch(loras: bool, seed0: int = 0, scale: float = 1.0):
        return [Sample(PROMPTS[i % len(PROMPTS)], seed0 + i, size, size,
                       loras=((names[i % len(names)], scale),) if loras else ()) for i in range(args.batch)]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def run(samples, steps=args.steps):
        sync()
        t = time.perf_counter()
        images, times = eng.generate(samples, steps)
        sync()
        return images, time.perf_counter() - t, times.denoise_s

    from actors.worker import _graphs_compiled as graphs_compiled

    t0 = time.perf_counter()
    if compile_:
        eng.packed.compile()
    for loras in (False, True):  # compile both graph sets (and a lone sample), as a replica's warm-up does
        run(batch(loras), 2)
        run(batch(loras)[:1], 2)
    warmup_s = time.perf_counter() - t0
    compiled_warmup = graphs_compiled()
    if compile_:
        torch.compiler.set_stance("eager_on_recompile")
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    rows = {"none": [], "mixed": []}
    for k in range(args.batches):
        for mode in (("none", "mixed") if k % 2 == 0 else ("mixed", "none")):  # alternate the order
            _, total, denoise = run(batch(mode == "mixed", seed0=10 * k))
            rows[mode].append((total, denoise))

    # checks on the device: scale 0 == no adapter; sample 0 of a mixed batch vs its solo run
    plain, _, _ = run(batch(False, 7)[:1])
    zero, _, _ = run(batch(True, 7, scale=0.0)[:1])
    mixed, _, _ = run(batch(True, 7))
    solo, _, _ = run(batch(True, 7)[:1])
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "fp8": args.fp8,
        "compiled": compile_, "model": "tiny" if args.tiny else "full-size random weights",
        "size": f"{size}x{size}", "batch": args.batch, "steps": args.steps, "rank": args.rank,
        "adapters_per_batch": args.adapters, "adapter_mib": round(adapter_mib, 1),
        "timed_batches_per_mode": args.batches, "build_s": round(build_s, 1),
        "adapters_load_s": round(adapters_s, 2), "warmup_s": round(warmup_s, 1),
        "graphs_compiled_warmup": compiled_warmup, "graphs_compiled_after_warmup": graphs_compiled() - compiled_warmup,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }
    for mode, r in rows.items():
        total = statistics.median(x[0] for x in r)
        result[mode] = {"batch_s_median": round(total, 4), "img_s": round(args.batch / total, 4),
                        "denoise_s_median": round(statistics.median(x[1] for x in r), 4),
                        "batch_s_all": [round(x[0], 4) for x in r]}
    result["ratio_img_s"] = round(result["mixed"]["img_s"] / result["none"]["img_s"], 4)
    result["ratio_denoise"] = round(result["none"]["denoise_s_median"] / result["mixed"]["denoise_s_median"], 4)
    result["check_scale0_max_abs_diff"] = int(np.abs(plain[0].astype(int) - zero[0].astype(int)).max())
    result["check_mixed_vs_solo_max_abs_diff"] = int(np.abs(mixed[0].astype(int) - solo[0].astype(int)).max())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
