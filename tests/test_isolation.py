"""One request's trouble stays its own (issue 11): per-request screening in the replica, bisection of batches that
fail as a whole in the router, per-sample checks while a batch runs. Fakes for the router; the tiny model for the
replica."""

import asyncio
import time

import numpy as np
import pytest
import torch
from fakes import FakePool, FakeReplica, ManualClock

from actors.screening import StepHook, preview_steps, screen, validate_prompt
from actors.steploop import generate
from actors.worker import PipelineWorker, WarmupSpec
from orchestrator.router import Router
from zimage_common.config import ModelConfig, RouterConfig
from zimage_common.messages import Batch, BatchResult, ImageRequest, ImageResult

BAD = "a fox \ud800 in snow"  # a lone surrogate: valid in JSON ("\ud800"), unencodable by any UTF-8 tokenizer


def req(i, prompt=None, size=64, seed=None, steps=2, partial_images=0):
    return ImageRequest(f"q{i}", prompt or f"prompt {i}", 100 + i if seed is None else seed, size, size, steps, 0.0,
                        partial_images=partial_images)


# ---- the router: a batch that fails as a whole is bisected -----------------------------------------------
class PoisonReplica(FakeReplica):
    """Fails every batch that holds a prompt with 'poison' in it, as a whole (as a model bug one input
    triggers would), either as data (replica_error results) or by raising (a transport-level failure)."""

    def __init__(self, *a, raise_=False, **kw):
        super().__init__(*a, **kw)
        self.raise_ = raise_

    async def run(self, batch, on_progress=None):
        if any("poison" in r.prompt for r in batch.requests):
            self.batches.append(batch)
            await asyncio.sleep(0)
            if self.raise_:
                raise RuntimeError("transport broke on this batch")
            return BatchResult(batch.batch_id, self.replica_id, tuple(
                ImageResult(request_id=r.request_id, ok=False, replica_id=self.replica_id, batch_id=batch.batch_id,
                            seed=r.seed, error="TypeError: internal", error_type="replica_error")
                for r in batch.requests))
        return await super().run(batch)


@pytest.mark.parametrize("raise_", [False, True], ids=["as-data", "raised"])
async def test_router_bisects_a_failed_batch_so_only_the_culprit_fails(raise_):
    replica = PoisonReplica("a", raise_=raise_)
    router = Router(FakePool(replica), RouterConfig(max_batch_size=4, max_wait_ms=0, max_attempts=1),
                    clock=ManualClock())
    router.start()
    reqs = [req(0), req(1), req(2, "poison pill"), req(3)]
    results = await asyncio.wait_for(asyncio.gather(*router.admit(reqs)), 5)
    by_id = {r.request_id: r for r in results}
    assert [by_id[f"q{i}"].ok for i in range(4)] == [True, True, False, True]
    assert by_id["q2"].error_type == "replica_error"
    # 4 -> halves of 2 -> the poisoned half split into singles; max_attempts=1 was never used up by the splits.
    assert [len(b) for b in replica.batches][0] == 4 and max(len(b) for b in replica.batches[1:]) <= 2
    assert all(by_id[f"q{i}"].attempts == 1 for i in (0, 1, 3))
    await router.stop()


async def test_a_failure_the_replica_kept_to_one_request_is_not_run_again():
    """Only the poisoned request's result failed (the replica isolated it): the others are delivered and nothing
    runs a second time."""

    class OneFails(FakeReplica):
        async def run(self, batch, on_progress=None):
            out = await super().run(batch)
            return BatchResult(out.batch_id, out.replica_id, tuple(
                ImageResult(request_id=r.request_id, ok=False, replica_id=self.replica_id, batch_id=batch.batch_id,
                            seed=r.seed, error="bad input", error_type="replica_error") if "poison" in q.prompt
                else r for r, q in zip(out.results, batch.requests)))

    replica = OneFails("a")
    router = Router(FakePool(replica), RouterConfig(max_batch_size=4, max_wait_ms=0), clock=ManualClock())
    router.start()
    results = await asyncio.wait_for(asyncio.gather(*router.admit([req(0), req(1, "poison pill"), req(2)])), 5)
    assert [r.ok for r in results] == [True, False, True]
    assert [len(b) for b in replica.batches] == [3]
    await router.stop()


async def test_a_batch_whose_every_member_failed_is_bisected_even_with_a_member_cancelled():
    """Every member failed, one of them cancelled (a timeout in the step loop, a cancel at the gate) and the rest with
    a replica error: the batch is still bisected, so the innocent members run again and succeed."""

    class Poison(FakeReplica):
        async def run(self, batch, on_progress=None):
            self.batches.append(batch)
            await asyncio.sleep(0)
            poisoned = any("poison" in r.prompt for r in batch.requests)
            out = []
            for r in batch.requests:
                kind = "cancelled" if r.request_id == "q9" and len(self.batches) == 1 else \
                    "replica_error" if poisoned else None
                out.append(ImageResult(request_id=r.request_id, ok=kind is None, replica_id=self.replica_id,
                                       batch_id=batch.batch_id, seed=r.seed, error=kind, error_type=kind))
            return BatchResult(batch.batch_id, self.replica_id, tuple(out))

    replica = Poison("a")
    router = Router(FakePool(replica), RouterConfig(max_batch_size=4, max_wait_ms=0, max_attempts=1),
                    clock=ManualClock())
    router.start()
    reqs = [req(0), req(1), req(2, "poison pill"), req(9)]
    results = {r.request_id: r for r in await asyncio.wait_for(asyncio.gather(*router.admit(reqs)), 5)}
    assert results["q0"].ok and results["q1"].ok
    assert not results["q2"].ok and results["q2"].error_type == "replica_error"
    assert len(replica.batches) > 1  # it was bisected
    await router.stop()


async def test_a_request_whose_caller_left_is_not_run_again_when_its_batch_is_bisected():
    """The caller of q1 went away while its batch ran; the batch then failed as a whole: q0 runs again alone (the
    bisection), q1 does not (nobody waits for it)."""

    class FailsOnce(FakeReplica):
        def __init__(self, rid):
            super().__init__(rid)
            self.gate = asyncio.Event()

        async def run(self, batch, on_progress=None):
            if self.batches:
                return await super().run(batch, on_progress)
            self.batches.append(batch)
            await self.gate.wait()
            return BatchResult(batch.batch_id, self.replica_id, tuple(
                ImageResult(request_id=r.request_id, ok=False, replica_id=self.replica_id, batch_id=batch.batch_id,
                            seed=r.seed, error="boom", error_type="replica_error") for r in batch.requests))

    replica = FailsOnce("a")
    router = Router(FakePool(replica), RouterConfig(max_batch_size=4, max_wait_ms=0), clock=ManualClock())
    router.start()
    first, second = (asyncio.ensure_future(w) for w in router.admit([req(0), req(1)]))
    while not replica.batches:
        await asyncio.sleep(0.001)
    second.cancel()
    await asyncio.sleep(0.01)
    replica.gate.set()
    assert (await asyncio.wait_for(first, 5)).ok
    ran = [r.request_id for b in replica.batches for r in b.requests]
    assert ran.count("q0") == 2 and ran.count("q1") == 1
    await router.stop()


async def test_admission_is_all_or_nothing():
    from zimage_common.errors import QueueFullError

    replica = FakeReplica("a", manual=True)
    router = Router(FakePool(replica), RouterConfig(max_batch_size=1, max_wait_ms=0, queue_limit=3),
                    clock=ManualClock())
    router.start()
    held = router.admit([req(0), req(1)])
    await asyncio.sleep(0.01)  # q0 and q1 at the replica (held by the fake)
    first = asyncio.ensure_future(asyncio.gather(*held, *router.admit([req(2), req(3)])))
    await asyncio.sleep(0.01)  # q2 and q3 wait: room for one more
    assert router.waiting == 2
    with pytest.raises(QueueFullError, match="room for 1 more"):
        router.admit([req(4), req(5)])
    assert router.waiting == 2  # nothing of the refused call was queued
    later = router.admit([req(6)])  # the one that fits still does
    assert router.waiting == 3
    for _ in range(5):
        while not replica.waiting:
            await asyncio.sleep(0.001)
        replica.release()
    results = await asyncio.wait_for(first, 5) + await asyncio.wait_for(asyncio.gather(*later), 5)
    assert [r.request_id for r in results] == ["q0", "q1", "q2", "q3", "q6"] and all(r.ok for r in results)
    assert sorted(r.request_id for b in replica.batches for r in b.requests) == ["q0", "q1", "q2", "q3", "q6"]
    await router.stop()


# ---- the replica: per-request screening --------------------------------------------------------------
@pytest.fixture(scope="module")
def worker(tiny_cache):
    w = PipelineWorker("r0", ModelConfig(source="tiny", dtype="float32", cache_dir=tiny_cache),
                       warmup=WarmupSpec(((32, 32),), 1), torch_threads=1)
    w.start()
    return w


def test_validate_prompt_counts_and_refuses(worker):
    tok = worker.engine.tokenizer
    n = validate_prompt(tok, "a red fox")
    templated = tok.apply_chat_template([{"role": "user", "content": "a red fox"}], tokenize=False,
                                        add_generation_prompt=True, enable_thinking=True)
    assert n == len(tok(templated)["input_ids"]) and n > len("a red fox")
    assert validate_prompt(tok, "x" * 5000) == 512  # truncated as the engine truncates
    with pytest.raises(ValueError, match="lone surrogate"):
        validate_prompt(tok, BAD)


def test_bad_prompt_in_a_batch_fails_alone(worker):
    """The issue's reproduction at the replica: one prompt the tokenizer cannot encode among three valid ones.
    Before, the whole batch raised in the tokenizer and all four failed."""
    reqs = [req(0, "a red fox", seed=1), req(1, BAD), req(2, "a lighthouse", seed=2), req(3, "a cat", seed=3)]
    out = worker.run_batch(Batch(1, tuple(reqs)))
    by_id = {r.request_id: r for r in out.results}
    assert [r.request_id for r in out.results] == ["q0", "q1", "q2", "q3"]
    bad = by_id["q1"]
    assert not bad.ok and bad.error_type == "invalid_request" and bad.param == "prompt"
    assert "lone surrogate" in bad.error
    for i in (0, 2, 3):
        assert by_id[f"q{i}"].ok and by_id[f"q{i}"].prompt_tokens > 0 and by_id[f"q{i}"].image_tokens == 16
    alone = worker.run_batch(Batch(2, (reqs[2],))).results[0]
    assert np.abs(alone.image.astype(int) - by_id["q2"].image.astype(int)).max() <= 1  # same image as alone


def test_size_past_the_position_table_is_refused_per_request(worker):
    side = worker.health().max_side
    assert side == 512 * 16  # the tiny transformer's axes_lens [1024, 512, 512], 16 pixels per image token
    batch = Batch(3, (ImageRequest("big", "x", 1, side + 16, 16, 1, 0.0), ImageRequest("ok", "y", 2, 48, 32, 1, 0.0)))
    r, ok = worker.run_batch(batch).results  # batches mix sizes: the one too long fails, its batch-mate runs
    assert not r.ok and r.error_type == "invalid_request" and r.param == "size" and str(side) in r.error
    assert ok.ok and ok.image.shape == (32, 48, 3) and ok.image_tokens == 6


def test_an_adapter_removed_while_its_request_runs_is_that_requests_400(worker, monkeypatch):
    """DELETE /v1/loras between a request's screening and its steps: the step's LoRA lookup fails. That request is
    the caller's 400 naming ``loras`` (a 500 before: the whole call counted as a server fault); its batch-mate,
    which failed with the step, is a replica_error the router runs again."""
    from dataclasses import replace as dc_replace

    import actors.screening
    from actors.lora import LoraStore

    monkeypatch.setattr(worker.engine, "loras", LoraStore(worker.engine.transformer, 2))
    monkeypatch.setattr(actors.screening, "lora_error", lambda engine, loras: None)  # screened before the DELETE
    named = dc_replace(req(0, seed=1), loras=(("gone", 1.0),))
    out = worker.run_batch(Batch(5, (named, req(1, seed=2))))
    gone, mate = out.results
    assert not gone.ok and gone.error_type == "invalid_request" and gone.param == "loras", gone
    assert "gone" in gone.error and "removed" in gone.error
    assert not mate.ok and mate.error_type == "replica_error"
    assert worker.run_batch(Batch(6, (req(1, seed=2),))).results[0].ok  # the replica serves on


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
def test_non_finite_sample_fails_alone(worker, monkeypatch):
    engine = worker.engine
    original = engine.initial_latents

    def poisoned(samples):
        latents = original(samples)
        latents[[s.seed for s in samples].index(666)] = torch.full_like(latents[0], float("nan"))
        return latents

    monkeypatch.setattr(engine, "initial_latents", poisoned)
    out = worker.run_batch(Batch(4, (req(0, seed=1), req(1, seed=666), req(2, seed=2))))
    assert [r.ok for r in out.results] == [True, False, True]
    assert out.results[1].error_type == "request_error" and "non-finite" in out.results[1].error


def test_preview_steps_spread_and_never_final():
    assert preview_steps(9, 1) == [5] and preview_steps(9, 3) == [2, 5, 7]
    assert preview_steps(3, 3) == [1, 2] and preview_steps(1, 2) == [] and preview_steps(9, 0) == []


def test_stream_yields_real_previews_for_those_who_asked(worker):
    batch = Batch(5, (req(0, steps=4, partial_images=2), req(1, steps=4)))
    items = list(worker.run_batch_stream(batch))
    progress, result = items[:-1], items[-1]
    assert [p.step for p in progress] == [1, 2, 3, 4]
    previews = [(p.step, rid, k, img) for p in progress for rid, k, img in p.previews]
    assert [(s, rid, k) for s, rid, k, _ in previews] == [(1, "q0", 0), (3, "q0", 1)]
    for *_, img in previews:
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and img.std() > 0
    assert all(r.ok for r in result.results)
    # The last estimate of the clean latents is the final latents: a preview at the last step would equal it.
    from actors.engine import Sample

    hook_images = []
    hook = StepHook(worker.engine, Batch(6, (req(0, steps=2),)))
    generate(worker.engine, [Sample("prompt 0", 100, 64, 64)], 2,
                           on_step=lambda i, n, d: (hook(i, n, d), hook_images.append(worker.engine.decode(d()))))
    final = worker.run_batch(Batch(7, (req(0, steps=2),))).results[0].image
    assert np.abs(hook_images[-1][0].astype(int) - final.astype(int)).max() <= 1


def test_a_calls_denoise_time_covers_its_final_check(worker, monkeypatch):
    """The final check reads the last step's output, so it waits for the steps a GPU still runs after the loop
    launched them: that wait counts in ``denoise_s``, not between the stages (a slow check stands in for it here)."""
    real = StepHook.__call__

    def slow_final(self, step, total, *args, **kw):
        if step == total:
            time.sleep(0.3)
        return real(self, step, total, *args, **kw)

    monkeypatch.setattr(StepHook, "__call__", slow_final)
    t0 = time.perf_counter()
    result = list(worker.run_batch_stream(Batch(11, (req(0, steps=2),))))[-1]
    wall = time.perf_counter() - t0
    times = result.stage_times
    assert result.results[0].ok and times.denoise_s >= 0.3
    assert wall - times.total_s < 0.3  # what is left outside the stages is less than the check's wait


def test_screen_without_tokenizer_still_refuses_surrogates(worker, monkeypatch):
    monkeypatch.setattr(worker.engine, "tokenizer", None)
    s = screen(worker.engine, Batch(8, (req(0), req(1, BAD))))
    assert [r.request_id for r in s.runnable] == ["q0"] and s.failed["q1"][1] == "prompt"
    assert s.prompt_tokens == {}


def test_step_hook_flags_non_finite_rows():
    batch = Batch(9, (req(0), req(1), req(2)))
    hook = StepHook(None, batch)
    lat = [torch.zeros(16, 4, 4), torch.zeros(16, 8, 2), torch.zeros(16, 4, 4)]  # sizes may differ
    lat[2][0, 0, 0] = float("inf")
    hook(2, 2, lambda: lat)
    assert hook.nonfinite == {"q2"}


def test_step_hook_reads_the_estimates_after_the_loops_mark():
    """The final check and the previews read the loop's estimates in ``engine.reading(ready)`` (on a GPU: the
    reader stream, waiting on the loop's event after the step that made them), and the preview decode gets the same
    mark; the loop's own ``finish`` decodes after its group's mark."""
    import contextlib

    from actors.steploop import Group, finish
    from zimage_common.messages import StageTimes

    class Engine:
        def __init__(self):
            self.log = []

        @contextlib.contextmanager
        def reading(self, ready=None):
            self.log.append(("reading", ready))
            yield

        def decode(self, latents, ready=None):
            self.log.append(("decode", len(latents), ready))
            return [np.zeros((4, 4, 3), np.uint8) for _ in latents]

        def decode_stage(self, latents, ready=None):
            return self.decode(latents, ready), 0.0

    eng, first, mark = Engine(), object(), object()
    hook = StepHook(eng, Batch(10, (req(0, steps=2, partial_images=1),)), emit=lambda ev: None)
    hook(1, 2, lambda: [torch.zeros(16, 4, 4)], (), first)  # its preview step
    hook(2, 2, lambda: [torch.zeros(16, 4, 4)], (), mark)  # its last: the non-finite check
    assert eng.log == [("decode", 1, first), ("reading", mark)] and hook.nonfinite == set()

    sample = type("S", (), {"cancelled": False, "latents": torch.zeros(16, 4, 4), "done": True, "group": None})()
    group = Group([sample])
    group.ready, group.joined_at, group.finished_at = mark, 1.0, 2.0
    eng.log.clear()
    images, _ = finish(eng, group, StageTimes())
    assert eng.log == [("decode", 1, mark)] and len(images) == 1


async def test_router_admits_and_schedules_an_unencodable_prompt_without_raising():
    """The router counts tokens of every request it queues: a lone surrogate must not raise there (it would fail the
    caller with a 500, or the router loop for everyone); the replica refuses the request alone."""
    replica = FakeReplica("a")
    router = Router(FakePool(replica), RouterConfig(max_batch_size=4, max_wait_ms=0), clock=ManualClock())
    router.start()
    results = await asyncio.wait_for(asyncio.gather(*router.admit([req(0), req(1, BAD)])), 5)
    assert [r.request_id for r in results] == ["q0", "q1"] and len(replica.batches) == 1
    await router.stop()
