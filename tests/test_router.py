"""The router with fake replicas and a manual clock: batching, waiting, limits, failures, timeouts, cancellation
before a waiter first runs, job work beside interactive work, a raising progress listener, the order of retries."""

import asyncio

import pytest
from fakes import FakePool, FakeReplica, ManualClock, fake_image, lost

from orchestrator.router import Router
from zimage_common.config import RouterConfig
from zimage_common.errors import NotReadyError, QueueFullError
from zimage_common.messages import BATCH_JOB, INTERACTIVE, Batch, ImageRequest, StepProgress


def req(i, size=64, steps=4, prompt=None):
    return ImageRequest(f"q{i}", prompt or f"prompt {i}", 1000 + i, size, size, steps, 0.0)


async def settle(n=10):
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.fixture
def clock():
    return ManualClock()


def make_router(pool, clock, **cfg):
    base = dict(max_batch_size=4, max_wait_ms=100, queue_limit=100, request_timeout_s=60, max_attempts=3)
    base.update(cfg)
    r = Router(pool, RouterConfig(**base), clock=clock)
    r.start()
    return r


async def test_each_caller_gets_its_own_result(clock):
    a, b = FakeReplica("a"), FakeReplica("b")
    router = make_router(FakePool(a, b), clock)
    reqs = [req(i, prompt="p" * i) for i in range(8)]
    results = await asyncio.gather(*(router.submit(q) for q in reqs))
    assert [r.request_id for r in results] == [f"q{i}" for i in range(8)]
    assert all(r.ok and (r.image == fake_image(reqs[i])).all() for i, r in enumerate(results))
    assert {r.replica_id for r in results} == {"a", "b"}
    assert sorted(len(bt) for bt in a.batches + b.batches) == [4, 4]
    await router.stop()


async def test_step_scheduling_sends_a_lone_request_at_once(clock):
    """A running loop takes later arrivals at its next step, so waiting for batch-mates only delays the first one:
    under step scheduling max_wait_ms holds nobody (it is scheduling=batch's)."""
    a = FakeReplica("a")
    router = make_router(FakePool(a), clock, max_wait_ms=100, scheduling="step")
    await asyncio.wait_for(router.submit(req(0)), 1)
    assert [len(b) for b in a.batches] == [1] and clock.now() == 0
    router.scheduling = "batch"
    t = asyncio.create_task(router.submit(req(1)))
    await settle()
    assert len(a.batches) == 1  # whole batches wait for batch-mates again
    await clock.advance(0.11)
    await t
    await router.stop()


async def test_partial_batch_waits_max_wait_then_goes(clock):
    a = FakeReplica("a")
    router = make_router(FakePool(a), clock, max_wait_ms=100, scheduling="batch")
    t = asyncio.create_task(router.submit(req(0)))
    await settle()
    assert a.batches == []  # free replica, but the batch may still grow
    await clock.advance(0.05)
    t2 = asyncio.create_task(router.submit(req(1)))
    await settle()
    assert a.batches == []
    await clock.advance(0.06)  # 110 ms after the first request
    await asyncio.gather(t, t2)
    assert [len(b) for b in a.batches] == [2]
    await router.stop()


async def test_no_idle_replica_while_work_waits(clock):
    """Each replica holds up to two running sets' worth (``STEP_QUEUE_DEPTH`` x max_batch_size images); what is
    beyond that waits in the router's queue and goes to the first replica with room."""
    a, b = FakeReplica("a", manual=True), FakeReplica("b", manual=True)
    router = make_router(FakePool(a, b), clock, max_batch_size=2, max_wait_ms=0)
    tasks = [asyncio.create_task(router.submit(req(i))) for i in range(10)]
    await settle()
    assert a.waiting == 2 and b.waiting == 2  # both full, two requests still queued
    assert router.waiting == 2
    a.release()
    await settle()
    assert a.waiting == 2 and router.waiting == 0  # a took the rest as soon as it had room
    a.release(2)
    b.release(2)
    await asyncio.gather(*tasks)
    await router.stop()


async def test_queue_limit_rejects_at_once(clock):
    a = FakeReplica("a", manual=True)
    router = make_router(FakePool(a), clock, max_batch_size=1, max_wait_ms=0, queue_limit=2)
    running = [asyncio.create_task(router.submit(req(i))) for i in (0, 1)]  # the replica holds two
    await settle()
    queued = [asyncio.create_task(router.submit(req(i))) for i in (2, 3)]
    await settle()
    assert a.waiting == 2 and router.waiting == 2
    with pytest.raises(QueueFullError):
        await router.submit(req(4))
    for _ in range(4):
        a.release()
        await settle()
    await asyncio.gather(*running, *queued)
    await router.stop()


async def test_fifo_dispatch_order(clock):
    a = FakeReplica("a")
    router = make_router(FakePool(a), clock, max_batch_size=1, max_wait_ms=0)
    await asyncio.gather(*(router.submit(req(i)) for i in range(5)))
    assert [b.requests[0].request_id for b in a.batches] == [f"q{i}" for i in range(5)]
    await router.stop()


async def test_replica_error_fails_its_requests_without_hanging(clock):
    a = FakeReplica("a")
    a.error_type = "replica_error"
    router = make_router(FakePool(a), clock, max_wait_ms=0)
    results = await asyncio.wait_for(asyncio.gather(*(router.submit(req(i)) for i in range(3))), 5)
    assert all(not r.ok and r.error_type == "replica_error" for r in results)
    await router.stop()


async def test_transport_exception_fails_requests(clock):
    a = FakeReplica("a")
    a.fail_with = RuntimeError("bad pickle")
    router = make_router(FakePool(a), clock, max_wait_ms=0)
    r = await asyncio.wait_for(router.submit(req(0)), 5)
    assert not r.ok and "bad pickle" in r.error
    await router.stop()


async def test_lost_replica_requests_are_redispatched(clock):
    a, b = FakeReplica("a"), FakeReplica("b", manual=True)
    a.fail_with = lost()
    pool = FakePool(a, b)
    router = make_router(pool, clock, max_batch_size=2, max_wait_ms=0)
    tasks = [asyncio.create_task(router.submit(req(i))) for i in range(4)]
    await settle(30)
    assert pool.failures == ["a"]
    while b.waiting:
        b.release()
        await settle()
    results = await asyncio.gather(*tasks)
    assert all(r.ok and r.replica_id == "b" for r in results)
    assert max(r.attempts for r in results) == 2
    await router.stop()


async def test_attempts_are_bounded(clock):
    a = FakeReplica("a")
    a.fail_with = lost()

    class StubbornPool(FakePool):
        def report_failure(self, replica_id, error):
            self.failures.append(replica_id)  # never takes it out: every attempt fails

    router = make_router(StubbornPool(a), clock, max_wait_ms=0, max_attempts=3)
    r = await asyncio.wait_for(router.submit(req(0)), 5)
    assert not r.ok and r.error_type == "replica_lost" and r.attempts == 3
    await router.stop()


async def test_oom_splits_the_batch(clock):
    a = FakeReplica("a")
    a.oom_above = 1
    router = make_router(FakePool(a), clock, max_batch_size=4, max_wait_ms=0)
    results = await asyncio.gather(*(router.submit(req(i)) for i in range(4)))
    assert all(r.ok for r in results)
    sizes = [len(b) for b in a.batches]
    assert sizes[0] == 4 and max(sizes[1:]) == 2  # halved, then halved again (batches of 2 also OOM here)
    assert all(r.batch_size == 1 and r.attempts == 1 for r in results)  # a split is not a failed attempt
    await router.stop()


async def test_oom_on_single_request_is_a_clear_error(clock):
    a = FakeReplica("a")
    a.oom_above = 0
    router = make_router(FakePool(a), clock, max_wait_ms=0)
    r = await router.submit(req(0))
    assert not r.ok and r.error_type == "out_of_memory" and "single 64x64 image" in r.error
    await router.stop()


async def test_timeout_while_queued(clock):
    a = FakeReplica("a", manual=True)
    router = make_router(FakePool(a), clock, max_batch_size=1, max_wait_ms=0, request_timeout_s=5)
    first = [asyncio.create_task(router.submit(req(i))) for i in (0, 1)]  # the replica holds two
    await settle()
    last = asyncio.create_task(router.submit(req(2)))
    await settle()
    await clock.advance(6)
    r0, r1, r2 = await asyncio.gather(*first, last)
    assert r2.error_type == "timeout" and "while queued" in r2.error
    assert all(r.error_type == "timeout" and "while running" in r.error for r in (r0, r1))
    assert router.waiting == 0
    a.release(2)
    await router.stop()


async def test_cancelled_request_is_dropped_before_running(clock):
    a = FakeReplica("a", manual=True)
    router = make_router(FakePool(a), clock, max_batch_size=1, max_wait_ms=0)
    first = [asyncio.create_task(router.submit(req(i))) for i in (0, 1)]  # the replica holds two
    await settle()
    doomed = asyncio.create_task(router.submit(req(2)))
    await settle()
    doomed.cancel()
    await settle()
    assert router.waiting == 0
    a.release(2)
    await asyncio.gather(*first)
    await settle()
    assert [b.requests[0].request_id for b in a.batches] == ["q0", "q1"]
    await router.stop()


async def test_no_replicas_means_not_ready(clock):
    router = make_router(FakePool(), clock)
    with pytest.raises(NotReadyError):
        await router.submit(req(0))
    await router.stop()


async def test_router_respects_replica_limits(clock):
    small = FakeReplica("small", max_pixels=64 * 64, max_batch_tokens=2 * 64)
    big = FakeReplica("big")
    router = make_router(FakePool(small, big), clock, max_batch_size=8, max_wait_ms=0)
    results = await asyncio.gather(*(router.submit(req(i, size=128 if i == 0 else 64)) for i in range(9)))
    assert all(r.ok for r in results) and results[0].replica_id == "big" and small.batches
    assert all(len(b) <= 2 and all(r.width == 64 for r in b.requests) for b in small.batches)
    await router.stop()


async def test_drain_waits_for_inflight(clock):
    a = FakeReplica("a", manual=True)
    router = make_router(FakePool(a), clock, max_wait_ms=0)
    t = asyncio.create_task(router.submit(req(0)))
    await settle()
    drain = asyncio.create_task(router.drain(5))
    await settle()
    with pytest.raises(NotReadyError):
        await router.submit(req(1))
    assert not drain.done()
    a.release()
    assert await drain is True
    assert (await t).ok
    await router.stop()


async def test_requests_wait_for_a_recovering_replica(clock):
    a = FakeReplica("a")
    pool = FakePool(a)
    pool.down.add("a")  # restarting: a member, not live
    router = make_router(pool, clock, max_wait_ms=0)
    t = asyncio.create_task(router.submit(req(0)))
    await settle()
    assert not t.done() and router.waiting == 1
    pool.down.clear()
    router.wake()
    assert (await t).ok
    await router.stop()


async def test_the_router_learns_each_replicas_speed_from_its_good_batches(clock):
    """The hang limit's expected time comes from the batches' own stage times (seconds per token-step, a moving
    average); a failed batch's times teach it nothing."""
    from zimage_common.messages import StageTimes

    a = FakeReplica("a")
    a.stage_times = StageTimes(encode_s=0.25, image_encode_s=0.125, denoise_s=2.0, total_s=2.375)
    router = make_router(FakePool(a), clock, max_wait_ms=0)
    assert router.load("a").rate is None
    await router.submit(req(0))
    rate = router.load("a").rate
    assert rate == pytest.approx(2.375 / (req(0).tokens * 4))
    a.error_type = "replica_error"
    a.stage_times = StageTimes(encode_s=5.0, total_s=50.0)
    assert not (await router.submit(req(1))).ok
    assert router.load("a").rate == rate
    limit = router.load("a").hang_limit(Batch(9, (req(9),)), 5.0, 0.0, 900.0)
    assert limit == pytest.approx(5.0 * rate * req(9).tokens * 4)
    await router.stop()


async def test_a_replicas_books_outlive_its_recovery_and_go_once_it_is_dropped_and_its_work_is_back(clock):
    """What the router learned of a replica (its speed) survives a recovery, which keeps its id; a replica dropped
    for good (its id never comes back) leaves no books behind, but not before its outstanding batch returns."""
    a, b = FakeReplica("a"), FakeReplica("b", manual=True)
    pool = FakePool(a, b)
    router = make_router(pool, clock, max_wait_ms=0)
    assert (await router.submit(req(0))).ok
    pool.down.add("a")  # recovering: still a member
    router.wake()
    t = asyncio.create_task(router.submit(req(1)))
    await settle()
    assert router.load("a").rate is not None and router.load("b").outstanding == 1
    pool.down.discard("a")
    pool.replicas.remove(b)  # dropped for good, with a batch out
    router.wake()
    await settle()
    assert "b" in router._loads
    b.release()
    assert (await t).ok
    await settle()
    assert set(router._loads) == {"a"}
    await router.stop()


# ---- edges: cancellation before a waiter runs, job work, listeners, retry order ------------------------------
def preq(i, size=64, steps=4, priority=INTERACTIVE):
    return ImageRequest(f"q{i}", f"prompt {i}", 1000 + i, size, size, steps, 0.0, priority=priority)


async def test_cancelling_admit_waiters_before_they_start_drops_their_requests(clock):
    """``admit``'s docstring: cancelling a returned awaitable drops its request if it has not been dispatched yet.
    ``Deployment.generate`` gathers them (``asyncio.gather(*admit(...))``): a caller cancelled before the gathered
    waiters first run cancels them unstarted, and their requests must not run for nobody."""
    a = FakeReplica("a", manual=True)
    router = make_router(FakePool(a), clock, max_batch_size=1, max_wait_ms=0)
    busy = [asyncio.create_task(router.submit(preq(i))) for i in (0, 1)]  # the replica holds two
    await settle()
    assert a.waiting == 2
    gathered = asyncio.gather(*router.admit([preq(2), preq(3)]))
    gathered.cancel()  # the caller goes away (a client disconnect) before the waiters ran
    await settle()
    with pytest.raises(asyncio.CancelledError):
        await gathered
    assert router.waiting == 0, "cancelled requests are still queued"
    a.release(2)
    await asyncio.gather(*busy)
    await settle(30)
    ran = [b.requests[0].request_id for b in a.batches]
    assert ran == ["q0", "q1"], f"cancelled requests were dispatched: {ran}"
    await router.stop()


async def test_batch_job_work_is_not_stalled_by_interactive_work_no_free_replica_can_take(clock):
    """Under scheduling=batch a job's request waits max_wait_ms for batch-mates, then goes to an idle replica. While an
    interactive request waits that no *free* replica can serve (it needs the big replica, which is restarting),
    ``next_deadline`` must still count the job's ready time: else the router sleeps until the earliest timeout and
    the idle small replica stays idle for the whole request timeout."""
    small = FakeReplica("small", max_pixels=64 * 64)
    big = FakeReplica("big")
    pool = FakePool(small, big)
    pool.down.add("big")  # recovering: a member (admission counts it), not live
    router = make_router(pool, clock, max_wait_ms=100, scheduling="batch", request_timeout_s=60)
    big_one = asyncio.create_task(router.submit(preq(0, size=128), timeout_s=30))  # only "big" can run it
    await settle()
    job = asyncio.create_task(router.submit(preq(1, priority=BATCH_JOB)))
    await settle()
    assert small.batches == []
    await clock.advance(0.2)  # past max_wait_ms
    await settle()
    assert [b.requests[0].request_id for b in small.batches] == ["q1"], \
        "the job's request waits although the small replica is idle and its max wait is over"
    await asyncio.wait_for(job, 1)
    big_one.cancel()
    await router.stop()


class SteppingReplica(FakeReplica):
    """Reports one denoising step to the router before answering (as a real replica's stream does)."""

    def __init__(self, replica_id):
        super().__init__(replica_id)
        self.ran = []  # every batch the replica started, the failed ones included

    async def run(self, batch, on_progress=None):
        self.ran.append(batch)
        await asyncio.sleep(0)
        if on_progress is not None:
            on_progress(StepProgress(batch.batch_id, 1, 4, loop_step=len(self.ran), running=len(batch)))
        return await super().run(batch, on_progress)


async def test_one_callers_raising_progress_listener_does_not_rerun_its_batch_mates(clock):
    """``submit(on_progress=...)`` is the caller's code. When it raises, the exception must stay out of the replica's
    call: else the whole batch counts as failed, it is bisected and the *other* caller's request runs a second time
    on the GPU (and the failing caller gets no image although its generation succeeded)."""
    a = SteppingReplica("a")
    router = make_router(FakePool(a), clock, max_batch_size=2, max_wait_ms=0)

    def broken(ev):
        raise RuntimeError("caller's progress callback is broken")

    t0 = asyncio.create_task(router.submit(preq(0), on_progress=broken))
    t1 = asyncio.create_task(router.submit(preq(1)))
    r0, r1 = await asyncio.wait_for(asyncio.gather(t0, t1), 1)
    assert [r.request_id for r in a.ran[0].requests] == ["q0", "q1"]  # one call, as batch-mates
    assert r1.ok
    runs_of_q1 = sum(1 for b in a.ran for r in b.requests if r.request_id == "q1")
    assert runs_of_q1 == 1, f"q1 ran {runs_of_q1} times because q0's progress callback raised"
    assert r0.ok, f"q0's image was generated but its caller got {r0.error_type}: {r0.error}"
    await router.stop()


async def test_requests_of_a_lost_batch_are_retried_in_their_arrival_order(clock):
    """scheduler.py: within a key, first come first served; ``add(front=True)``: retries keep their place ahead of
    newer work. The requests of a lost batch, put back one after the other, run again oldest first (putting each at
    the front would reverse them)."""
    a = FakeReplica("a", manual=True)
    one = preq(0).tokens
    b = FakeReplica("b", max_batch_tokens=one, manual=True)  # b runs one request per call
    pool = FakePool(a, b)
    pool.down.add("b")  # not live yet: a takes the whole batch
    router = make_router(pool, clock, max_batch_size=4, max_wait_ms=0)
    tasks = [asyncio.create_task(router.submit(preq(i))) for i in range(4)]
    await settle()
    assert [r.request_id for r in a.batches[0].requests] == ["q0", "q1", "q2", "q3"]
    pool.down.discard("b")
    router.wake()
    a.fail_with = lost()
    a.release()
    await settle(30)
    while b.waiting:
        b.release()
        await settle(30)
    results = await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert all(r.ok and r.replica_id == "b" for r in results)
    order = [bt.requests[0].request_id for bt in b.batches]
    assert order == ["q0", "q1", "q2", "q3"], f"retried in the order {order}"
    await router.stop()
