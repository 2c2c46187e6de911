"""Kernel-level probes on one GPU with the full-size random-weight model, to decide the speed defaults:

1. attention alone at the transformer's shapes (30 heads x 128, 1024^2 image tokens + caption), per SDPA backend,
   with and without the padding mask that mixed caption lengths bring;
2. one denoising step at batch 4 (the bench prompts, so mixed caption lengths) eager and compiled, per diffusers
   attention backend;
3. fp8 (``native`` Fp8Linear and torchao): first compiled call (compile time) and step time, and the relative
   error of one forward against bf16.

Prints as it goes and rewrites the JSON at argv[1] after every measurement (a timeout keeps what was done).
"""

import json
import sys

import torch
from gpu_timing import first_call_s, timed, uncompile

from actors.engine import ZImageEngine
from actors.models import build_components
from actors.quantize import quantize_fp8
from orchestrator.bench import PROMPTS

RES: dict = {}


def record(path, key, value):
    RES[key] = value
    print(f"{key:48s} {round(value, 5) if isinstance(value, float) else value}", flush=True)
    with open(path, "w") as f:
        json.dump(RES, f, indent=2)


def attention_probe(path):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, dim = 30, 128
    for b, cap in ((1, 128), (4, 160)):
        s = 4096 + cap
        q, k, v = (torch.randn(b, heads, s, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        mask = torch.ones(b, 1, 1, s, device="cuda", dtype=torch.bool)
        mask[1:, ..., -64:] = False  # shorter captions in the other samples
        flops = 4 * b * heads * s * s * dim
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            for masked in (False, True):
                if masked and backend == SDPBackend.FLASH_ATTENTION:
                    continue
                try:
                    with sdpa_kernel(backend):
                        t = timed(lambda q=q, k=k, v=v, m=mask if masked else None:
                                  torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m), reps=10)
                    record(path, f"attn_bs{b}_{name}{'_mask' if masked else ''}_TFLOPs", flops / t / 1e12)
                except RuntimeError as e:
                    record(path, f"attn_bs{b}_{name}{'_mask' if masked else ''}_error", str(e)[:160])


def main(path):
    torch.backends.cudnn.benchmark = True
    RES["card"] = torch.cuda.get_device_name(0)
    RES["torch"] = torch.__version__
    attention_probe(path)

    comps = build_components("full", device="cuda", dtype=torch.bfloat16)
    eng = ZImageEngine(comps, dict.fromkeys(("transformer", "text_encoder", "vae"), "cuda"), torch.bfloat16)
    tr = eng.transformer
    lat = eng.initial_latents(list(range(4)), 1024, 1024)
    enc = eng.encode(PROMPTS[:4])
    RES["caption_tokens"] = [int(e.shape[0]) for e in enc.positive]
    step = lambda: eng.denoise(enc, lat, 1)
    x = list(lat.to(torch.bfloat16).unsqueeze(2).unbind(0))
    t = torch.full((4,), 0.5, device="cuda")
    with torch.no_grad():
        ref = torch.stack(tr(x, t, enc.positive, return_dict=False)[0]).float()

    def rel_err():
        with torch.no_grad():
            out = torch.stack(tr(x, t, enc.positive, return_dict=False)[0]).float()
        return float((out - ref).norm() / ref.norm())

    for backend in ("native", "_native_cudnn"):
        tr.set_attention_backend(backend)
        record(path, f"step_bs4_eager_{backend}_s", timed(step, reps=3))
        record(path, f"rel_err_eager_{backend}", rel_err())

    def compile_and_time(prefix, infix=""):
        tr.compile_repeated_blocks(fullgraph=True)
        record(path, f"{prefix}compile_first_step{infix}_s", first_call_s(step))
        record(path, f"{prefix}step_bs4_compiled{infix}_s", timed(step, reps=3))

    for backend in ("native", "_native_cudnn"):
        torch._dynamo.reset()
        uncompile(tr)
        tr.set_attention_backend(backend)
        compile_and_time("", f"_{backend}")

    best = min(("native", "_native_cudnn"), key=lambda b: RES[f"step_bs4_compiled_{b}_s"])
    RES["fp8_attention_backend"] = best
    for fp8 in ("native", "torchao"):
        torch._dynamo.reset()
        uncompile(tr)  # the "eager" fp8 numbers below are eager (s2-1 ran without this: native's were compiled)
        n = quantize_fp8(tr, fp8)
        tr.set_attention_backend(best)
        record(path, f"fp8_{fp8}_layers", n)
        record(path, f"fp8_{fp8}_rel_err_eager", rel_err())
        record(path, f"fp8_{fp8}_step_bs4_eager_s", timed(step, reps=2))
        compile_and_time(f"fp8_{fp8}_")
        record(path, f"fp8_{fp8}_rel_err_compiled", rel_err())
        if fp8 == "native":  # a fresh bf16 transformer for torchao: same seed, so the same weights as ``ref``'s
            comps["transformer"] = eng.transformer = tr = None
            torch.cuda.empty_cache()
            tr = build_components("full", device={"transformer": "cuda"}, dtype=torch.bfloat16)["transformer"]
            eng.transformer = tr


if __name__ == "__main__":
    main(sys.argv[1])
