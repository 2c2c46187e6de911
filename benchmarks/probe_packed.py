"""Packed variable-shape batches on one GPU, full-size random weights: which attention kernel, what it costs, and
whether the compiled packed transformer covers every shape with a handful of graphs.

1. attention alone at packed shapes (30 heads x 128): uniform (4 x 1024^2 + 128-token captions) and mixed (four
   sizes, four caption lengths): today's dense unmasked SDPA (uniform only), the padded + masked SDPA diffusers
   uses for mixed batches, per-sample SDPA calls, torch's varlen (flash) attention, cuDNN's ragged SDPA and
   flex_attention with a document mask; TFLOP/s over the useful (per-sample) FLOPs and the error against
   per-sample SDPA;
2. the packed transformer against diffusers' own forward per sample (relative L2 error in bf16);
3. one denoising step at batch 4, 1024^2: today's path (diffusers forward, regional compile) against the packed
   path compiled with dynamic shapes; then mixed batches of new shapes, counting the graphs compiled after the
   first two batches (the target is zero);
4. peak memory of the packed step per token count, and of one VAE decode per size.

5. ``varied``: four caption lengths against four equal ones at the same token count: attention alone per kernel
   (``impls``, e.g. ``runs,varlen,flex``) and the compiled packed step.

The packed transformer runs one kernel, ``runs`` (``actors.packed.run_attention``); ``varlen`` and ``flex`` live
here only, to measure it against (``attend``).

Usage: python3 benchmarks/probe_packed.py OUT.json [sections, default attn,err,step,mem; or varied] [impls]
Prints as it goes and rewrites the JSON after every measurement (a timeout keeps what was done).
"""

import json
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from gpu_timing import first_call_s, timed

RES: dict = {}
PATH = "probe_packed.json"


def record(key, value):
    RES[key] = value
    print(f"{key:56s} {round(value, 5) if isinstance(value, float) else value}", flush=True)
    with open(PATH, "w") as f:
        json.dump(RES, f, indent=2)


def guarded(name, fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - a probe records the failure and goes on
        record(f"{name}_error", f"{type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc()


UNIFORM = [4096 + 128] * 4
MIXED = [4096 + 64, 3072 + 224, 4032 + 96, 1024 + 160]


def attend(q, k, v, impl: str, runs, cu=None, max_len=None, mask=None):
    """q, k, v: [1, T, H, d] -> [1, T, H, d]; attention within each sample's segment, by the replica's kernel
    (``runs``) or one of those it was measured against: torch's variable-length flash attention (``varlen``, with
    the boundaries ``cu`` and the longest segment ``max_len``) or flex_attention with a document mask (``flex``,
    ``mask`` from ``flex_mask``)."""
    if impl == "runs":
        from actors.packed import run_attention

        return run_attention(q, k, v, runs)
    if impl == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q[0], k[0], v[0], cu, cu, max_len, max_len).unsqueeze(0)
    if impl == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              block_mask=mask).transpose(1, 2)
    raise ValueError(f"unknown attention implementation {impl!r}")


def flex_mask(seg, total: int):
    """flex_attention's block mask for the packed sequence whose token i belongs to sample ``seg[i]``."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_sample(b, h, q_idx, kv_idx):
        return seg[q_idx] == seg[kv_idx]

    return create_block_mask(same_sample, None, None, total, total, device=seg.device)


def attention_probe():
    from actors.packed import equal_runs

    heads, dim = 30, 128
    for name, lens in (("uniform", UNIFORM), ("mixed", MIXED)):
        total = sum(lens)
        q, k, v = (torch.randn(1, total, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        cu = torch.tensor([0] + lens, device="cuda", dtype=torch.int32).cumsum(0).to(torch.int32)
        seg = torch.repeat_interleave(torch.arange(len(lens), device="cuda"), torch.tensor(lens, device="cuda"))
        runs = equal_runs(lens)
        flops = sum(4 * heads * n * n * dim for n in lens)
        solo = [(q[:, s:s + n].transpose(1, 2), k[:, s:s + n].transpose(1, 2), v[:, s:s + n].transpose(1, 2))
                for s, n in zip(cu.tolist(), lens)]
        ref = torch.cat([F.scaled_dot_product_attention(*a).transpose(1, 2) for a in solo], dim=1)
        record(f"attn_{name}_per_sample_ms",
               timed(lambda: [F.scaled_dot_product_attention(*a) for a in solo], reps=10) * 1e3)
        for impl in ("runs", "varlen", "flex"):
            def run(impl=impl):
                mask = flex_mask(seg, total) if impl == "flex" else None
                args = (runs, cu, max(lens), mask)
                fn = torch.compile(attend, fullgraph=True, dynamic=False) if impl == "flex" else attend
                out = fn(q, k, v, impl, *args)
                record(f"attn_{name}_{impl}_maxerr", float((out.float() - ref.float()).abs().max()))
                t = timed(lambda: fn(q, k, v, impl, *args), reps=10)
                record(f"attn_{name}_{impl}_ms", t * 1e3)
                record(f"attn_{name}_{impl}_TFLOPs", flops / t / 1e12)
            guarded(f"attn_{name}_{impl}", run)
        if name == "mixed":  # what diffusers does: pad to the longest, key-padding mask
            def masked():
                m = max(lens)
                qp, kp, vp = (torch.randn(len(lens), heads, m, dim, device="cuda", dtype=torch.bfloat16)
                              for _ in range(3))
                mask = torch.zeros(len(lens), 1, 1, m, device="cuda", dtype=torch.bool)
                for i, n in enumerate(lens):
                    mask[i, ..., :n] = True
                t = timed(lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask), reps=10)
                record("attn_mixed_padded_masked_ms", t * 1e3)
                record("attn_mixed_padded_masked_TFLOPs", flops / t / 1e12)
            guarded("attn_mixed_padded_masked", masked)


def build():
    from actors.engine import ZImageEngine
    from actors.models import build_components

    t0 = time.perf_counter()
    comps = build_components("full", device="cuda", dtype=torch.bfloat16)
    eng = ZImageEngine(comps, dict.fromkeys(("transformer", "text_encoder", "vae"), "cuda"), torch.bfloat16)
    record("build_s", time.perf_counter() - t0)
    return eng


def batch(eng, sizes, cap_lens, seed=0):
    g = torch.Generator("cpu").manual_seed(seed)
    lat = [torch.randn(16, 1, h // 8, w // 8, generator=g).to("cuda", torch.bfloat16) for h, w in sizes]
    caps = [torch.randn(n, 2560, generator=g).to("cuda", torch.bfloat16) for n in cap_lens]
    layout = eng.packed.layout([(1, h // 8, w // 8) for h, w in sizes], cap_lens)
    return lat, caps, layout


def error_probe(eng):
    sizes = [(1024, 1024), (512, 512), (768, 1344)]
    caps = [40, 150, 90]
    lat, cap, layout = batch(eng, sizes, caps)
    t = torch.tensor([0.3, 0.6, 0.9], device="cuda")
    with torch.no_grad():
        def run():
            layout.forget_captions()
            out = eng.packed(lat, t, cap, layout)
            errs = []
            for i in range(len(sizes)):
                ref = eng.transformer([lat[i]], t[i:i + 1], [cap[i]], return_dict=False)[0][0].float()
                errs.append(float((out[i].float() - ref).norm() / ref.norm()))
            record("packed_vs_diffusers_runs_rel_l2", errs)
        guarded("packed_vs_diffusers_runs", run)

        def floor():  # diffusers against itself: the same sample alone and beside a copy of itself
            errs = []
            for i in range(len(sizes)):
                one = eng.transformer([lat[i]], t[i:i + 1], [cap[i]], return_dict=False)[0][0].float()
                two = eng.transformer([lat[i], lat[i]], t[i:i + 1].repeat(2), [cap[i], cap[i][:-7]],
                                      return_dict=False)[0][0].float()
                errs.append(float((two - one).norm() / one.norm()))
            record("diffusers_solo_vs_batched_rel_l2", errs)
        guarded("diffusers_noise_floor", floor)


def graphs():
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def step_probe(eng):
    """Today's path and the packed path, one denoising step (one transformer forward) at batch 4 1024^2."""
    from gpu_timing import uncompile

    sizes4 = [(1024, 1024)] * 4
    lat, cap, layout = batch(eng, sizes4, [100, 100, 100, 100])
    t4 = torch.full((4,), 0.5, device="cuda")
    with torch.no_grad():
        def today():
            x = [x_ for x_ in lat]
            eng.transformer.compile_repeated_blocks(fullgraph=True)
            f = lambda: eng.transformer(x, t4, cap, return_dict=False)  # noqa: E731
            record("today_compiled_first_call_s", first_call_s(f))
            record("today_compiled_step_bs4_1024_s", timed(f, reps=5))
            uncompile(eng.transformer)
        guarded("today", today)
        for impl in ("runs",):  # the packed transformer's kernel, named in the keys
            torch._dynamo.reset()
            eng.packed.compile()

            def run(impl=impl):
                g0 = graphs()
                layout.forget_captions()
                f = lambda: eng.packed(lat, t4, cap, layout)  # noqa: E731
                record(f"packed_{impl}_first_call_s", first_call_s(f))
                record(f"packed_{impl}_step_bs4_1024_s", timed(f, reps=5))
                # a mixed batch (varlen everywhere), then a batch of one
                ml, mc, mlay = batch(eng, [(1024, 1024), (768, 1344), (512, 512), (1344, 768)], [37, 200, 64, 130])
                tm = torch.tensor([0.2, 0.4, 0.6, 0.8], device="cuda")
                record(f"packed_{impl}_mixed_first_call_s", first_call_s(lambda: eng.packed(ml, tm, mc, mlay)))
                mlay.forget_captions()
                record(f"packed_{impl}_step_mixed4_s", timed(lambda: eng.packed(ml, tm, mc, mlay), reps=5))
                ol, oc, olay = batch(eng, [(1024, 1024)], [77])
                record(f"packed_{impl}_single_first_call_s",
                       first_call_s(lambda: eng.packed(ol, t4[:1], oc, olay)))
                record(f"packed_{impl}_graphs_warmup", graphs() - g0)
                # new shapes after warm-up: count graphs compiled
                g1 = graphs()
                t_new = time.perf_counter()
                for k, (sz, cl) in enumerate((([(512, 512)] * 7, [20, 40, 60, 80, 100, 300, 500]),
                                              ([(1024, 768), (768, 1024), (1024, 1024)], [33, 66, 99]),
                                              ([(1536, 1536), (256, 256)], [12, 400]),
                                              ([(1024, 1024)] * 3, [64, 64, 64]),
                                              ([(640, 640)], [250]))):
                    nl, nc, nlay = batch(eng, sz, cl, seed=k + 1)
                    first_call_s(lambda: eng.packed(nl, torch.rand(len(sz), device="cuda"), nc, nlay))
                record(f"packed_{impl}_new_shapes_s", time.perf_counter() - t_new)
                record(f"packed_{impl}_graphs_after_warmup", graphs() - g1)
            guarded(f"packed_{impl}", run)
            eng.packed.block_fn = __import__("actors.packed", fromlist=["x"])._block_forward


VARIED = {"u32": [32] * 4, "u96": [96] * 4, "varied": [32, 64, 128, 160]}  # caption tokens of 4 x 1024^2


def varied_probe(eng, impls):
    """Where a batch of four caption lengths loses against one of four equal ones at the same token count:
    attention alone (four dense calls, one after another or on side streams) and the compiled packed step."""
    from actors.packed import equal_runs

    heads, dim = 30, 128
    for name, caps in VARIED.items():
        lens = sorted((4096 + c for c in caps), reverse=True)
        q, k, v = (torch.randn(1, sum(lens), heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        seg = torch.repeat_interleave(torch.arange(len(lens), device="cuda"), torch.tensor(lens, device="cuda"))
        cu = torch.tensor([0] + lens, device="cuda", dtype=torch.int32).cumsum(0).to(torch.int32)
        flops = sum(4 * heads * n * n * dim for n in lens)
        for impl in impls:
            args = (equal_runs(lens), cu, max(lens), flex_mask(seg, sum(lens)) if impl == "flex" else None)
            fn = torch.compile(attend, fullgraph=True, dynamic=False) if impl == "flex" else attend
            t = timed(lambda impl=impl, fn=fn, args=args: fn(q, k, v, impl, *args), reps=20)
            record(f"varied_attn_{name}_{impl}_ms", t * 1e3)
            record(f"varied_attn_{name}_{impl}_TFLOPs", flops / t / 1e12)
    t4 = torch.full((4,), 0.5, device="cuda")
    with torch.no_grad():
        for impl in ("runs",):  # the packed transformer's kernel, named in the keys
            torch._dynamo.reset()
            eng.packed.compile()

            def run(impl=impl):
                for name, caps in VARIED.items():
                    lat, cap, layout = batch(eng, [(1024, 1024)] * 4, caps)
                    f = lambda: eng.packed(lat, t4, cap, layout)  # noqa: E731
                    first_call_s(f)
                    record(f"varied_step_{name}_{impl}_s", timed(f, reps=8))
            guarded(f"varied_step_{impl}", run)
            eng.packed.block_fn = __import__("actors.packed", fromlist=["x"])._block_forward


def memory_probe(eng):
    with torch.no_grad():
        for n, (h, w) in ((1, (1024, 1024)), (4, (1024, 1024)), (8, (1024, 1024)), (16, (512, 512))):
            def run(n=n, h=h, w=w):
                lat, cap, layout = batch(eng, [(h, w)] * n, [128] * n)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                eng.packed(lat, torch.full((n,), 0.5, device="cuda"), cap, layout)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
                record(f"mem_step_{n}x{w}x{h}_tokens", layout.tokens)
                record(f"mem_step_{n}x{w}x{h}_gib", peak / 2**30)
                record(f"mem_step_{n}x{w}x{h}_kib_per_token", peak / layout.tokens / 1024)
            guarded(f"mem_step_{n}", run)
        for h, w in ((1024, 1024), (1344, 768), (512, 512), (2048, 2048)):
            def dec(h=h, w=w):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                eng.decode_one(torch.randn(16, h // 8, w // 8, device="cuda"))
                torch.cuda.synchronize()
                record(f"mem_decode_{w}x{h}_gib", (torch.cuda.max_memory_allocated() - base) / 2**30)
            guarded(f"mem_decode_{w}x{h}", dec)


def main():
    global PATH
    PATH = sys.argv[1]
    sections = (sys.argv[2] if len(sys.argv) > 2 else "attn,err,step,mem").split(",")
    impls = (sys.argv[3] if len(sys.argv) > 3 else "runs").split(",")
    torch.backends.cudnn.benchmark = True
    RES["card"] = torch.cuda.get_device_name(0)
    RES["torch"] = torch.__version__
    if "attn" in sections:
        attention_probe()
    if not {"err", "step", "mem", "varied"} & set(sections):
        return
    eng = build()
    if "err" in sections:
        error_probe(eng)
    if "mem" in sections:
        memory_probe(eng)
    if "step" in sections:
        step_probe(eng)
    if "varied" in sections:
        varied_probe(eng, impls)


if __name__ == "__main__":
    main()
