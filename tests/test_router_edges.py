"""Router edges: cancellation before a waiter first runs, job work beside interactive work no free replica can take,
a caller's raising progress listener, the order of retried requests (fakes and a manual clock)."""

import asyncio

import pytest
from fakes import FakePool, FakeReplica, ManualClock, lost

from orchestrator.router import Router
from zimage_common.config import RouterConfig
from zimage_common.messages import BATCH_JOB, INTERACTIVE, ImageRequest, StepProgress


def req(i, size=64, steps=4, priority=INTERACTIVE):
    return ImageRequest(f"q{i}", f"prompt {i}", 1000 + i, size, size, steps, 0.0, priority=priority)


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


async def test_cancelling_admit_waiters_before_they_start_drops_their_requests(clock):
    """``admit``'s docstring: cancelling a returned awaitable drops its request if it has not been dispatched yet.
    ``Deployment.generate`` gathers them (``asyncio.gather(*admit(...))``): a caller cancelled before the gathered
    waiters first run cancels them unstarted, and their requests must not run for nobody."""
    a = FakeReplica("a", manual=True)
    router = make_router(FakePool(a), clock, max_batch_size=1, max_wait_ms=0)
    busy = [asyncio.create_task(router.submit(req(i))) for i in (0, 1)]  # the replica holds two
    await settle()
    assert a.waiting == 2
    gathered = asyncio.gather(*router.admit([req(2), req(3)]))
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
    big_one = asyncio.create_task(router.submit(req(0, size=128), timeout_s=30))  # only "big" can run it
    await settle()
    job = asyncio.create_task(router.submit(req(1, priority=BATCH_JOB)))
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

    t0 = asyncio.create_task(router.submit(req(0), on_progress=broken))
    t1 = asyncio.create_task(router.submit(req(1)))
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
    one = req(0).tokens
    b = FakeReplica("b", max_batch_tokens=one, manual=True)  # b runs one request per call
    pool = FakePool(a, b)
    pool.down.add("b")  # not live yet: a takes the whole batch
    router = make_router(pool, clock, max_batch_size=4, max_wait_ms=0)
    tasks = [asyncio.create_task(router.submit(req(i))) for i in range(4)]
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
