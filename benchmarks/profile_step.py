"""Where one compiled denoising step's GPU time goes (bf16, then native fp8), full-size random weights, the
bench's prompts: CUDA kernel time from torch.profiler, grouped into fused Triton kernels (norms, RoPE,
modulation, fp8 quantization) / attention / matmul / other, plus the top kernels by name.
``python benchmarks/profile_step.py OUT.json [SIZE] [BATCH] [FP8_BACKEND]`` (default 1024 4 native). Also records
the fp8 transformer's relative L2 error against bf16 for one forward and its share of non-finite outputs.
"triton" is checked before "matmul": Triton kernels fused into an fp8 matmul's input are named
``triton_..._scaled_mm_...``."""

import json
import sys

import torch
from gpu_timing import first_call_s, one_step, timed
from torch.profiler import ProfilerActivity, profile

from actors.engine import Sample, ZImageEngine
from actors.models import build_components
from actors.quantize import forward_error, quantize_fp8
from zimage_common.prompts import PROMPTS

CATEGORIES = (("triton", ("triton",)),
              ("attention", ("cudnn", "fmha", "flash", "attention", "sdpa")),
              ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "scaled_mm", "cublas", "sm90")))


def category(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")


def measure(step, label, res, path):
    res[f"{label}_first_step_s"] = round(first_call_s(step), 3)
    res[f"{label}_step_s"] = round(timed(step, reps=5, warmup=False), 4)
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
    with open(path, "w") as f:
        json.dump(res, f, indent=2)


def forward(eng, enc, lat):
    x = [y.to(torch.bfloat16).unsqueeze(1) for y in lat]
    t = torch.full((len(x),), 0.5, device="cuda")
    layout = eng.packed.layout([(1, *y.shape[-2:]) for y in lat], [len(e) for e in enc.positive])
    with torch.no_grad():
        return torch.stack(eng.packed(x, t, enc.positive, layout)).float()


def main(path, size=1024, batch=4, fp8_backend="native"):
    torch.backends.cudnn.benchmark = True
    res = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "batch": batch, "size": f"{size}x{size}"}
    comps = build_components("full", device="cuda", dtype=torch.bfloat16)
    eng = ZImageEngine(comps, dict.fromkeys(("transformer", "text_encoder", "vae"), "cuda"), torch.bfloat16)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    samples = [Sample(p, i, size, size) for i, p in enumerate(prompts)]
    lat = eng.initial_latents(samples)
    enc = eng.encode(prompts)
    eng.packed.compile()
    measure(one_step(eng, samples), "bf16_compiled", res, path)
    ref = forward(eng, enc, lat)
    torch._dynamo.reset()
    quantize_fp8(eng.transformer, fp8_backend)
    eng.packed.compile()
    res["fp8_backend"] = fp8_backend
    measure(one_step(eng, samples), "fp8_compiled", res, path)  # (its captions refined by the fp8 model)
    res["fp8_forward_rel_l2"], res["fp8_nonfinite_fraction"] = forward_error(ref, forward(eng, enc, lat))
    print({k: res[k] for k in ("fp8_nonfinite_fraction", "fp8_forward_rel_l2")}, flush=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:4]), *sys.argv[4:5])
