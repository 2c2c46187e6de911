"""Where one compiled denoising step's GPU time goes (bf16, then native fp8), full-size random weights, batch 4 at
1024^2 with the bench's prompts: CUDA kernel time from torch.profiler, grouped into matmul / attention / fused
Triton kernels (norms, RoPE, modulation, fp8 quantization) / other. Writes JSON to argv[1]."""

import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from actors.engine import ZImageEngine
from actors.models import build_components
from actors.quantize import quantize_fp8
from orchestrator.bench import PROMPTS

CATEGORIES = (("attention", ("cudnn", "fmha", "flash", "attention", "sdpa")),
              ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "scaled_mm", "cublas", "sm90")),
              ("triton", ("triton",)))


def category(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")


def measure(eng, enc, lat, label, res, path):
    step = lambda: eng.denoise(enc, lat, 1)  # noqa: E731
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    res[f"{label}_first_step_s"] = round(time.perf_counter() - t0, 3)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    res[f"{label}_step_s"] = round(sorted(times)[2], 4)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    sums, top = {}, {}
    for e in prof.key_averages():
        t = e.self_device_time_total / 1e6 if hasattr(e, "self_device_time_total") else e.self_cuda_time_total / 1e6
        if t <= 0:
            continue
        c = category(e.key)
        sums[c] = sums.get(c, 0.0) + t
        top[e.key[:90]] = t
    total = sum(sums.values())
    res[f"{label}_kernel_s"] = {k: round(v, 4) for k, v in sorted(sums.items())} | {"total": round(total, 4)}
    res[f"{label}_top_kernels"] = {k: round(v, 4) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]}
    print(label, res[f"{label}_step_s"], res[f"{label}_kernel_s"], flush=True)
    json.dump(res, open(path, "w"), indent=2)


def main(path):
    torch.backends.cudnn.benchmark = True
    res = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "batch": 4, "size": "1024x1024"}
    comps = build_components("full", device="cuda", dtype=torch.bfloat16)
    eng = ZImageEngine(comps, dict.fromkeys(("transformer", "text_encoder", "vae"), "cuda"), torch.bfloat16)
    lat = eng.initial_latents(list(range(4)), 1024, 1024)
    enc = eng.encode(PROMPTS[:4])
    eng.transformer.compile_repeated_blocks(fullgraph=True)
    measure(eng, enc, lat, "bf16_compiled", res, path)
    torch._dynamo.reset()
    quantize_fp8(eng.transformer, "native")
    eng.transformer.compile_repeated_blocks(fullgraph=True)
    measure(eng, enc, lat, "fp8_compiled", res, path)


if __name__ == "__main__":
    main(sys.argv[1])
