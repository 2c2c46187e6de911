"""Where a lone request's denoising time goes, layer by layer of the serving path (issue #31's 512x512 gap): one
replica in this process (no Ray, no router), the config's model, one request at a time, at each ``--sizes``.

Per size, each layer timed over the request's steps (median of ``--reps``): the wall time to the GPU's end
(``wall_s``), the same span between CUDA events (``device_s``) and the host's time to return from the last launch
(``host_s``). CUDA's launch queue lets the host run about a step ahead of a GPU-bound loop, so ``host_s`` a step
short of ``wall_s`` means the GPU sets the pace, and ``host_s`` close to ``wall_s`` means Python's launches do:

1. ``forward``: the packed transformer call alone, ``steps`` times on one layout;
2. ``engine_step``: ``ZImageEngine.step`` (the call, guidance, the Euler update) on the packed set;
3. ``run_alone``: the step loop run on this thread (``StepLoop.run_alone``: admission, timers, hooks);
4. ``serve``: ``PipelineWorker.run_batch`` of one request, the router's call (the loop on the denoise stage's thread,
   encode and decode on theirs); its ``denoise_s`` stage time.

Then, for the size first named, a cProfile of ``run_alone`` (Python functions by own time) and a torch.profiler
summary of ``serve`` (CPU ops by self time, the GPU's kernel time). Writes ``OUT.json`` and ``OUT.txt``.

    python3 benchmarks/probe_step_overhead.py OUT.json benchmarks/configs/gpu-random.yaml \\
        --set model.compile=true --set model.compile_cache_dir=/tmp/zc --sizes 512x512,1024x1024
    python3 benchmarks/probe_step_overhead.py /tmp/so.json --tiny --sizes 64x64      # the CPU check
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from probe_replica import add_replica_args, report_head, start_replica  # noqa: E402

from zimage_common.messages import Batch, ImageRequest  # noqa: E402

PROMPT = "a photograph of a lighthouse at dusk, waves breaking on the rocks, number {}"


class Clock:
    """Wall, host (until the last launch returned) and CUDA-event seconds of one timed block."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def __call__(self, fn) -> dict:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn()
        host = time.perf_counter() - t0
        device = None
        if self.cuda:
            end.record()
            torch.cuda.synchronize(self.device)
            device = start.elapsed_time(end) / 1e3
        return {"wall_s": time.perf_counter() - t0, "host_s": host, "device_s": device}


def median_of(rows: list[dict]) -> dict:
    return {k: None if rows[0][k] is None else round(statistics.median(r[k] for r in rows), 4) for k in rows[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_replica_args(p)
    p.add_argument("--sizes", default="512x512,1024x1024", help="WxH list")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    from actors.engine import Sample
    from actors.steploop import StepLoop, prepare

    cfg, worker, startup_s = start_replica(args)
    eng = worker.engine
    steps = cfg.defaults.num_inference_steps
    device = eng.devices["transformer"]
    clock = Clock(device)
    report = report_head(cfg, startup_s, sizes=args.sizes, reps=args.reps)
    if cfg.model.compile and device.type == "cuda":
        torch.compiler.set_stance("fail_on_recompile")
    text = io.StringIO()
    ids = iter(range(1_000_000))
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]

    def group(w: int, h: int):
        i = next(ids)
        g, _ = prepare(eng, [Sample(PROMPT.format(i), 1000 + i, w, h, name=f"s{i}")], steps)
        return g

    for w, h in sizes:
        rows: dict[str, list[dict]] = {k: [] for k in ("forward", "engine_step", "run_alone", "serve")}
        serve_denoise = []
        for _ in range(args.reps):
            g = group(w, h)
            packed = eng.pack(g.samples)
            s = g.samples[0]
            x = [s.latents.to(packed.dtype).unsqueeze(1)]
            t = packed.t_in[0]

            def forwards(x=x, t=t, packed=packed):
                for _ in range(steps):
                    eng.packed(x, t, None, packed.layout)

            with torch.no_grad():
                rows["forward"].append(clock(forwards))

            def engine_steps(g=g, packed=packed):
                for _ in range(steps):
                    eng.step(g.samples, packed)

            rows["engine_step"].append(clock(engine_steps))
            g = group(w, h)
            rows["run_alone"].append(clock(lambda g=g: StepLoop(eng).run_alone(g)))

            def serve():
                i = next(ids)
                r = worker.run_batch(Batch(i, (ImageRequest(f"r{i}", PROMPT.format(i), 1000 + i, w, h, steps,
                                                            0.0),))).results[0]
                assert r.ok, r.error
                serve_denoise.append(r.stage_times.denoise_s)

            rows["serve"].append(clock(serve))
        out = {k: median_of(v) for k, v in rows.items()}
        out["serve"]["denoise_stage_s"] = round(statistics.median(serve_denoise), 4)
        report["phases"][f"{w}x{h}"] = out
        print(f"{w}x{h}: " + "; ".join(f"{k} {v}" for k, v in out.items()), flush=True)

    w, h = sizes[0]
    g = group(w, h)
    prof = cProfile.Profile()
    prof.enable()
    StepLoop(eng).run_alone(g)
    prof.disable()
    stats = pstats.Stats(prof, stream=text)
    text.write(f"== cProfile of run_alone, {w}x{h}, {steps} steps (own time)\n")
    stats.sort_stats("tottime").print_stats(30)
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        i = next(ids)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tp:
            worker.run_batch(Batch(i, (ImageRequest(f"r{i}", PROMPT.format(i), 1000 + i, w, h, steps, 0.0),)))
        ka = tp.key_averages()
        text.write(f"== torch.profiler of serve, {w}x{h}: GPU kernel time "
                   f"{sum(e.self_device_time_total for e in ka) / 1e6:.4f} s\n")
        text.write(ka.table(sort_by="self_cpu_time_total", row_limit=30))
    Path(args.out).write_text(json.dumps(report, indent=2))
    Path(args.out).with_suffix(".txt").write_text(text.getvalue())
    print(text.getvalue()[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
