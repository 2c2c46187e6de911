"""The router in front of replicas' step loops, with fake replicas and a manual clock: work joins a busy replica
within its room, per-step hang detection, re-dispatch on loss, cancellation of running requests, and the join
policy each call carries (``router.scheduling``)."""

import asyncio

import pytest
from fakes import FakePool, ManualClock, fake_image, lost

from orchestrator.router import STEP_QUEUE_DEPTH, Router
from zimage_common.config import JoinPolicy, RouterConfig
from zimage_common.messages import BatchResult, ImageRequest, ImageResult, StageTimes, StepProgress


def req(i, size=64, steps=4):
    return ImageRequest(f"q{i}", f"prompt {i}", 1000 + i, size, size, steps, 0.0)


async def settle(n=10):
    for _ in range(n):
        await asyncio.sleep(0)


class StepReplica:
    """A replica with a step loop: every call stays in until the test finishes it; ``step()`` sends one progress
    event to every call in."""

    def __init__(self, replica_id, max_batch_tokens=1 << 40):
        self.replica_id = replica_id
        self.max_pixels = 1 << 40
        self.max_batch_tokens = max_batch_tokens
        self.batches = []
        self.calls = {}  # batch_id -> (batch, future, on_progress)
        self.cancelled = []
        self.fail_with = None
        self.loop_step = 0

    async def run(self, batch, on_progress=None):
        self.batches.append(batch)
        if self.fail_with is not None:
            raise self.fail_with
        fut = asyncio.get_running_loop().create_future()
        self.calls[batch.batch_id] = (batch, fut, on_progress)
        try:
            return await fut
        finally:
            self.calls.pop(batch.batch_id, None)

    def step(self, joined=0, parked=()):
        """One loop step: every call in reports it, but those naming a request in ``parked`` (less urgent samples
        skip the steps of more urgent ones and report nothing)."""
        self.loop_step += 1
        for batch, _, on_progress in list(self.calls.values()):
            if any(r.request_id in parked for r in batch.requests):
                continue
            on_progress(StepProgress(batch.batch_id, 1, 4, loop_step=self.loop_step, running=len(self.calls),
                                     joined=joined))

    def finish(self, request_id):
        for batch, fut, _ in list(self.calls.values()):
            if any(r.request_id == request_id for r in batch.requests):
                fut.set_result(BatchResult(batch.batch_id, self.replica_id, tuple(
                    ImageResult(r.request_id, True, self.replica_id, batch.batch_id, len(batch), r.seed, r.width,
                                r.height, image=fake_image(r), stage_times=StageTimes(total_s=0.0))
                    for r in batch.requests)))

    def in_loop(self):
        return [r.request_id for b, _, _ in self.calls.values() for r in b.requests]

    async def finish_all(self):
        """Answer every call in, oldest first, until none is left (new ones are handed over meanwhile)."""
        while self.in_loop():
            self.finish(self.in_loop()[0])
            await settle()

    async def cancel(self, request_ids):
        self.cancelled += request_ids
        return len(request_ids)


@pytest.fixture
def clock():
    return ManualClock()


def make_router(pool, clock, **cfg):
    base = dict(max_batch_size=4, max_wait_ms=0, queue_limit=100, request_timeout_s=60, max_attempts=3)
    base.update(cfg)
    r = Router(pool, RouterConfig(**base), clock=clock)
    r.start()
    return r


async def test_new_work_joins_a_busy_replica_within_its_room(clock):
    """A replica holds up to STEP_QUEUE_DEPTH running sets' worth (its loop decides who joins when); one call never
    exceeds one set's budget."""
    a = StepReplica("a", max_batch_tokens=req(0).tokens * 2)
    router = make_router(FakePool(a), clock)
    room = 2 * STEP_QUEUE_DEPTH
    tasks = [asyncio.create_task(router.submit(req(0)))]
    await settle()
    for i in range(1, room + 1):
        tasks.append(asyncio.create_task(router.submit(req(i))))
    await settle()
    held = [f"q{i}" for i in range(room)]
    assert sorted(a.in_loop()) == held and all(b.join == JoinPolicy() for b in a.batches)  # the last waits: no room
    assert max(len(b) for b in a.batches) <= 2
    a.finish("q0")
    await settle()
    assert sorted(a.in_loop()) == sorted(held[1:] + [f"q{room}"])  # handed over as soon as q0 is answered
    await a.finish_all()
    assert all(r.ok for r in await asyncio.gather(*tasks))
    await router.stop()


async def test_the_replica_holds_at_most_queue_depth_sets_of_max_batch_size(clock):
    a = StepReplica("a")
    router = make_router(FakePool(a), clock, max_batch_size=3)
    held = 3 * STEP_QUEUE_DEPTH
    tasks = []
    for i in range(held + 2):  # one call each
        tasks.append(asyncio.create_task(router.submit(req(i))))
        await settle()
    assert a.in_loop() == [f"q{i}" for i in range(held)]
    a.finish(a.in_loop()[0])
    await settle()
    assert len(a.in_loop()) == held
    await a.finish_all()
    assert all(r.ok for r in await asyncio.gather(*tasks))
    await router.stop()


async def test_hang_detection_counts_from_each_step(clock):
    a = StepReplica("a")
    pool = FakePool(a)
    router = make_router(pool, clock, first_batch_timeout_s=10, hang_min_s=1, max_attempts=1)
    task = asyncio.create_task(router.submit(req(0)))
    await settle()
    for _ in range(5):  # 40 s in all, never 10 s without a step: not hung
        await clock.advance(8)
        a.step()
        await settle()
    assert not task.done() and pool.failures == []
    await clock.advance(10.5)  # no step for longer than the limit: hung
    r = await task
    assert pool.failures == ["a"] and not r.ok and r.error_type == "replica_lost"
    await router.stop()


async def test_a_parked_job_call_is_not_hung_while_its_replicas_loop_steps(clock):
    """A batch job's call whose samples are parked reports no step while interactive samples step at its replica: it
    waits on a loop that runs, so its hang clock restarts with the loop's steps; once the loop runs none for longer
    than the limit, it is hung."""
    from dataclasses import replace

    from zimage_common.messages import BATCH_JOB

    a = StepReplica("a")
    pool = FakePool(a)
    router = make_router(pool, clock, first_batch_timeout_s=10, hang_min_s=1, max_attempts=1)
    job = asyncio.create_task(router.submit(replace(req(0), priority=BATCH_JOB)))
    await settle()
    live = asyncio.create_task(router.submit(req(1)))
    await clock.advance(0.1)
    await settle()
    assert sorted(a.in_loop()) == ["q0", "q1"]
    for _ in range(5):  # 40 s: the job's call never steps, the loop never stops for 10 s
        await clock.advance(8)
        a.step(parked={"q0"})
        await settle()
    assert not job.done() and pool.failures == []
    a.finish("q1")
    assert (await live).ok
    await clock.advance(10.5)  # the loop runs no step at all now
    r = await job
    assert pool.failures == ["a"] and not r.ok and r.error_type == "replica_lost"
    await router.stop()


async def test_lost_replica_requests_are_redispatched_in_step_mode(clock):
    a, b = StepReplica("a"), StepReplica("b")
    a.fail_with = lost()
    pool = FakePool(a, b)
    router = make_router(pool, clock, max_batch_size=2)
    tasks = [asyncio.create_task(router.submit(req(i))) for i in range(2)]
    await settle(30)
    assert pool.failures == ["a"] and sorted(b.in_loop()) == ["q0", "q1"]
    b.finish("q0")
    b.finish("q1")
    results = await asyncio.gather(*tasks)
    assert all(r.ok and r.replica_id == "b" for r in results)
    await router.stop()


async def test_a_cancelled_or_timed_out_running_request_leaves_the_loop(clock):
    a = StepReplica("a")
    router = make_router(FakePool(a), clock, request_timeout_s=30)
    gone = asyncio.create_task(router.submit(req(0)))
    slow = asyncio.create_task(router.submit(req(1), timeout_s=5))
    await settle()
    gone.cancel()
    await settle()
    assert a.cancelled == ["q0"]
    await clock.advance(6)
    r = await slow
    assert r.error_type == "timeout" and a.cancelled == ["q0", "q1"]
    await router.stop()


async def test_metrics_hooks_see_first_steps_and_each_loop_step_once(clock):
    from orchestrator.router import RouterObserver

    class Rec(RouterObserver):
        def __init__(self):
            self.first, self.loop = [], []

        def first_step(self, replica_id, waited_s):
            self.first.append(waited_s)

        def loop_step(self, replica_id, running, joined):
            self.loop.append((running, joined))

        def loop_idle(self, replica_id):
            self.loop.append("idle")

    a = StepReplica("a")
    rec = Rec()
    router = Router(FakePool(a), RouterConfig(max_batch_size=4, max_wait_ms=0, scheduling="step"), clock=clock,
                    observer=rec)
    router.start()
    t0 = asyncio.create_task(router.submit(req(0)))
    await settle()
    await clock.advance(2)
    t1 = asyncio.create_task(router.submit(req(1)))
    await settle()
    a.step(joined=2)  # two calls in: one loop step, seen twice, counted once
    await settle()
    assert rec.loop == [(2, 2)] and sorted(rec.first) == [0, 2]
    a.finish("q0")
    a.finish("q1")
    await asyncio.gather(t0, t1)
    assert rec.loop == [(2, 2), "idle"]
    await router.stop()


async def test_a_deployment_gives_each_replica_room_for_its_calls(tmp_path):
    """Each call holds one of the actor's concurrent slots while its samples run: a replica takes STEP_QUEUE_DEPTH x
    max_batch_size of them for interactive work and as many for a batch job's, plus a slot for health checks and
    one for cancellations."""
    from conftest import tiny_config
    from test_replicas import FakeBackend, FakeNode

    from orchestrator.deployment import Deployment

    backend = FakeBackend(FakeNode("n0", "id0"))
    cfg = tiny_config(tmp_path, deployment={"replicas": 1}, router={"max_batch_size": 6})
    dep = await Deployment.start(cfg, backend=backend, clock=ManualClock())
    try:
        spec = backend.made["r0"].spec
        assert spec.max_concurrency == 2 * STEP_QUEUE_DEPTH * 6 + 1 + 1 and spec.max_batch_size == 6
        assert dep.router.scheduling == "step"
    finally:
        await dep.shutdown()


async def test_a_running_set_names_no_more_distinct_adapters_than_the_replica_holds(clock):
    """The plan counts memory for ``lora_max_resident`` adapters (the router's ``max_batch_adapters``): work joins a
    busy replica only while its running set names at most that many, and the oldest waiting request is not
    overtaken by one whose adapters would fit."""
    from dataclasses import replace

    def styled(i, *names):
        return replace(req(i), loras=tuple((n, 1.0) for n in names))

    a = StepReplica("a")
    pool = FakePool(a)
    router = Router(pool, RouterConfig(max_batch_size=8, max_wait_ms=0, queue_limit=100, request_timeout_s=60),
                    clock=clock, max_batch_adapters=2)
    router.start()
    tasks = []
    for r in [styled(0, "x"), styled(1, "y"), styled(2, "z"), styled(3, "x"), req(4)]:
        tasks.append(asyncio.create_task(router.submit(r)))
        await settle()
    assert a.in_loop() == ["q0", "q1"]  # z would make three; q3 (x) and q4 would fit but wait behind q2
    a.finish("q0")
    await settle()
    assert a.in_loop() == ["q1", "q2", "q4"]  # y and z; q3's x would make three
    a.finish("q1")
    await settle()
    assert a.in_loop() == ["q2", "q4", "q3"]
    a.finish("q2")  # and q4, its batch-mate
    a.finish("q3")
    assert all(r.ok for r in await asyncio.gather(*tasks))
    await router.stop()


async def test_scheduling_changes_only_the_join_policy_each_call_carries(clock):
    """``router.scheduling`` is the join policy the calls carry (``RouterConfig.join_policy``): "step" by default,
    "batch" never joins a running set; the dispatch is the same for both, and the value can be switched on a running
    router (benchmarks/step_batching.py does), for the calls sent from then on."""
    assert RouterConfig().scheduling == "step" and RouterConfig().join_policy() == JoinPolicy()
    assert RouterConfig(scheduling="batch", step_join_window=3).join_policy() == JoinPolicy(window=3, never=True)
    a = StepReplica("a")
    router = make_router(FakePool(a), clock, scheduling="batch")
    tasks = [asyncio.create_task(router.submit(req(0)))]
    await settle()
    router.scheduling = "step"
    tasks.append(asyncio.create_task(router.submit(req(1))))
    await settle()
    assert a.in_loop() == ["q0", "q1"]  # both handed over at once: the same room either way
    assert [b.join.never for b in a.batches] == [True, False]
    with pytest.raises(ValueError, match="'step' or 'batch'"):
        router.scheduling = "whole"
    assert router.scheduling == "step"
    await a.finish_all()
    assert all(r.ok for r in await asyncio.gather(*tasks))
    await router.stop()


async def test_the_oldest_job_request_is_not_overtaken_by_newer_job_requests():
    """A replica whose job room cannot take the oldest waiting job request is held for it: a newer, smaller job
    request does not take the room it waits for (a job's large images would otherwise wait out their timeout)."""
    from zimage_common.messages import BATCH_JOB

    def job(name, size):
        return ImageRequest(name, "p", 1, size, size, 4, 0.0, priority=BATCH_JOB)

    clock = ManualClock()
    a = StepReplica("a", max_batch_tokens=1056)  # one 512x512 request; the room is two running sets' worth
    router = make_router(FakePool(a), clock)
    first = [asyncio.ensure_future(f) for f in router.admit([job("A", 512), job("B", 64)])]
    await settle()
    assert a.in_loop() == ["A", "B"]  # 1,120 tokens of job work: 992 left, short of another 512x512
    later = [asyncio.ensure_future(f) for f in router.admit([job("C", 512)])]
    await settle()
    later += [asyncio.ensure_future(f) for f in router.admit([job("D", 64)])]
    await settle()
    assert "C" not in a.in_loop() and "D" not in a.in_loop()
    await a.finish_all()
    assert all(r.ok for r in await asyncio.gather(*first, *later))
    await router.stop()
