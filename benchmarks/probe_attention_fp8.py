"""Quantized attention kernels against the one the replica runs (torch's SDPA, cuDNN's bf16 flash kernel on Hopper),
at Z-Image's per-sample shapes ``[1, 30 heads, L, 128]`` with the packed layout's strides: kernel time, TFLOP/s, the
time with the quantization of q, k and v and the dequantization of the output included, and the relative L2 error of
the output against bf16 (on unit-variance q, k, v as Z-Image's QK norm leaves them, and again with outlier channels).
The issue it serves: attention is a quarter of an fp8 step (docs/benchmarks.md, the roofline), and no fp8 attention
kernel for Hopper installs with this torch.

    python3 benchmarks/probe_attention_fp8.py OUT.json            # on a GPU; candidates from wheels carried along
    python3 benchmarks/probe_attention_fp8.py OUT.json --tiny     # bf16 SDPA on the CPU only (checks the script)

Candidates, each where it imports (the report says why one did not):
- ``cudnn_fp8``: cuDNN's FP8 SDPA through ``nvidia-cudnn-frontend`` (per-tensor scales; on Hopper its output is FP8
  too, dequantized here with the scale it was written with);
- ``sage``: SageAttention 1 (``sageattention``; INT8 q and k, Triton kernels).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

HEADS, HEAD_DIM = 30, 128
LENGTHS = (1152, 4224, 8448, 16512)  # 512^2, 1024^2, 1024x2048 and 2048^2 with a ~100-token caption


def flops(length: int, heads: int = HEADS, dim: int = HEAD_DIM) -> float:
    return 4.0 * heads * length * length * dim


def rel_l2(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def per_tensor_fp8(x):
    """``x`` as float8_e4m3 with one power-of-two scale for the whole tensor, and the descale (``q * d ~= x``)."""
    import torch

    amax = x.abs().amax().float().clamp_min(1e-8)
    mult = torch.exp2(torch.floor(torch.log2(448.0 / amax)))
    return (x.float() * mult).clamp(-448, 448).to(torch.float8_e4m3fn), mult.reciprocal().reshape(1, 1, 1, 1)


def inputs(length: int, device, dtype, outliers: bool = False, seed: int = 0):
    """q, k, v of one sample as the packed transformer holds them: ``[1, L, H, d]`` viewed as ``[1, H, L, d]``."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    qkv = [torch.randn(1, length, HEADS, HEAD_DIM, device=device, generator=g) for _ in range(3)]
    if outliers:  # a few channels far above the rest, as trained q/k projections have
        for t in qkv[:2]:
            t[..., :4] *= 8
    return [t.to(dtype).transpose(1, 2) for t in qkv]


def sdpa_bf16(q, k, v):
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v)


def cudnn_fp8(length: int, device):
    """``(kernel(q8, k8, v8, dq, dk, dv, out, o_scale), whole(q, k, v))`` for one sequence length."""
    import cudnn
    import torch

    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(device).cuda_stream)
    e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    shape, stride = (1, HEADS, length, HEAD_DIM), (length * HEADS * HEAD_DIM, HEAD_DIM, HEADS * HEAD_DIM, 1)
    tq, tk, tv = (graph.tensor(name=n, dim=shape, stride=stride, data_type=e4m3) for n in "qkv")
    scalar = {"dim": (1, 1, 1, 1), "stride": (1, 1, 1, 1), "data_type": f32}
    dq, dk, dv, ds, ss, so = (graph.tensor(name=n, **scalar) for n in ("dq", "dk", "dv", "ds", "ss", "so"))
    o, _, amax_s, amax_o = graph.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=dq, descale_k=dk, descale_v=dv, descale_s=ds,
                                          scale_s=ss, scale_o=so, is_inference=True,
                                          attn_scale=1 / math.sqrt(HEAD_DIM), use_causal_mask=False)
    o.set_output(True).set_dim(shape).set_stride(stride).set_data_type(e4m3)
    for a in (amax_s, amax_o):
        a.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(f32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=device)
    s_scale = torch.full((1, 1, 1, 1), 448.0, device=device)  # softmax probabilities are <= 1: e4m3's whole range
    s_descale = s_scale.reciprocal()
    am_s, am_o = torch.empty(1, 1, 1, 1, device=device), torch.empty(1, 1, 1, 1, device=device)

    def kernel(q8, k8, v8, q_d, k_d, v_d, out, o_scale):
        graph.execute({tq: q8, tk: k8, tv: v8, dq: q_d, dk: k_d, dv: v_d, ds: s_descale, ss: s_scale, so: o_scale,
                       o: out, amax_s: am_s, amax_o: am_o}, workspace, handle=handle)

    def whole(q, k, v):
        (q8, q_d), (k8, k_d), (v8, v_d) = per_tensor_fp8(q), per_tensor_fp8(k), per_tensor_fp8(v)
        o_scale = v_d.reciprocal() * 0.5  # |out| <= max |v|: half of v's scale leaves rounding headroom
        out = torch.empty_strided(q8.shape, q8.stride(), dtype=q8.dtype, device=device)
        kernel(q8, k8, v8, q_d, k_d, v_d, out, o_scale)
        return (out.float() / o_scale).to(q.dtype)
    return kernel, whole


def timed(fn, reps: int, gpu: bool) -> float:
    """Milliseconds per call of ``fn`` (CUDA events on a GPU), after three unmeasured calls."""
    import torch

    for _ in range(3):
        fn()
    if not gpu:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / reps
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def probe(lengths, reps: int, gpu: bool) -> dict:
    import torch

    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    report = {"device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
              "heads": HEADS, "head_dim": HEAD_DIM, "rows": [], "unavailable": {}}
    candidates = {}
    if gpu:
        try:
            import cudnn

            report["cudnn_frontend"] = getattr(cudnn, "__version__", "?")
            candidates["cudnn_fp8"] = None
        except ImportError as e:
            report["unavailable"]["cudnn_fp8"] = f"nvidia-cudnn-frontend: {e}"
        try:
            from sageattention import sageattn

            candidates["sage"] = sageattn
        except ImportError as e:
            report["unavailable"]["sage"] = f"sageattention: {e}"
    else:
        report["unavailable"] = {"cudnn_fp8": "needs CUDA", "sage": "needs CUDA"}
    for length in lengths:
        q, k, v = inputs(length, device, dtype)
        ref = sdpa_bf16(q, k, v)
        ms = timed(lambda: sdpa_bf16(q, k, v), reps, gpu)
        row = {"length": length, "gflop": flops(length) / 1e9, "sdpa_ms": ms, "sdpa_tflops": flops(length) / ms / 1e9}
        qo, ko, vo = inputs(length, device, dtype, outliers=True, seed=1)
        ref_o = sdpa_bf16(qo, ko, vo)
        for name, fn in candidates.items():
            try:
                if name == "cudnn_fp8":
                    kernel, whole = cudnn_fp8(length, device)
                    (q8, q_d), (k8, k_d), (v8, v_d) = per_tensor_fp8(q), per_tensor_fp8(k), per_tensor_fp8(v)
                    out, o_scale = torch.empty_strided(q8.shape, q8.stride(), dtype=q8.dtype, device=device), \
                        v_d.reciprocal() * 0.5
                    kernel_ms = timed(lambda: kernel(q8, k8, v8, q_d, k_d, v_d, out, o_scale), reps, gpu)
                else:
                    def whole(q, k, v, fn=fn):
                        return fn(q, k, v, tensor_layout="HND", is_causal=False)
                    kernel_ms = None
                whole_ms = timed(lambda: whole(q, k, v), reps, gpu)
                row[name] = {"kernel_ms": kernel_ms, "whole_ms": whole_ms,
                             "whole_tflops": flops(length) / whole_ms / 1e9,
                             "kernel_tflops": flops(length) / kernel_ms / 1e9 if kernel_ms else None,
                             "rel_l2": rel_l2(whole(q, k, v), ref), "rel_l2_outliers": rel_l2(whole(qo, ko, vo), ref_o)}
            except Exception as e:  # noqa: BLE001 - a candidate that fails at a shape is reported, not fatal
                row[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
        print(json.dumps(row), flush=True)
        report["rows"].append(row)
    return report


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--tiny", action="store_true", help="bf16 SDPA only, on the CPU, at short lengths")
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    lengths, reps = ((64, 96), 2) if args.tiny else (LENGTHS, args.reps)
    report = probe(lengths, reps, gpu=not args.tiny)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
