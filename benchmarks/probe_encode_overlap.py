"""Why a text encode takes many times longer beside running denoising steps than alone: one replica in this process
(no Ray, no router), the config's model, the worker's own stage threads and streams.

An encode of four prompts took several times its time alone beside another batch's denoise (one H100, compiled;
docs/benchmarks-history.md). The encode runs on its own thread and high-priority CUDA stream, so it does not queue
behind the denoise's kernels on one stream. Candidates: (1) the GIL, held by the denoise thread while it launches (or
while a launch blocks because the GPU's queue of pending launches is full); (2) the GPU itself, the encode's kernels
getting SMs only as the denoise's free them; (3) the launch queue, if the encode's launches wait for room behind
the denoise's. For every encode this probe records its wall time, the CPU time of the encode thread
(``time.thread_time``) and its GPU time (CUDA events on the encode stream). Phases:

1. ``alone``: encodes of four short prompts and of four prompts of 3-160 words, nothing else running; then
   ``alone-again``: the very same encodes once more. Every encode records the text encoder's input shape (prompts,
   padded tokens) and whether this probe had encoded that shape before (``new_shape``): if first-time shapes are
   the slow ones alone (one H100, tree 3a7c10f: a phase's first varied batch encoded alone in 0.95 s against
   0.13 s for short prompts), the encoder builds something per shape in the serving path (cuDNN's attention plans,
   which the transformer builds at warm-up for that reason), and its second pass is fast;
2. ``beside``: the same encodes back to back on the encode stage while another thread runs calls of four at the
   default size through ``run_batch`` (their steps in the replica's loop, then their decode, as served);
3. ``beside-switch``: as 2 with ``sys.setswitchinterval(0.0005)`` (the GIL handed over ten times as often): if
   the GIL is the cause, the encodes get much shorter here;
4. ``beside-synced``: as 2, with the batches' denoise waiting for its stream after every transformer block (the
   probe wraps ``engine.packed.block_fn``; serving code is unchanged), so the denoise never has more than one
   block's kernels queued: if a full launch queue is the cause (3), the encodes get much shorter here.

Wall much longer than both CPU and GPU time means the encode thread waits (GIL or launch queue); GPU time close to
wall means the GPU is shared. Each batch's denoise time beside the encodes is recorded too (what they cost it).

Writes ``OUT.json``. ``--tiny`` runs it on the CPU with the toy model (GPU times null; checks the script only).

    python3 benchmarks/probe_encode_overlap.py OUT.json benchmarks/configs/gpu-random.yaml \\
        --set model.compile=true --set model.compile_cache_dir=/tmp/zc --set model.quantization=fp8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from probe_replica import add_replica_args, report_head, start_replica  # noqa: E402

from zimage_common.messages import Batch, ImageRequest  # noqa: E402
from zimage_common.prompts import varied_prompt  # noqa: E402

SHORT = "a photograph of a lighthouse at dusk, number {}"


SEEN_SHAPES: set[tuple[int, int]] = set()


def encoder_shape(engine, prompts: list[str]) -> tuple[int, int]:
    """The text encoder's input shape for ``prompts`` as ``ZImageEngine._encode`` pads them: (prompts, longest)."""
    tok = engine.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                     enable_thinking=True) for p in prompts]
    n, length = tok(texts, padding="longest", max_length=512, truncation=True, return_tensors="pt").input_ids.shape
    return int(n), int(length)


def timed_encode(worker, prompts: list[str]) -> dict:
    """One encode stage call on the worker's encode thread (and stream): wall, thread CPU and GPU seconds, and the
    encoder's input shape, new or not to this probe."""
    engine = worker.engine
    shape = encoder_shape(engine, prompts)
    new_shape = shape not in SEEN_SHAPES
    SEEN_SHAPES.add(shape)

    def run():
        cuda = torch.cuda.is_available()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        cpu0, t0 = time.thread_time(), time.perf_counter()
        engine.encode_stage(prompts, [None] * len(prompts), [0.0] * len(prompts))  # ends by waiting for its stream
        wall, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
        gpu = None
        if cuda:
            end.record()
            end.synchronize()
            gpu = start.elapsed_time(end) / 1e3
        return {"wall_s": round(wall, 4), "cpu_s": round(cpu, 4), "gpu_s": None if gpu is None else round(gpu, 4),
                "shape": list(shape), "new_shape": new_shape}

    return worker._stages.run("encode", run)


def summary(rows: list[dict]) -> dict:
    out = {"n": len(rows)}
    for k in ("wall_s", "cpu_s", "gpu_s"):
        vals = [r[k] for r in rows if r.get(k) is not None]
        if vals:
            out[f"{k}_p50"] = round(statistics.median(vals), 4)
            out[f"{k}_max"] = round(max(vals), 4)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_replica_args(p)
    p.add_argument("--batches", type=int, default=3, help="calls of four run beside the encodes, per phase")
    p.add_argument("--alone", type=int, default=6, help="encodes of each kind in the alone phase")
    args = p.parse_args()

    cfg, worker, startup_s = start_replica(args)
    w, h = cfg.defaults.width, cfg.defaults.height
    steps = cfg.defaults.num_inference_steps
    report = report_head(cfg, startup_s, switch_interval_s=sys.getswitchinterval())
    kinds = {"short": lambda i: [SHORT.format(4 * i + j) for j in range(4)],
             "varied": lambda i: [varied_prompt(random.Random(1000 + 4 * i + j)) for j in range(4)]}
    for make in kinds.values():  # each kind's first call outside the record (its lengths' first use)
        timed_encode(worker, make(99))

    for label in ("alone", "alone-again"):  # the same prompts twice: every shape is new (or not) the first time only
        rows = {k: [timed_encode(worker, make(i)) for i in range(args.alone)] for k, make in kinds.items()}
        out = {k: {"summary": summary(v), "encodes": v} for k, v in rows.items()}
        for k, v in rows.items():
            for new in (True, False):
                if any(r["new_shape"] == new for r in v):
                    out[k]["summary_new_shape" if new else "summary_seen_shape"] = summary(
                        [r for r in v if r["new_shape"] == new])
        report["phases"][label] = out
        print(f"{label}:", {k: {s: o[s] for s in o if s.startswith("summary")} for k, o in out.items()}, flush=True)

    ids = iter(range(1_000_000))

    def batch() -> Batch:
        reqs = []
        for _ in range(4):
            i = next(ids)
            reqs.append(ImageRequest(f"b{i}", SHORT.format(i), 1000 + i, w, h, steps, 0.0))
        return Batch(next(ids), tuple(reqs))

    packed = worker.engine.packed
    block_fn = packed.block_fn

    def synced_block_fn(*a, **kw):  # the block, then wait for its stream: at most one block's kernels queued
        x = block_fn(*a, **kw)
        if x.is_cuda:
            torch.cuda.current_stream(x.device).synchronize()
        return x

    def beside(label: str, switch: float | None = None, synced: bool = False) -> None:
        old = sys.getswitchinterval()
        if switch is not None:
            sys.setswitchinterval(switch)
        if synced:
            packed.block_fn = synced_block_fn
        try:
            out: dict = {"batches": [], "encodes": {k: [] for k in kinds}}
            for n in range(args.batches):
                done = threading.Event()
                res = []
                t = threading.Thread(target=lambda: (res.append(worker.run_batch(batch())), done.set()), daemon=True)
                t.start()
                deadline = time.perf_counter() + 600
                while not (worker._loop is not None and worker._loop.running) and not done.is_set() \
                        and time.perf_counter() < deadline:
                    time.sleep(0.002)  # until the call's samples run in the loop (its denoise began)
                time.sleep(0.0 if args.tiny else 0.2)  # into its denoise (the toy model's batch is over in ms)
                i = 0
                while not done.is_set():
                    kind = list(kinds)[i % len(kinds)]
                    row = timed_encode(worker, kinds[kind](1000 * (n + 1) + i))
                    row["during_batch"] = not done.is_set()
                    out["encodes"][kind].append(row)
                    i += 1
                t.join()
                st = res[0].stage_times
                out["batches"].append({"denoise_s": round(st.denoise_s, 4), "decode_s": round(st.decode_s, 4),
                                       "encode_s": round(st.encode_s, 4)})
            # a batch alone after the phase: its denoise without encodes beside it, for comparison
            lone = worker.run_batch(batch()).results[0].stage_times
            out["batch_alone"] = {"denoise_s": round(lone.denoise_s, 4), "decode_s": round(lone.decode_s, 4)}
            out["summary"] = {k: summary([r for r in v if r["during_batch"]]) for k, v in out["encodes"].items()}
            report["phases"][label] = out
            print(f"{label}:", out["summary"], "batches", out["batches"], "alone", out["batch_alone"], flush=True)
        finally:
            sys.setswitchinterval(old)
            packed.block_fn = block_fn

    beside("beside")
    beside("beside-switch", switch=0.0005)
    beside("beside-synced", synced=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    with contextlib.suppress(Exception):
        worker._stages.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
