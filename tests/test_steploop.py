"""The replica's step loop (actors/steploop.py) with the toy-size real pipeline, and the router in front of a real
worker in this process (no Ray). Assertions are on order and step counts, never on wall-clock speed."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import started_tiny_worker

from actors.compiled import counted
from actors.worker import PipelineWorker, WarmupSpec
from orchestrator.router import Router, RouterObserver
from zimage_common.config import JoinPolicy, ModelConfig, RouterConfig
from zimage_common.messages import Batch, BatchResult, ImageRequest, StepProgress


@pytest.fixture(scope="module")
def worker(tiny_cache):
    return started_tiny_worker(tiny_cache)


def same_image(a, b) -> bool:
    # the project's standard (tests/test_worker.py): fp32 batched vs single differ below 1e-5 before quantisation
    return a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.fixture
def slow_steps(worker):
    """Each loop step takes at least 20 ms, so a 50-step request is still running while others come and go."""
    loop = worker._step_loop()
    loop.fault = lambda names: time.sleep(0.02)
    yield
    loop.fault = worker._loop_fault


class Streamed:
    """A call run in a thread, recording its progress events."""

    def __init__(self, worker, batch):
        self.events: list[StepProgress] = []
        self.result: BatchResult | None = None
        self.thread = threading.Thread(target=self._run, args=(worker, batch), daemon=True)
        self.thread.start()

    def _run(self, worker, batch):
        for ev in worker.run_batch_stream(batch):
            if isinstance(ev, StepProgress):
                self.events.append(ev)
            else:
                self.result = ev

    def wait_steps(self, n, timeout=60):
        deadline = time.monotonic() + timeout
        while len(self.events) < n:
            assert time.monotonic() < deadline and self.thread.is_alive()
            time.sleep(0.005)

    def join(self):
        self.thread.join(timeout=120)
        return self.result


def test_short_request_joins_a_long_one_and_finishes_first_with_its_solo_image(worker, slow_steps):
    """The issue's CPU check: a 2-step request submitted while a 50-step one is denoising finishes long before it,
    and its image equals its solo run."""
    long = ImageRequest("long", "a slow detailed landscape", 1, 64, 64, 50, 0.0)
    short = ImageRequest("short", "a quick sketch of a cat", 2, 48, 32, 2, 1.5, "blurry")
    run = Streamed(worker, Batch(1, (long,)))
    run.wait_steps(3)
    steps_before = worker.loop_stats()["steps"]
    out = worker.run_batch(Batch(2, (short,)))
    long_at = len(run.events)
    assert out.results[0].ok and run.result is None  # the long one is still denoising
    assert long_at < 50 and worker.loop_stats()["steps"] - steps_before < 50
    long_out = run.join()
    assert long_out.results[0].ok and [e.step for e in run.events] == list(range(1, 51))
    assert max(e.running for e in run.events) == 2 and any(e.joined == 1 for e in run.events)
    solo = worker.run_batch(Batch(3, (short,))).results[0]
    assert same_image(out.results[0].image, solo.image)
    assert same_image(long_out.results[0].image, worker.run_batch(Batch(5, (long,))).results[0].image)


def test_any_mix_joins_and_each_image_equals_its_solo_run(worker):
    """Different step counts, sizes, prompt lengths and guidance, handed over at different times."""
    calls = [
        (ImageRequest("a", "a fox", 3, 64, 32, 4, 0.0), ImageRequest("b", "a much longer prompt " * 5, 4, 32, 96,
                                                                         4, 0.0)),
        (ImageRequest("c", "x", 5, 48, 48, 2, 2.5, "blurry"),),
        (ImageRequest("d", "a harbor at dawn", 6, 32, 32, 7, 0.0),),
    ]
    with ThreadPoolExecutor(3) as pool:
        futures = []
        for i, reqs in enumerate(calls):
            futures.append(pool.submit(worker.run_batch, Batch(10 + i, reqs)))
            time.sleep(0.01 * i)
        joined = [f.result() for f in futures]
    for out, reqs in zip(joined, calls):
        for r, q in zip(out.results, reqs):
            alone = worker.run_batch(Batch(20, (q,))).results[0]
            assert r.ok and r.image.shape == (q.height, q.width, 3) and same_image(r.image, alone.image), q


def test_layout_is_rebuilt_only_when_the_running_set_changes(worker, slow_steps):
    packed = worker.engine.packed
    built, refined = [], []
    original, refine = packed.pack, packed._refine
    packed.pack = lambda *a, **k: built.append(1) or original(*a, **k)
    packed._refine = lambda pieces, *a: refined.append(len(pieces)) or refine(pieces, *a)
    try:
        long = Streamed(worker, Batch(30, (ImageRequest("l30", "long", 1, 32, 32, 20, 0.0),)))
        long.wait_steps(2)
        worker.run_batch(Batch(31, (ImageRequest("s31", "short", 2, 32, 32, 3, 0.0),)))
        assert long.join().results[0].ok
    finally:
        del packed.pack, packed._refine
    # 20 + 3 sample-steps in 20 loop steps: built when the long one started, when the short one joined and when it
    # left (at most once more if the short one joined at the very first step), never per step; each caption is
    # refined once, when its sample first runs
    assert 2 <= len(built) <= 4 and sum(refined) == 2


def test_out_of_memory_shrinks_the_running_set_and_everyone_finishes(worker):
    worker.inject_fault("oom_above", max_batch=1)  # a step over one sample runs out of memory
    try:
        reqs = [ImageRequest(f"o{i}", f"prompt {i}", i, 32, 32, 3, 0.0) for i in range(3)]
        before = worker.loop_stats().get("oom_shrinks", 0)
        loop = worker._step_loop()
        gate = threading.Event()

        def held(names):  # the first step waits until all three calls are in the loop, so they share the next ones
            assert gate.wait(30)
            worker._loop_fault(names)

        loop.fault = held
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(worker.run_batch, Batch(40 + i, (r,))) for i, r in enumerate(reqs)]
            deadline = time.monotonic() + 30
            while len(loop._waiting) + len(loop._running) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            gate.set()
            outs = [f.result() for f in futures]
    finally:
        loop.fault = worker._loop_fault
        worker.inject_fault(None)
    assert all(o.results[0].ok for o in outs), [o.results[0].error for o in outs]
    stats = worker.loop_stats()
    assert stats["oom_shrinks"] > before and stats["running"] == 1  # it ran on, one sample at a time
    worker._loop._oom_cap = None  # the lowered budget would otherwise hold for OOM_CAP_STEPS steps
    for o, r in zip(outs, reqs):
        assert same_image(o.results[0].image, worker.run_batch(Batch(50, (r,))).results[0].image)


def test_a_step_that_fails_fails_only_the_call_at_fault(worker, slow_steps):
    loop = worker._step_loop()

    def poison(names):
        time.sleep(0.02)
        if "bad" in names:
            raise RuntimeError("a model bug one input triggers")

    loop.fault = poison
    good = Streamed(worker, Batch(60, (ImageRequest("good", "fine", 1, 32, 32, 8, 0.0),)))
    good.wait_steps(1)
    bad = worker.run_batch(Batch(61, (ImageRequest("bad", "poison", 2, 32, 32, 4, 0.0),)))
    assert not bad.results[0].ok and bad.results[0].error_type == "replica_error"
    assert good.join().results[0].ok and [e.step for e in good.events] == list(range(1, 9))


def test_a_cancelled_request_leaves_the_loop(worker, slow_steps):
    run = Streamed(worker, Batch(70, (ImageRequest("gone", "bye", 1, 32, 32, 50, 0.0),)))
    run.wait_steps(2)
    assert worker.cancel(["gone", "unknown"]) == 1
    out = run.join()
    assert out.results[0].error_type == "cancelled" and len(run.events) < 50


def test_cancelling_one_request_of_a_call_leaves_the_rest_running(worker, slow_steps):
    stay = ImageRequest("stay", "stay", 4, 32, 32, 12, 0.0)
    run = Streamed(worker, Batch(71, (ImageRequest("leave", "leave", 3, 32, 32, 12, 0.0), stay)))
    run.wait_steps(2)
    worker.cancel(["leave"])
    out = run.join()
    assert [r.error_type for r in out.results] == ["cancelled", None] and out.results[1].ok
    assert [e.step for e in run.events] == list(range(1, 13))
    assert same_image(out.results[1].image, worker.run_batch(Batch(72, (stay,))).results[0].image)


def test_previews_of_a_joined_call_are_decoded_off_the_loop(worker):
    from dataclasses import replace

    q = replace(ImageRequest("pv", "a preview", 11, 32, 32, 6, 0.0), partial_images=2)
    run = Streamed(worker, Batch(90, (q,)))
    out = run.join()
    previews = [(p[0], p[1], p[2].shape) for e in run.events for p in e.previews]
    assert out.results[0].ok and previews == [("pv", 0, (32, 32, 3)), ("pv", 1, (32, 32, 3))]
    assert [e.step for e in run.events] == list(range(1, 7))
    assert same_image(out.results[0].image, worker.run_batch(Batch(91, (q,))).results[0].image)


# ---- the router, with the real worker behind an in-process replica -------------------------------------------------
class InProcessReplica:
    """The router's ``Replica`` around a ``PipelineWorker`` in this process: each call runs in a thread, as a Ray
    actor with several concurrent calls would."""

    def __init__(self, worker, max_batch_tokens=1 << 20):
        self.worker = worker
        self.replica_id = worker.replica_id
        self.max_pixels = 1 << 30
        self.max_batch_tokens = max_batch_tokens
        self.batches: list[Batch] = []
        self.cancelled: list[str] = []

    async def run(self, batch, on_progress=None):
        self.batches.append(batch)
        loop = asyncio.get_running_loop()
        result = loop.create_future()

        def work():
            for ev in self.worker.run_batch_stream(batch):
                if loop.is_closed():  # the test's router stopped with this call still in the loop
                    continue
                if isinstance(ev, StepProgress):
                    if on_progress is not None:
                        loop.call_soon_threadsafe(on_progress, ev)
                else:
                    loop.call_soon_threadsafe(result.set_result, ev)

        threading.Thread(target=work, daemon=True).start()
        return await result

    async def cancel(self, request_ids):
        self.cancelled += request_ids
        return self.worker.cancel(request_ids)


class Pool:
    def __init__(self, *replicas):
        self.replicas = list(replicas)

    def live(self):
        return self.replicas

    def members(self):
        return self.replicas

    def report_failure(self, replica_id, error):
        raise AssertionError(f"{replica_id} failed: {error}")


class Recorder(RouterObserver):
    def __init__(self):
        self.first_steps, self.loop_steps = [], []

    def first_step(self, replica_id, waited_s):
        self.first_steps.append(waited_s)

    def loop_step(self, replica_id, running, joined):
        self.loop_steps.append((running, joined))


async def short_beside_long(router, long_req: ImageRequest, short_req: ImageRequest, poll_s: float = 0.005):
    """Send ``long_req``; once it has run 3 steps, send ``short_req`` and wait for it; then wait for the long one and
    run the short one again alone. Returns (short result, its progress events, the long one's steps when the short
    one finished, the long one's result, all its steps, the short one's solo result)."""
    long_steps, short_events = [], []
    long = asyncio.create_task(router.submit(long_req, on_progress=lambda ev: long_steps.append(ev.step)))
    while len(long_steps) < 3:
        await asyncio.sleep(poll_s)
    short = await router.submit(short_req, on_progress=short_events.append)
    long_steps_then = len(long_steps)
    assert short.ok and not long.done(), (short, long_steps_then)
    long_out = await long
    solo = await router.submit(short_req)  # alone in the loop now
    return short, short_events, long_steps_then, long_out, long_steps, solo


async def test_with_the_default_config_a_short_request_sent_while_a_long_one_runs_finishes_long_before_it(
        worker, slow_steps):
    """The issue's check, through the real router and replica path with the default ``RouterConfig``: a 2-step
    request sent while a 50-step one is denoising finishes long before it, and its image equals its solo run."""
    replica = InProcessReplica(worker)
    observer = Recorder()
    router = Router(Pool(replica), RouterConfig(), observer=observer)
    router.start()
    try:
        short, events, long_steps_then, long, long_steps, solo = await short_beside_long(
            router, ImageRequest("L", "a long one", 1, 64, 64, 50, 0.0),
            ImageRequest("S", "a short one", 2, 32, 48, 2, 0.0))
    finally:
        await router.stop()
    assert long_steps_then < 50 - 10  # long before the long one ends
    assert [ev.step for ev in events] == [1, 2]  # its progress starts when it joins, counted in its own steps
    assert long.ok and long_steps == list(range(1, 51))
    assert [b.join for b in replica.batches] == [RouterConfig().join_policy()] * 3
    assert len(observer.first_steps) == 3 and max(r for r, _ in observer.loop_steps) == 2
    assert solo.ok and same_image(short.image, solo.image)


async def test_router_scheduling_batch_never_joins_a_running_set(worker, slow_steps):
    """``router.scheduling = "batch"``: the same dispatch, but the replica's loop takes no newcomer into a running set,
    so the short request waits for the long one; switched back to "step" on the same router, it joins."""
    replica = InProcessReplica(worker)
    router = Router(Pool(replica), RouterConfig(scheduling="batch", max_wait_ms=0))
    router.start()
    try:
        for scheduling in ("batch", "step"):
            router.scheduling = scheduling
            long_steps: list[int] = []
            long = asyncio.create_task(router.submit(ImageRequest(f"L{scheduling}", "long", 1, 32, 32, 20, 0.0),
                                                     on_progress=lambda ev, seen=long_steps: seen.append(ev.step)))
            while len(long_steps) < 3:
                await asyncio.sleep(0.005)
            short = await router.submit(ImageRequest(f"S{scheduling}", "short", 2, 32, 32, 2, 0.0))
            assert short.ok and long.done() == (scheduling == "batch")
            assert (await long).ok
        with pytest.raises(ValueError, match="router.scheduling"):
            router.scheduling = "whole"
    finally:
        await router.stop()
    assert [b.join.never for b in replica.batches] == [True, True, False, False]


async def test_router_keeps_within_the_token_budget_and_never_overtakes_the_oldest(worker, slow_steps):
    small = [ImageRequest(f"s{i}", "small", i, 32, 32, 3, 0.0) for i in range(3)]
    big = ImageRequest("big", "big", 9, 256, 256, 3, 0.0)
    budget = big.tokens  # the big one runs alone; a small one runs beside other small ones
    assert small[0].tokens * 3 < budget < big.tokens + small[0].tokens
    replica = InProcessReplica(worker, max_batch_tokens=budget)
    router = Router(Pool(replica), RouterConfig(max_batch_size=8, max_wait_ms=0))
    router.start()
    try:
        first = asyncio.create_task(router.submit(small[0]))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(router.submit(q)) for q in (big, small[1], small[2])]
        results = await asyncio.gather(first, *rest)
    finally:
        await router.stop()
    assert all(r.ok for r in results)
    order = [b.requests[0].request_id for b in replica.batches]
    assert order.index("big") < order.index("s1")  # the big one waited for room; the small ones did not pass it


async def test_router_cancels_a_running_request_in_the_loop(worker, slow_steps):
    replica = InProcessReplica(worker)
    router = Router(Pool(replica), RouterConfig(max_batch_size=4, max_wait_ms=0))
    router.start()
    steps = []
    try:
        task = asyncio.create_task(router.submit(ImageRequest("C", "cancel me", 1, 32, 32, 50, 0.0),
                                                 on_progress=lambda ev: steps.append(ev.step)))
        while len(steps) < 2:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(400):
            if worker.loop_stats()["running"] == 0 or not worker._joined:
                break
            await asyncio.sleep(0.01)
    finally:
        await router.stop()
    assert replica.cancelled == ["C"] and "C" not in worker._joined and len(steps) < 50


# ---- under a real local Ray: the actor's concurrent calls, streaming and cancellation ------------------------------
@pytest.mark.ray
@pytest.mark.slow
def test_a_deployment_under_ray_joins_and_cancels_in_the_loop(ray_cluster, tiny_cache):
    from conftest import tiny_config

    from orchestrator.deployment import Deployment

    config = tiny_config(tiny_cache, deployment={"replicas": 1}, router={"max_wait_ms": 0})

    async def scenario():
        dep = await Deployment.start(config)
        try:
            (replica,) = dep.replicas.values()
            long_steps, gone_steps = [], []
            (long_req,) = dep.requests_for("a long one", seed=1, num_inference_steps=40)
            (short_req,) = dep.requests_for("a short one", seed=2, num_inference_steps=2, width=32, height=48)
            (gone_req,) = dep.requests_for("cancel me", seed=3, num_inference_steps=39)  # a call of its own
            long = asyncio.create_task(dep.submit(long_req, on_progress=lambda ev: long_steps.append(ev.step)))
            gone = asyncio.create_task(dep.submit(gone_req, on_progress=lambda ev: gone_steps.append(ev.step)))
            while len(long_steps) < 2 or len(gone_steps) < 2:
                await asyncio.sleep(0.01)
            short = await dep.submit(short_req)
            gone.cancel()
            long_done_when_short_was = long.done()
            long_result = await long
            solo = await dep.submit(short_req)
            stats = await replica.call("loop_stats")
            return short, long_done_when_short_was, long_result, long_steps, solo, stats, gone_steps
        finally:
            await dep.shutdown()

    short, long_was_done, long_result, long_steps, solo, stats, gone_steps = asyncio.run(scenario())
    assert short.ok and long_result.ok and not long_was_done and long_steps == list(range(1, 41))
    assert same_image(short.image, solo.image) and stats["joins"] >= 4
    assert len(gone_steps) < 39  # it left the loop when its caller went away


@pytest.mark.slow
def test_joins_and_leaves_compile_nothing_after_warmup():
    """The packed blocks compiled with dynamic shapes (inductor on the CPU here; tests/test_gpu.py does it on a GPU):
    after the worker's warm-up kinds (one sample, two, mixed sizes), a step loop whose running set changes at every
    join and leave (a new layout each time, guidance joining mid-way) runs under ``fail_on_recompile``, in the loop's
    own thread."""
    import shutil

    import torch

    from actors.engine import Sample, ZImageEngine
    from actors.models import build_components
    from actors.steploop import Group, RunningSample, StepLoop, generate

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor on the CPU needs a C++ compiler")
    comps = build_components("tiny", device="cpu", dtype=torch.float32, seed=0)
    eng = ZImageEngine(comps, dict.fromkeys(("transformer", "text_encoder", "vae"), "cpu"), torch.float32)
    eng.packed.compile()
    for batch in ([Sample("a red fox", 1, 64, 64)], [Sample("a red fox", 1, 64, 64)] * 2,
                  [Sample("a lighthouse", 2, 64, 64), Sample("x", 3, 48, 32)]):
        generate(eng, batch, 2)

    def group(sample, steps, guidance=0.0):
        enc = eng.encode([sample.prompt], [None], guidance)
        (lat,) = eng.initial_latents([sample])
        return Group([RunningSample.create(eng, sample.prompt, 1, lat, enc.positive[0],
                                           enc.negative[0] if guidance else None, guidance, steps)])

    loop = StepLoop(eng)
    try:
        with torch.compiler.set_stance("fail_on_recompile"), counted() as missed:
            long = loop.submit(group(Sample("a detailed city at night", 5, 64, 64), 12))
            while loop.stats.steps < 3:
                time.sleep(0.005)
            joined = [loop.submit(group(Sample("a quick sketch", 7, 48, 80), 3, 2.0)),
                      loop.submit(group(Sample("another", 8, 32, 32), 2))]
            for g in [long, *joined]:
                assert g.done.wait(300)
        assert not missed, missed  # every call had its graph: none fell back to eager
    finally:
        torch._dynamo.reset()
        eng.packed.block_fn = __import__("actors.packed", fromlist=["_block_forward"])._block_forward
    assert [g.error for g in [long, *joined]] == [None, None, None] and loop.stats.joins == 3


# ---- the loop's bookkeeping alone (a stand-in step: no model) -------------------------------------------------------
class CountingLoop:
    """A StepLoop whose step only advances each sample's index and records who ran."""

    def __init__(self, **kw):
        import torch

        from actors.steploop import StepLoop

        self.torch = torch
        from types import SimpleNamespace

        self.loop = StepLoop(engine=SimpleNamespace(devices={"transformer": torch.device("cpu")}), **kw)
        self.steps: list[list[str]] = []
        self.loop._step = self._step

    def _step(self, running):
        self.steps.append([s.name for s in running])
        for s in running:
            s.step += 1

    def group(self, name, tokens, steps, n=1, loras=(), on_step=None):
        from actors.steploop import Group, RunningSample

        t = self.torch.zeros(1)
        return Group([RunningSample(f"{name}{i}" if n > 1 else name, tokens, t, t, None, 0.0, None, steps,
                                    loras=tuple((a, 1.0) for a in loras)) for i in range(n)], on_step)

    def run_until(self, cond, limit=200):
        for _ in range(limit):
            if cond():
                return
            self.loop._guarded(wait=False)
        raise AssertionError("the loop never got there")


def test_the_loop_keeps_within_its_token_budget_and_sample_cap_first_come_first_served():
    c = CountingLoop(max_tokens=10, max_samples=3)
    groups = [c.group("a", 6, 3), c.group("b", 5, 2), c.group("c", 2, 2, n=3)]
    for g in groups:
        c.loop.submit(g)
    for g in groups:
        assert g.done.wait(10) and g.error is None
    tokens = {"a": 6, "b": 5, "c0": 2, "c1": 2, "c2": 2}
    assert all(sum(tokens[n] for n in names) <= 10 and len(names) <= 3 for names in c.steps)
    # b waits for a (6 + 5 > 10) and c waits behind b, first come first served
    first = {n: next(i for i, names in enumerate(c.steps) if n in names) for n in tokens}
    assert first["a"] <= first["b"] <= first["c0"]


def test_an_unexpected_loop_error_fails_the_calls_in_it_and_the_loop_goes_on():
    c = CountingLoop()
    original = c.loop._admit
    calls = []

    def admit_once_broken():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in the loop")
        return original()

    c.loop._admit = admit_once_broken
    first = c.loop.submit(c.group("x", 1, 2))
    assert first.done.wait(10) and isinstance(first.error, RuntimeError)
    second = c.loop.submit(c.group("y", 1, 2))
    assert second.done.wait(10) and second.error is None and c.steps[-1] == ["y"]


def test_requests_with_lora_adapters_join_a_running_loop_and_equal_their_solo_run(tiny_cache, tmp_path):
    """Per-request LoRA (actors/lora.py): a request with an adapter joins a loop running one without (and one with
    guidance, whose negative pass uses the adapter too); each image equals its solo run."""
    from dataclasses import replace

    from actors.lora import random_lora_state_dict, save_diffusers_lora
    from actors.models import build_pipeline

    sd, meta = random_lora_state_dict(build_pipeline("tiny").transformer, 4, std=0.1)
    path = save_diffusers_lora(tmp_path / "a", sd, meta)
    cfg = ModelConfig(source="tiny", dtype="float32", cache_dir=tiny_cache, lora_max_resident=2,
                      loras=[{"name": "a", "path": str(path)}])
    w = PipelineWorker("rl", cfg, warmup=WarmupSpec(((32, 32),), 1), torch_threads=1)
    w.start()
    w._step_loop().fault = lambda names: time.sleep(0.02)
    plain = ImageRequest("plain", "no adapter", 1, 32, 32, 12, 0.0)
    styled = replace(ImageRequest("styled", "with adapter", 2, 32, 48, 3, 2.0, "blurry"), loras=(("a", 0.8),))
    run = Streamed(w, Batch(1, (plain,)))
    run.wait_steps(2)
    joined = w.run_batch(Batch(2, (styled,))).results[0]
    assert joined.ok and run.result is None
    assert run.join().results[0].ok
    alone = w.run_batch(Batch(3, (styled,))).results[0]
    without = w.run_batch(Batch(4, (replace(styled, loras=()),))).results[0]
    assert same_image(joined.image, alone.image) and not same_image(joined.image, without.image)
    assert same_image(run.result.results[0].image, w.run_batch(Batch(5, (plain,))).results[0].image)


def test_a_sample_can_start_part_way_and_run_an_after_step_hook(worker):
    """The two seams image edits need (img2img: a start step from ``strength`` with the image's noised latents;
    inpainting: a blend after each step): a sample that starts at step 3 from the latents an uninterrupted run had
    after 3 steps ends exactly where that run ends, and ``after_step`` runs after each of its own steps."""
    import torch

    from actors.engine import Sample
    from actors.steploop import Group, RunningSample

    eng, loop = worker.engine, worker._step_loop()
    sample = Sample("a harbor at dawn", 5, 32, 32)
    enc = eng.encode([sample.prompt])
    (noise,) = eng.initial_latents([sample])
    seen = []

    def make(latents, start, hook=None):
        return Group([RunningSample.create(eng, "edit", 1, latents, enc.positive[0], None, 0.0, 6, start=start,
                                           after_step=hook)])

    full = loop.submit(make(noise, 0, lambda s: seen.append((s.step, s.latents.clone()))))
    assert full.done.wait(60) and full.error is None and [k for k, _ in seen] == [1, 2, 3, 4, 5, 6]
    resumed = loop.submit(make(seen[2][1], 3))
    assert resumed.done.wait(60) and resumed.error is None
    assert torch.equal(resumed.samples[0].latents, full.samples[0].latents)

    def blend(s):  # an inpainting-style blend: keep the left half at the first run's values
        s.latents[..., :8] = seen[s.step - 1][1][..., :8]

    masked = loop.submit(make(noise, 0, blend))
    assert masked.done.wait(60)
    assert torch.equal(masked.samples[0].latents[..., :8], full.samples[0].latents[..., :8])


def test_the_running_set_names_no_more_distinct_adapters_than_the_replica_holds():
    """The memory plan counts ``lora_max_resident`` adapters (the engine's LoRA store's ``max_resident``): a waiting
    sample joins only while the running set names at most that many, first come first served; the head of an empty
    set runs whatever it names."""
    from types import SimpleNamespace

    import torch

    from actors.steploop import StepLoop

    c = CountingLoop()
    c.loop.max_adapters = 2
    adapters = {"a": {"x"}, "b": {"y"}, "c": {"z"}, "d": {"x"}, "e": {"p", "q", "r"}, "f": set()}
    groups = [c.group(n, 1, 3 if n == "a" else 2, loras=sorted(adapters[n])) for n in adapters]
    with c.loop._cond:  # all waiting before the first step
        for g in groups:
            c.loop.submit(g)
    for g in groups:
        assert g.done.wait(10) and g.error is None
    assert all(len(set().union(*(adapters[n] for n in names))) <= 2 for names in c.steps if "e" not in names)
    assert ["e"] in c.steps  # three adapters: alone, once the set is empty
    first = {n: next(i for i, names in enumerate(c.steps) if n in names) for n in adapters}
    # c (z) waits until a (x) or b (y) leaves, and the rest wait behind it
    assert first["a"] == first["b"] == 0 and first["c"] > 0 and first["c"] <= first["d"] <= first["e"] <= first["f"]
    store = SimpleNamespace(max_resident=3)  # the limit's default: the replica's LoRA store
    assert StepLoop(SimpleNamespace(devices={"transformer": torch.device("cpu")}, loras=store)).max_adapters == 3
    assert StepLoop(SimpleNamespace(devices={"transformer": torch.device("cpu")}), max_adapters=5).max_adapters == 5


def test_a_cancel_that_arrives_before_its_call_is_submitted_still_takes_it_out():
    """A cancel that overtakes its call (the worker passes it on while the call is between encode and submit) is
    kept for ``CANCEL_KEEP_S``, through steps of other calls, and takes the call out before its first step."""
    now = [0.0]
    c = CountingLoop()
    c.loop.clock = lambda: now[0]
    c.loop.cancel({"late"})
    other = c.loop.submit(c.group("other", 1, 3))
    assert other.done.wait(10) and other.error is None and c.steps == [["other"]] * 3
    late = c.loop.submit(c.group("late", 1, 50))
    assert late.done.wait(10) and late.error is None and late.samples[0].cancelled
    assert all("late" not in names for names in c.steps)
    from actors.steploop import CANCEL_KEEP_S

    c.loop.cancel({"gone"})
    now[0] = CANCEL_KEEP_S + 1  # a cancelled name never submitted is dropped after a while
    again = c.loop.submit(c.group("gone", 1, 2))
    assert again.done.wait(10) and not again.samples[0].cancelled and c.steps[-2:] == [["gone"]] * 2


def test_a_cancel_during_encode_is_kept_until_the_call_joins_the_loop(worker):
    """``worker.cancel`` for a call still encoding (not in the loop yet) is not lost: the call leaves
    before its first step."""
    eng = worker.engine
    entered, release = threading.Event(), threading.Event()
    original = eng.encode

    def slow_encode(*a, **k):
        entered.set()
        assert release.wait(30)
        return original(*a, **k)

    eng.encode = slow_encode
    try:
        run = Streamed(worker, Batch(80, (ImageRequest("early", "bye", 1, 32, 32, 30, 0.0),)))
        assert entered.wait(30)
        assert worker.cancel(["early", "unknown"]) == 1
    finally:
        release.set()
        del eng.encode
    out = run.join()
    assert out.results[0].error_type == "cancelled" and run.events == []
    assert not worker._encoding and not worker._cancel_early and not worker._joined


def test_a_step_that_fails_part_way_puts_every_sample_back_before_isolating(worker):
    """``_step`` updates the samples one after another: when a later sample's update fails, the ones before it have
    already moved on. They are put back, so the per-call re-run advances them once: here the innocent sample is at
    its last step (a second advance would index past its schedule) and ends exactly as its solo run does."""
    import torch

    from actors.engine import Sample
    from actors.steploop import Group, RunningSample, StepLoop

    eng = worker.engine
    loop = StepLoop(eng, name="step-loop-test")
    sample = Sample("a harbor at dawn", 5, 32, 32)
    enc = eng.encode([sample.prompt])
    (noise,) = eng.initial_latents([sample])

    def boom(s):
        raise RuntimeError("a bug in one sample's hook")

    def make(name, steps, hook=None):
        return Group([RunningSample.create(eng, name, 1, noise, enc.positive[0], None, 0.0, steps,
                                           after_step=hook)])

    good, bad = make("good", 1), make("bad", 2, boom)
    with loop._cond:  # both in the first step, good first
        loop.submit(good)
        loop.submit(bad)
    assert good.done.wait(60) and bad.done.wait(60)
    assert good.error is None and isinstance(bad.error, RuntimeError) and loop.stats.isolated_failures == 1
    solo = loop.submit(make("solo", 1))
    assert solo.done.wait(60) and solo.error is None
    assert torch.equal(good.samples[0].latents, solo.samples[0].latents)


def test_a_per_call_rerun_that_runs_out_of_memory_shrinks_instead_of_failing_the_call():
    c = CountingLoop()
    seen = []

    def fault(names):
        seen.append(list(names))
        if "bad" in names:
            raise RuntimeError("a model bug one input triggers")
        if len(seen) == 2:  # the first per-call re-run, of big's two samples
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    c.loop.fault = fault
    big, bad = c.group("big", 1, 3, n=2), c.group("bad", 1, 3)
    with c.loop._cond:
        c.loop.submit(big)
        c.loop.submit(bad)
    assert big.done.wait(10) and bad.done.wait(10)
    assert big.error is None and isinstance(bad.error, RuntimeError) and "bug" in str(bad.error)
    assert c.loop.stats.oom_shrinks == 1 and all(s.step == 3 for s in big.samples)
    assert seen[:3] == [["big0", "big1", "bad"], ["big0", "big1"], ["bad"]]
    assert sum("big1" in names for names in c.steps) == 3  # every step once, after it went back to wait


# ---- the join policy (config.JoinPolicy), on the loop's admission alone --------------------------------------------
def _rs(name, tokens, steps, step=0, start=0):
    from actors.steploop import RunningSample

    z = torch.zeros(1)
    return RunningSample(name, tokens, z, z, None, 0.0, None, steps, start=start, step=step)


def _admitted(running, waiting, policy=None, **limits):
    from collections import deque

    from actors.steploop import StepLoop

    loop = StepLoop(None, policy=policy, **limits)
    loop._running, loop._waiting = list(running), deque(waiting)
    loop._admit()
    return [s.name for s in loop._running]


def test_join_policy_at_a_size_that_saturates_the_gpu():
    """1024x1024-class samples (4,128 tokens, over free_tokens): a set that ran two steps takes no equal newcomer
    (it waits for the set), one that ran at most `window` steps does; what waits for an empty set starts together."""
    big = 4128
    assert _admitted([_rs("a", big, 9, step=2)], [_rs("b", big, 9)]) == ["a"]
    assert _admitted([_rs("a", big, 9, step=1)], [_rs("b", big, 9)]) == ["a", "b"]
    assert _admitted([_rs("a", big, 9, step=0)], [_rs("b", big, 9)]) == ["a", "b"]  # not started: starts with it
    assert _admitted([], [_rs("b", big, 9), _rs("c", big, 9), _rs("d", big, 9)]) == ["b", "c", "d"]
    assert _admitted([], [_rs(x, big, 9) for x in "bcde"], max_tokens=3 * big) == ["b", "c", "d"]  # within budget
    assert _admitted([_rs("a", big, 9, step=1)], [_rs("b", big, 9)], policy=JoinPolicy(window=0)) == ["a"]


def test_join_policy_lets_short_and_cheap_work_in():
    big, small = 4128, 1056
    # a 2-step request beside a 50-step one at step 10: its work is a sliver of the long one's remaining work
    assert _admitted([_rs("long", big, 50, step=10)], [_rs("short", big, 2)]) == ["long", "short"]
    # a 4-step 512^2 beside a 9-step 1344x768 at step 3 (4,032 + 64 tokens): joins
    assert _admitted([_rs("wide", 4096, 9, step=3)], [_rs("small", small, 4)]) == ["wide", "small"]
    # ... but not beside one about to finish
    assert _admitted([_rs("wide", 4096, 9, step=7)], [_rs("small", small, 4)]) == ["wide"]
    # small images while the GPU is not saturated join at any step
    assert _admitted([_rs("a", small, 9, step=6), _rs("b", small, 9, step=4)], [_rs("c", small, 9)]) == ["a", "b", "c"]
    assert _admitted([_rs("a", small, 9, step=6)], [_rs("c", small, 9)],
                     policy=JoinPolicy(free_tokens=0, window=0, short_ratio=0)) == ["a"]
    # the hard limits still bind first
    assert _admitted([_rs("long", big, 50, step=10)], [_rs("short", big, 2)], max_samples=1) == ["long"]
    # first come first served: a head that does not pay holds back a cheap one behind it
    assert _admitted([_rs("a", big, 9, step=3)], [_rs("b", big, 9), _rs("c", small, 1)]) == ["a"]


def test_never_join_takes_no_newcomer_into_a_running_set_and_each_call_carries_its_own_policy():
    """``JoinPolicy(never=True)`` (``router.scheduling = "batch"``): not even a short request joins a set that has run
    a step; a set that has not started yet still takes it, and so does an empty one. A call's own policy (its
    ``Group.join``, from the router) overrides the loop's."""
    from actors.steploop import Group

    big, never = 4128, JoinPolicy(never=True)
    assert _admitted([_rs("long", big, 50, step=10)], [_rs("short", big, 2)], policy=never) == ["long"]
    assert _admitted([_rs("a", small := 64, 9, step=1)], [_rs("b", small, 9)], policy=never) == ["a"]
    assert _admitted([_rs("a", big, 9, step=0)], [_rs("b", big, 9)], policy=never) == ["a", "b"]
    assert _admitted([], [_rs("b", big, 9), _rs("c", big, 9)], policy=never) == ["b", "c"]
    short = _rs("short", big, 2)
    Group([short], join=never)  # the call says never: the loop's default (join) does not apply
    assert _admitted([_rs("long", big, 50, step=10)], [short]) == ["long"]
    short = _rs("short", big, 2)
    Group([short], join=JoinPolicy())
    assert _admitted([_rs("long", big, 50, step=10)], [short], policy=never) == ["long", "short"]


def test_pace_counts_step_times_by_running_set_size_and_skips_idle_gaps():
    from actors.step_cost import Pace

    now = [0.0]
    pace = Pace("loop", clock=lambda: now[0])
    for t, n in ((1.0, 1), (1.1, 1), (1.2, 2), (1.4, 2)):
        now[0] = t
        pace.step(n, 100 * n, 1, 0)
    pace.idle()
    now[0] = 20.0  # after an idle gap: not a step time
    pace.step(1, 100, 1, 3)
    assert pace.by_size[1][:2] == [2, pytest.approx(0.2)] and pace.by_size[2][:2] == [1, pytest.approx(0.2)]
    assert pace.joined == 5 and pace.waiting_max == 3
    assert pace.summary().startswith("1 running (100 tokens): 2 steps of 0.100s")


# ---- priority: less urgent samples are parked while more urgent ones run --------------------------------------------
def test_an_interactive_sample_runs_its_solo_steps_while_a_job_set_is_parked():
    """A batch-job set fills the loop's sample cap and token budget; an interactive sample submitted after a few of
    its steps joins at the next loop step regardless, finishes in its solo number of loop steps (the job's samples
    skip them), and the job's samples then resume and run exactly their own steps."""
    from zimage_common.messages import BATCH_JOB

    c = CountingLoop(max_tokens=8, max_samples=4)
    job = c.group("job", 2, 10, n=4)
    for s in job.samples:
        s.priority = BATCH_JOB
    c.loop.submit(job, start=False)
    for _ in range(3):
        c.loop._guarded(wait=False)
    live = c.group("live", 6, 4)
    c.loop.submit(live, start=False)
    before = len(c.steps)
    while not live.finished:  # (its call is answered at the next iteration's start)
        c.loop._guarded(wait=False)
    assert c.steps[before:] == [["live"]] * 4  # its solo 4 loop steps, the job parked throughout
    assert c.loop.stats.parked == 4 and all(s.step == 3 for s in job.samples)
    while not job.done.is_set():
        c.loop._guarded(wait=False)
    assert job.error is None and live.error is None
    assert len(c.steps) == 3 + 4 + 7 and all(len(names) == 4 for names in c.steps[before + 4:])


def test_less_urgent_waiting_samples_stay_queued_while_an_urgent_one_runs():
    """A job sample that arrives while an interactive one runs waits (it is not admitted only to be parked) and
    joins when the interactive one is done; an interactive sample queued behind job work goes first."""
    from zimage_common.messages import BATCH_JOB

    c = CountingLoop()
    first_job = c.group("j0", 1, 3)
    first_job.samples[0].priority = BATCH_JOB
    live = c.group("live", 1, 2)
    later_job = c.group("j1", 1, 2)
    later_job.samples[0].priority = BATCH_JOB
    with c.loop._cond:  # all waiting before the first step, the job work first
        c.loop.submit(first_job, start=False)
        c.loop.submit(live, start=False)
        c.loop.submit(later_job, start=False)
    for g in (first_job, live, later_job):
        while not g.done.is_set():
            c.loop._guarded(wait=False)
    assert c.steps == [["live"], ["live"], ["j0", "j1"], ["j0", "j1"], ["j0"]]


def test_a_parked_job_sample_and_the_interactive_one_equal_their_solo_runs_exactly(worker):
    """On the tiny model: a batch-job sample parked for the steps of an interactive one ends bit-identical to its
    uninterrupted solo run, and so does the interactive one."""
    from actors.engine import Sample
    from actors.steploop import StepLoop, prepare
    from zimage_common.messages import BATCH_JOB

    eng = worker.engine
    job_sample = Sample("a detailed catalogue photo", 11, 48, 32, 1.5, "blurry", name="job", tokens=1,
                        priority=BATCH_JOB)
    live_sample = Sample("a quick sketch of a cat", 12, 32, 32, name="live", tokens=1)

    def solo(sample, steps):
        group, _ = prepare(eng, [sample], steps)
        StepLoop(eng).run_alone(group)
        return group.samples[0].latents

    loop = StepLoop(eng, max_tokens=1, max_samples=1)  # the job fills the budget: the interactive one joins anyway
    job, _ = prepare(eng, [job_sample], 8)
    live, _ = prepare(eng, [live_sample], 3)
    assert job.samples[0].priority == BATCH_JOB and live.samples[0].priority == 0
    loop.submit(job, start=False)
    for _ in range(2):
        loop._guarded(wait=False)
    loop.submit(live, start=False)
    while not live.finished:
        loop._guarded(wait=False)
        assert job.samples[0].step == 2  # parked
    while not job.done.is_set():
        loop._guarded(wait=False)
    assert loop.stats.steps == 8 + 3 and job.error is None and live.error is None
    assert torch.equal(job.samples[0].latents, solo(job_sample, 8))
    assert torch.equal(live.samples[0].latents, solo(live_sample, 3))


def test_the_worker_passes_each_request_priority_to_the_loop(worker, slow_steps):
    """Through ``run_batch``: an interactive request sent while a batch job's request denoises finishes while the
    job's sample is parked (it moves at most a step or two, the race of the hand-over)."""
    from dataclasses import replace

    from zimage_common.messages import BATCH_JOB

    job = replace(ImageRequest("jobreq", "a slow detailed landscape", 1, 64, 64, 40, 0.0), priority=BATCH_JOB)
    live = ImageRequest("livereq", "a quick sketch of a cat", 2, 32, 32, 6, 0.0)
    run = Streamed(worker, Batch(41, (job,)))
    run.wait_steps(2)
    (s,) = [s for s in worker._loop._running if s.name == "jobreq"]
    at = s.step
    out = worker.run_batch(Batch(42, (live,)))
    assert out.results[0].ok and s.priority == BATCH_JOB and s.step - at <= 2 and run.result is None
    assert run.join().results[0].ok and [e.step for e in run.events] == list(range(1, 41))
