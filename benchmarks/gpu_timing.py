"""Timing helpers shared by the GPU probe scripts (run as ``python3 benchmarks/<script>.py``, which puts this
folder on sys.path)."""

import time

import torch


def first_call_s(fn) -> float:
    """Seconds of one synchronized call (the first call after a compile: the compile time plus one run)."""
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def timed(fn, reps: int = 5, warmup: bool = True) -> float:
    """Median seconds of ``reps`` synchronized calls, after one untimed call unless ``warmup`` is False."""
    if warmup:
        first_call_s(fn)
    return sorted(first_call_s(fn) for _ in range(reps))[reps // 2]


def uncompile(module: torch.nn.Module) -> None:
    """Undo ``compile_repeated_blocks`` / ``nn.Module.compile`` (``torch._dynamo.reset()`` alone leaves the
    blocks' compiled wrappers in place, so a later "eager" call would still compile and run compiled)."""
    for m in module.modules():
        m._compiled_call_impl = None


def one_step(eng, samples, steps: int = 9):
    """A function that runs the first denoising step of ``samples`` as a replica's loop runs it (the packed call
    built once, as the loop builds it when its running set changes), the same step again at every call."""
    from actors.steploop import prepare

    group, _ = prepare(eng, samples, steps)
    running = group.samples
    packed = eng.pack(running)
    start = [s.latents for s in running]

    def step():
        for s, lat in zip(running, start):
            s.latents, s.step, s.pred = lat, s.start, None
        eng.step(running, packed)
        return [s.latents for s in running]

    return step
