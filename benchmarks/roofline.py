"""The roofline of the serving path on one GPU (issue #32): where a denoising step's time goes against what the
arithmetic needs, per op class, for each transformer state (bf16 / fp8, chosen blocks kept in bf16), at batch 1
and 4; the text encoder's encode of the batch and the VAE decode of one image; and the accuracy bound of each lossy
state against eager bf16.

    python3 benchmarks/roofline.py --out DIR [--batches 1,4] [--size 1024] [--no-accuracy]
    python3 benchmarks/roofline.py --tiny --out DIR        # CPU, tiny model: the FLOP accounting and the tables

Full-size random weights, compiled as the replica compiles them (``PackedTransformer.compile()``, the VAE decoder by
``compile_vae_decoder``), the transformer states one after another on one model where a state can be reached in
place (bf16 -> fp8), rebuilt from the same seed where not; compiled graphs are kept across batch sizes
and states (they are dynamic in token and sample counts). Results go to DIR/roofline.json and DIR/roofline.md after
every measurement, so a run cut short keeps what it measured.

Per op class: FLOPs counted from the shapes of the ops an eager run of the same call dispatches (``FlopCount``:
2*M*N*K per GEMM, 4*L^2*d per head and sample for attention, 2*out*Cin*kh*kw per convolution), GPU time from
torch.profiler's kernels (classified by kernel name), achieved TFLOP/s and % of peak (the H100 SXM datasheet's
dense numbers, and the large GEMMs this script times first on the same card). Where the rest goes: the step's wall
time (synchronized, unprofiled, median) minus the union of its kernels' time is device idle (launch gaps, host
work); host syncs and device-to-host copies inside the step, kernels and launches are counted from the trace.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from roofline_report import DATASHEET_TFLOPS, render
from torch.utils._python_dispatch import TorchDispatchMode

# ---- FLOPs from the dispatched ops -------------------------------------------------------------------------------
_GEMM = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::bmm": (0, 1), "aten::baddbmm": (1, 2),
         "aten::_scaled_mm": (0, 1)}
_CONV = {"aten::convolution", "aten::_convolution", "aten::cudnn_convolution", "aten::mkldnn_convolution"}
_SDPA = {"aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
         "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
         "aten::_scaled_dot_product_fused_attention_overrideable"}


def op_flops(name: str, args, out) -> tuple[str, int]:
    """(class, FLOPs) of one dispatched op: ``gemm_bf16`` (any non-float8 GEMM), ``gemm_fp8``, ``attention``,
    ``conv``; ("", 0) for ops that do no multiply-accumulate work worth counting (norms, elementwise, copies)."""
    if name in _GEMM:
        a, b = (args[i] for i in _GEMM[name])
        batch = a.shape[0] if a.dim() == 3 else 1
        return ("gemm_fp8" if name == "aten::_scaled_mm" else "gemm_bf16"), 2 * batch * a.shape[-2] * a.shape[-1] \
            * b.shape[-1]
    if name in _CONV:
        w = args[1]
        o = out[0] if isinstance(out, (tuple, list)) else out
        return "conv", 2 * o.numel() * w.shape[1] * int(torch.tensor(w.shape[2:]).prod())
    if name in _SDPA:
        q, k, v = args[:3]  # [B, H, L, d]
        return "attention", 2 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * (q.shape[3] + v.shape[3])
    if name == "zimage::run_attention":  # packed [1, T, H, d], one dense call per sample (actors/packed.py)
        q, runs = args[0], args[3]
        return "attention", sum(4 * n * length * length * q.shape[2] * q.shape[3] for _, n, length in runs.tolist())
    return "", 0


class FlopCount(TorchDispatchMode):
    """FLOPs per class of every op dispatched inside the block (eager only; an op's own inner ops are not seen, so
    nothing is counted twice)."""

    def __init__(self):
        super().__init__()
        self.flops: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind, n = op_flops(func._schema.name, args, out)
        if n:
            self.flops[kind] += n
        return out


def count_flops(fn) -> dict[str, int]:
    with torch.no_grad(), FlopCount() as c:
        fn()
    return dict(c.flops)


# ---- GPU time from the profiler --------------------------------------------------------------------------------
ATTENTION_KEYS = ("sdpa", "fmha", "flash", "attention", "attn")
GEMM_KEYS = ("gemm", "nvjet", "cutlass", "xmma", "scaled_mm", "cublas", "sm90_xmma", "s16816", "wgmma")


def kernel_class(name: str) -> str:
    """The op class of a CUDA kernel by its name. Inductor's Triton kernels are named after the aten ops they fuse:
    the ones with an ``amax`` are fp8's activation quantization (with whatever norm or elementwise work inductor
    fused into it); the rest are the norms, RoPE, modulation and other elementwise work."""
    low = name.lower()
    if low.startswith("triton"):
        if "amax" in low:
            return "quantize"
        if "_tem_" in low and "mm" in low:
            return "gemm"
        return "elementwise"
    if any(k in low for k in ATTENTION_KEYS):
        return "attention"
    if any(k in low for k in GEMM_KEYS):
        return "gemm"
    if low.startswith("memcpy") or low.startswith("memset"):
        return "memcpy"
    return "other"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def profile(fn, reps: int = 5, gpu: bool = True) -> dict:
    """One call of ``fn`` under torch.profiler (after ``reps`` timed unprofiled calls): wall time, kernel time per
    class, device idle, kernels, launches, host syncs and device-to-host copies inside the call."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    with torch.no_grad():
        fn()  # warm: compiles, plans, caches
        wall = wall_s(fn, reps)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with torch_profile(activities=acts) as prof:
            with record_function("roofline.call"):
                fn()
            _sync()
    res = {"wall_s": wall}
    if not gpu:  # the tiny CPU mode: self CPU time per op class
        per: dict[str, float] = defaultdict(float)
        for e in prof.key_averages():
            if e.key != "roofline.call":
                per[_cpu_class(e.key)] += e.self_cpu_time_total / 1e6
        res["time_s"] = dict(per)
        return res
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        trace = json.load(open(path))
    return {**res, **summarize_trace(trace, wall)}


def summarize_trace(trace: dict, wall: float) -> dict:
    """Kernel time per class, device idle (``wall`` minus the union of kernel and copy time), kernels, launches,
    host syncs and device-to-host copies inside the ``roofline.call`` annotation of a torch.profiler chrome
    trace."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    mark = next(e for e in events if e.get("name") == "roofline.call" and e.get("cat") == "user_annotation")
    m0, m1 = mark["ts"], mark["ts"] + mark["dur"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    copies = [e for e in events if e.get("cat") in ("gpu_memcpy", "gpu_memset")]
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and m0 <= e["ts"] <= m1]
    per = defaultdict(float)
    for k in kernels + copies:
        per[kernel_class(k["name"])] += k["dur"] / 1e6
    busy = _union([(k["ts"], k["ts"] + k["dur"]) for k in kernels + copies]) / 1e6
    last = max((k["ts"] + k["dur"] for k in kernels + copies), default=m1)
    return {
        "time_s": dict(per), "kernel_busy_s": busy, "idle_s": max(0.0, wall - busy),
        "profiled_span_s": (last - m0) / 1e6, "kernels": len(kernels),
        "launches": sum("launch" in e["name"].lower() for e in runtime),
        "host_syncs": sum("synchronize" in e["name"].lower() for e in runtime),
        "d2h_copies": sum("dtoh" in e["name"].lower().replace(" ", "") for e in copies),
        "top_kernels": _top(kernels),
    }


def _cpu_class(op: str) -> str:
    if op in _GEMM:
        return "gemm"
    if op in _SDPA or op == "zimage::run_attention":
        return "attention"
    return "other"


def _top(kernels: list[dict], n: int = 10) -> list[list]:
    by: dict[str, list] = {}
    for k in kernels:
        s = by.setdefault(k["name"][:100], [0.0, 0])
        s[0] += k["dur"] / 1e6
        s[1] += 1
    return [[name, round(t, 6), c] for name, (t, c) in sorted(by.items(), key=lambda kv: -kv[1][0])[:n]]


def gemm_peaks(n: int = 8192, reps: int = 20) -> dict:
    """Achieved TFLOP/s of one large square GEMM on this card: bf16 ``torch.mm`` and float8 ``torch._scaled_mm``
    with row-wise scales into bf16 (the fp8 linears' own call)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    sa = torch.ones(n, 1, device="cuda")
    sb = torch.ones(1, n, device="cuda")
    calls = {"bf16": lambda: torch.mm(a, b),
             "fp8": lambda: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                             use_fast_accum=True)}
    out = {}
    for name, fn in calls.items():
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        out[name] = round(2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12, 1)
    return out


# ---- transformer states ----------------------------------------------------------------------------------------
class State:
    """A transformer state: bf16 or fp8, main blocks kept in bf16 (``bf16_blocks``, the form of
    ``model.fp8_bf16_blocks``)."""

    def __init__(self, fp8: bool, bf16_blocks: str = ""):
        self.fp8, self.bf16_blocks = fp8, bf16_blocks

    @property
    def name(self) -> str:
        blocks = f"-bf16-{self.bf16_blocks.replace(':', '')}" if self.bf16_blocks else ""
        return ("fp8" if self.fp8 else "bf16") + blocks


def plan_states(bf16_blocks: str) -> list[State]:
    """bf16 (reached in place from the first build), fp8, then fp8 with chosen blocks in bf16 (rebuilt)."""
    return [State(False), State(True)] + ([State(True, bf16_blocks)] if bf16_blocks else [])


def _fingerprint(transformer) -> list[float]:
    """Sums of parameters no option touches, from the first and the last built: the same seed gives the same
    weights (a rebuilt state compares with the reference on the same model)."""
    final = next(iter(transformer.all_final_layer.values()))
    return [float(p.detach().float().sum()) for p in (transformer.t_embedder.mlp[0].weight, final.linear.weight,
                                                      transformer.layers[-1].adaLN_modulation[0].weight)]


class Roofline:
    def __init__(self, args):
        from actors.engine import ZImageEngine
        from actors.models import build_components

        self.args = args
        self.gpu = not args.tiny
        self.device = "cuda" if self.gpu else "cpu"
        self.dtype = torch.bfloat16 if self.gpu else torch.float32
        self.size_kind = "tiny" if args.tiny else "full"
        comps = build_components(self.size_kind, device=self.device, dtype=self.dtype, seed=0)
        self.engine = ZImageEngine(comps, dict.fromkeys(("transformer", "text_encoder", "vae"), self.device),
                                   self.dtype)
        self.fingerprint = _fingerprint(self.engine.transformer)
        self._encoder_graphs = None  # measure_text_encoder's, on a GPU
        self.state = State(False)
        self.h = self.w = 2 * (args.size // 16)
        self._inputs: dict[int, tuple] = {}
        self._flops: dict[tuple, tuple] = {}
        self.eager = None
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.res: dict = {
            "card": torch.cuda.get_device_name(0) if self.gpu else "cpu (tiny model)",
            "torch": torch.__version__, "model": self.size_kind, "size": f"{args.size}x{args.size}",
            "steps": args.steps, "datasheet_tflops": DATASHEET_TFLOPS, "gemm_peak_tflops": None,
            "states": {}, "text_encoder": {}, "vae": None, "accuracy": {}, "notes": [],
        }

    # ---- inputs ------------------------------------------------------------------------------------------------
    def prompts(self, b: int) -> list[str]:
        from zimage_common.prompts import WORDS

        return [" ".join(WORDS[(17 * i + k) % len(WORDS)] for k in range(self.args.words)) for i in range(b)]

    def inputs(self, b: int) -> tuple:
        """Per batch size: caption embeddings of ``b`` prompts of ``--words`` words, latents, timesteps."""
        if b not in self._inputs:
            g = torch.Generator("cpu").manual_seed(b)
            caps = self.engine.encode(self.prompts(b)).positive
            lat = [torch.randn(16, 1, self.h, self.w, generator=g).to(self.device, self.dtype) for _ in range(b)]
            self._inputs[b] = caps, lat, torch.full((b,), 0.5, device=self.device)
        return self._inputs[b]

    # ---- states ------------------------------------------------------------------------------------------------
    def to_state(self, st: State) -> None:
        from actors.models import build_components
        from actors.packed import PackedTransformer
        from actors.quantize import quantize_fp8, resolve_bf16_blocks, swap_fp8

        model = self.engine.transformer
        if self.state.fp8:  # not reachable in place: the same weights again
            self.engine.transformer = self.engine.packed = self.eager = model = None
            gc.collect()
            if self.gpu:
                torch.cuda.empty_cache()
            model = build_components(self.size_kind, device={"transformer": self.device}, dtype=self.dtype,
                                     seed=0)["transformer"]
            if _fingerprint(model) != self.fingerprint:
                raise RuntimeError("the rebuilt transformer's weights differ from the first build's")
            self.engine.transformer = model
        if st.fp8:
            blocks = resolve_bf16_blocks(st.bf16_blocks or [], len(model.layers))
            if self.gpu:
                quantize_fp8(model, bf16_blocks=blocks)
            else:  # the CPU runs float8 linears too (tests); quantize_fp8 itself refuses non-GPU devices
                swap_fp8(model, blocks)
        self.state = st
        packed = PackedTransformer(model)
        if self.gpu and not self.args.no_compile:
            packed.compile()  # as the replica compiles it (actors/startup.py)
        self.engine.packed = packed
        self.eager = PackedTransformer(model)

    # ---- measurements ------------------------------------------------------------------------------------------
    def measure_step(self, b: int) -> dict:
        caps, lat, t = self.inputs(b)
        shapes, lens = [(1, self.h, self.w)] * b, [len(c) for c in caps]
        packed = self.engine.packed
        layout = packed.layout(shapes, lens)
        packed(lat, t, caps, layout)  # the first call also runs the caption path (cached for the batch)
        step = lambda: packed(lat, t, caps, layout)  # noqa: E731
        cap_layout = packed.layout(shapes, lens)

        def captions():
            cap_layout.caption_cache = None
            packed.captions(cap_layout, caps)

        key = (self.state.name, b)
        if key not in self._flops:
            eager_layout = self.eager.layout(shapes, lens)
            first = count_flops(lambda: self.eager(lat, t, caps, eager_layout))
            step_only = count_flops(lambda: self.eager(lat, t, caps, eager_layout))
            self._flops[key] = step_only, {k: first.get(k, 0) - step_only.get(k, 0) for k in first}
        flops_step, flops_cap = self._flops[key]
        out = {"tokens": layout.tokens, "caption_tokens": lens, "flops": flops_step,
               **profile(step, self.args.reps, self.gpu)}
        out["caption_path"] = {"flops": flops_cap, **_slim(profile(captions, self.args.reps, self.gpu))}
        return out

    def measure_text_encoder(self, b: int) -> dict:
        eng = self.engine
        texts = [eng.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True, enable_thinking=True)
                 for p in self.prompts(b)]
        inp = eng.tokenizer(texts, padding="longest", padding_side="right", max_length=512, truncation=True,
                            return_tensors="pt")
        ids, mask = inp.input_ids.to(self.device), inp.attention_mask.to(self.device).bool()
        fn = lambda: eng.encoder(input_ids=ids, attention_mask=mask, use_cache=False)  # noqa: E731 - what encodes run
        out = {"tokens": list(ids.shape), "flops": count_flops(fn), **_slim(profile(fn, self.args.reps, self.gpu))}
        if self.gpu:  # the same encode through model.text_encoder_graphs' graphs (ids from the CPU, as served);
            # graphs of the probe's own: the engine's later encodes (the accuracy probes') stay eager
            from actors.encoder_graphs import EncoderGraphs

            if self._encoder_graphs is None:
                self._encoder_graphs = EncoderGraphs(eng.encoder, self.device, pad_id=eng.tokenizer.pad_token_id or 0)
                self._encoder_graphs.capture()
            graphed = lambda: self._encoder_graphs.run(inp.input_ids)  # noqa: E731
            out["graphs"] = {"flops": out["flops"], **_slim(profile(graphed, self.args.reps, self.gpu))}
        return out

    def measure_vae(self) -> dict:
        vae = self.engine.vae
        lat = torch.randn(1, 16, self.h, self.w, device=self.device, dtype=self.dtype)
        fn = lambda: vae.decode(lat, return_dict=False)  # noqa: E731
        flops = count_flops(fn)
        if self.gpu and not self.args.no_compile:
            from actors.compiled import compile_vae_decoder

            compile_vae_decoder(vae)  # as the replica compiles it: one graph, dynamic height and width
        return {"flops": flops, **_slim(profile(fn, self.args.reps, self.gpu))}

    def accuracy(self, reference) -> dict:
        from actors.accuracy import option_label
        from actors.quantize import compare, reference_output, resolve_bf16_blocks

        st, n = self.state, len(self.engine.transformer.layers)
        blocks = resolve_bf16_blocks(st.bf16_blocks or [], n) if st.fp8 else []
        label = option_label(st.fp8, blocks, n, self.engine.packed.compiled)
        probe = reference_output(self.engine, self.args.accuracy_size, self.args.steps)
        return {"option": label, **compare(reference, probe)}

    # ---- the run -----------------------------------------------------------------------------------------------
    @torch.no_grad()  # as the replica runs (a graph compiled with grad on would be compiled again without)
    def run(self) -> dict:
        from actors.quantize import reference_output

        args = self.args
        if self.gpu:
            torch.backends.cudnn.benchmark = False  # as the replica runs (actors/startup.py)
            self.res["gemm_peak_tflops"] = gemm_peaks()
            self.save()
        else:
            self.res["notes"].append("tiny model on the CPU: the states named bf16 run in float32 here, and nothing "
                                     "is compiled; the FLOP counts are exact, the times only show the code runs")
        reference = None
        if not args.no_accuracy:  # eager bf16: what every lossy state is measured against
            reference = reference_output(self.engine, args.accuracy_size, args.steps)
        for b in args.batches:
            self.res["text_encoder"][str(b)] = self.measure_text_encoder(b)
        self._encoder_graphs = None  # their memory pool back before the transformer is timed
        if self.gpu:
            torch.cuda.empty_cache()
        if self.gpu:  # the benchmark harness's own count of a request's arithmetic, to set beside this one's
            from orchestrator.benchmark.sizes import request_tflop

            tokens = len(self.inputs(1)[0][0])
            self.res["analytic_request_tflop"] = {"caption_tokens": tokens, "tflop": round(
                request_tflop(args.size, args.size, tokens, args.steps), 1)}
        self.save()
        for st in plan_states(args.bf16_blocks):
            t0 = time.perf_counter()
            self.to_state(st)
            rows = self.res["states"].setdefault(st.name, {})
            for b in args.batches:
                rows[str(b)] = self.measure_step(b)
                self.save()
            if reference is not None:
                self.res["accuracy"][st.name] = self.accuracy(reference)
            rows["seconds_with_compile"] = round(time.perf_counter() - t0, 1)
            self.save()
        if not args.no_vae:
            self.res["vae"] = self.measure_vae()
        self.save()
        return self.res

    def save(self) -> None:
        (self.out / "roofline.json").write_text(json.dumps(self.res, indent=1, default=float))
        (self.out / "roofline.md").write_text(render(self.res))


def _slim(p: dict) -> dict:
    return {k: v for k, v in p.items() if k != "top_kernels"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for roofline.json and roofline.md")
    ap.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (FLOP accounting, CI)")
    ap.add_argument("--batches", help="batch sizes (default 1,4; tiny 1,2)")
    ap.add_argument("--size", type=int, help="image side in pixels (default 1024; tiny 64)")
    ap.add_argument("--bf16-blocks", help="one more fp8 state with these main blocks in bf16 (model.fp8_bf16_blocks' "
                    "form; default last:15, tiny last:1); 'none' for no such state")
    ap.add_argument("--words", type=int, help="words per prompt (default 100: about 110 tokens; tiny 8)")
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--reps", type=int, help="timed calls per measurement, median (default 5; tiny 2)")
    ap.add_argument("--accuracy-size", type=int, help="image side of the accuracy probe (default: --size)")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--no-vae", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="eager transformer and VAE")
    ap.add_argument("--compile-cache", help="inductor cache directory (as model.compile_cache_dir)")
    args = ap.parse_args(argv)
    args.batches = [int(x) for x in (args.batches or ("1,2" if args.tiny else "1,4")).split(",")]
    args.size = args.size or (64 if args.tiny else 1024)
    args.words = args.words or (8 if args.tiny else 100)
    args.reps = args.reps or (2 if args.tiny else 5)
    args.accuracy_size = args.accuracy_size or args.size
    args.bf16_blocks = args.bf16_blocks or ("last:1" if args.tiny else "last:15")
    args.bf16_blocks = "" if args.bf16_blocks == "none" else args.bf16_blocks
    if args.compile_cache:
        from actors.compile_cache import enable_compile_cache

        enable_compile_cache(args.compile_cache)
    t0 = time.perf_counter()
    res = Roofline(args).run()
    res["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out, "roofline.json").write_text(json.dumps(res, indent=1, default=float))
    print(render(res), flush=True)
    return res


if __name__ == "__main__":
    main()
