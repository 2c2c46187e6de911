"""Routers over replicas shared by several front doors (``Router(shared=True)``, ``frontdoor.pool``), with fake
replicas and a manual clock: power of two choices over the queue lengths the replicas report spreads the load that
several routers send, a stale report is asked for again without holding up the loop, a replica that does not answer
is compared last (not taken for empty), and a replica whose queue is full is passed over: for interactive work,
full of interactive work (a batch job's samples hold back only job work there)."""

import asyncio
import random

import pytest
from fakes import FakePool, FakeReplica, ManualClock

from orchestrator.pool_queues import PROBE_TIMEOUT_S, REPORT_TTL_S
from orchestrator.router import Router
from zimage_common.config import RouterConfig
from zimage_common.messages import BATCH_JOB, ImageRequest

pytestmark = pytest.mark.timeout(30)


def req(i):
    return ImageRequest(f"q{i}", f"prompt {i}", 1000 + i, 64, 64, 4, 0.0)


def job(i):
    return ImageRequest(f"j{i}", f"prompt {i}", 1000 + i, 64, 64, 4, 0.0, priority=BATCH_JOB)


async def settle(n=20):
    for _ in range(n):
        await asyncio.sleep(0)


class SharedReplica(FakeReplica):
    """A replica every router sends to: it reports the samples inside it, from all of them, plus ``elsewhere`` and
    ``elsewhere_jobs`` (the interactive and batch-job work of front doors not in the test), as (interactive, all)
    samples. Calls stay in until released; ``silent`` makes its probes hang."""

    def __init__(self, replica_id):
        super().__init__(replica_id, manual=True)
        self.inside = 0
        self.inside_jobs = 0
        self.elsewhere = 0
        self.elsewhere_jobs = 0
        self.probes = 0
        self.silent = False

    async def run(self, batch, on_progress=None):
        jobs = len(batch) if batch.is_job else 0
        self.inside += len(batch)
        self.inside_jobs += jobs
        try:
            return await super().run(batch, on_progress)
        finally:
            self.inside -= len(batch)
            self.inside_jobs -= jobs

    async def queue_lens(self):
        self.probes += 1
        if self.silent:
            await asyncio.get_running_loop().create_future()
        total = self.inside + self.elsewhere + self.elsewhere_jobs
        return total - self.inside_jobs - self.elsewhere_jobs, total

    async def queue_len(self):
        return (await self.queue_lens())[1]


class TotalOnlyReplica(SharedReplica):
    """An older handle: it reports only its total (``queue_len``)."""

    queue_lens = None

    async def queue_len(self):
        return (await SharedReplica.queue_lens(self))[1]

    def images(self, router_batches=None):
        return sum(len(b) for b in (router_batches if router_batches is not None else self.batches))


def router(replicas, clock, shared=True, seed=1, **cfg):
    base = dict(max_batch_size=4, max_wait_ms=0, queue_limit=200, request_timeout_s=600)
    base.update(cfg)
    r = Router(FakePool(*replicas), RouterConfig(**base), clock=clock, shared=shared, rng=random.Random(seed))
    r.start()
    return r


async def burst(r, first, n):
    tasks = [asyncio.ensure_future(r.submit(req(first + i))) for i in range(n)]
    await settle(40)
    return tasks


async def finish(replicas, *task_lists):
    while any(x.waiting for x in replicas):
        for x in replicas:
            while x.waiting:
                x.release()
        await settle()
    for tasks in task_lists:
        assert all(res.ok for res in await asyncio.gather(*tasks))


async def test_a_front_door_sends_its_burst_to_the_replicas_another_left_short():
    """B sees only r0 (r1 is still starting for it) and fills it; A, joining with both in view, reads their queues
    and sends its burst to r1. By its own books A would have split it evenly (r0 holding 12 of the 16)."""
    clock = ManualClock()
    for shared, most in ((True, 10), (False, 12)):
        r0, r1 = SharedReplica("r0"), SharedReplica("r1")
        b = router([r0], clock, shared=True)
        b_tasks = await burst(b, 0, 8)
        assert r0.inside == 8
        a = router([r0, r1], clock, shared=shared)
        a_tasks = await burst(a, 100, 8)
        total = r0.inside + r1.inside
        assert total == 16 and max(r0.inside, r1.inside) <= most, (shared, r0.inside, r1.inside)
        if shared:
            assert r1.inside >= 6  # most of A's burst
        else:
            assert r0.inside == 12
        await finish([r0, r1], a_tasks, b_tasks)
        await a.stop()
        await b.stop()


async def test_two_routers_bursting_together_spread_over_the_pool():
    """Eight replicas, four of them holding 6 samples of a third front door's; two routers send 16 each at once.
    Even would be 7 samples everywhere. By their own books the routers split evenly (10 at the busy four, 4 at the
    others); by reported queues the busy four get little and no replica holds more than 9."""
    clock = ManualClock()
    for shared in (True, False):
        pool = [SharedReplica(f"r{i}") for i in range(8)]
        for x in pool[:4]:
            x.elsewhere = 6
        a, b = router(pool, clock, shared=shared, seed=1), router(pool, clock, shared=shared, seed=2)
        await settle()
        tasks_a = await burst(a, 0, 16)
        tasks_b = await burst(b, 100, 16)
        loads = [x.inside + x.elsewhere for x in pool]
        to_busy = sum(x.inside for x in pool[:4])
        assert sum(loads) == 56
        if shared:
            assert max(loads) <= 9 and to_busy <= 8, loads
        else:
            assert loads == [10] * 4 + [4] * 4
        await finish(pool, tasks_a, tasks_b)
        await a.stop()
        await b.stop()


async def test_a_stale_report_is_asked_for_again_without_holding_up_the_loop():
    clock = ManualClock()
    r0, r1 = SharedReplica("r0"), SharedReplica("r1")
    a = router([r0, r1], clock)
    await settle()
    assert (r0.probes, r1.probes) == (1, 1)  # a replica new to the router is asked at once
    first = await burst(a, 0, 2)
    assert (r0.probes, r1.probes) == (1, 1)  # fresh reports: no probe
    await finish([r0, r1], first)
    await clock.advance(REPORT_TTL_S + 0.1)
    r0.silent = r1.silent = True  # probes now hang: the loop must not wait for them
    second = await burst(a, 10, 4)
    assert r0.probes + r1.probes >= 1  # the stale reports were asked for again
    assert r0.inside + r1.inside == 4  # and the requests went out on the reports it had
    await finish([r0, r1], second)
    await a.stop()


async def test_a_replica_that_does_not_answer_is_compared_last_not_taken_for_empty():
    clock = ManualClock()
    r0, r1 = SharedReplica("r0"), SharedReplica("r1")
    r0.silent = True  # its probes hang
    r1.elsewhere = 3  # busy with other front doors' work, but answers
    a = router([r0, r1], clock, max_batch_size=2)  # a full queue: 6 samples
    await settle()
    first = await burst(a, 0, 1)
    assert (r0.inside, r1.inside) == (0, 1)  # r0 has not answered: passed over, and the loop did not wait for it
    await clock.advance(PROBE_TIMEOUT_S)  # r0's probe times out: unknown now, not empty
    await settle(40)
    more = await burst(a, 10, 2)
    assert (r0.inside, r1.inside) == (0, 3)  # the replica that answered wins while its queue has room
    last = await burst(a, 20, 1)
    assert (r0.inside, r1.inside) == (1, 3)  # r1's queue is full (3 + 3): the unknown one still serves
    asked = r0.probes
    await clock.advance(REPORT_TTL_S)
    again = await burst(a, 30, 1)
    assert r0.probes == asked + 1  # asked again once its last probe is a report's lifetime old
    await finish([r0, r1], first, more, last, again)
    await a.stop()


async def test_a_replica_whose_queue_is_full_is_passed_over_until_it_reports_room():
    clock = ManualClock()
    r0, r1 = SharedReplica("r0"), SharedReplica("r1")
    a = router([r0, r1], clock)  # a full queue: 12 samples
    r0.elsewhere, r1.elsewhere = a.max_queue, 9  # other front doors' work
    await settle()
    tasks = await burst(a, 0, 8)
    # r1 took a call of 4 (9 + 4: full now, by its report and what was sent since; the call that fills a queue may
    # pass its limit), r0 was full: 4 wait at the router, not at a full replica
    assert (r0.inside, r1.inside, a.waiting) == (0, 4, 4)
    await clock.advance(0.5)
    await settle(40)
    assert (r0.inside, r1.inside, a.waiting) == (0, 4, 4)
    r0.elsewhere = 0  # room at r0: its next report says so
    await clock.advance(REPORT_TTL_S)  # the reports age: the router asks again
    await settle(40)
    assert (r0.inside, r1.inside, a.waiting) == (4, 4, 0)
    await finish([r0, r1], tasks)
    await a.stop()


async def test_a_pooled_replica_full_of_job_work_still_takes_an_interactive_request():
    """r0's queue is full (12 samples): 8 of another front door's batch job and 4 of this router's. Its gate lets an
    interactive call pass waiting job calls, so an interactive request goes there at once; judged by its total (an
    older handle reporting only ``queue_len``) it waits at the router."""
    clock = ManualClock()
    for split in (True, False):
        r0 = SharedReplica("r0") if split else TotalOnlyReplica("r0")
        r0.elsewhere_jobs = 8
        a = router([r0], clock)
        jobs = [asyncio.ensure_future(f) for f in a.admit([job(i) for i in range(4)])]
        await settle(40)
        assert r0.inside_jobs == 4 and r0.inside_jobs + r0.elsewhere_jobs == a.max_queue
        live = await burst(a, 0, 1)
        sent = any(r.request_id == "q0" for b in r0.batches for r in b.requests)
        assert sent == split, split
        if not split:
            r0.elsewhere_jobs = 0  # the other front door's job is done: the next report has room
            await clock.advance(REPORT_TTL_S + 0.1)
            await settle(40)
        await finish([r0], jobs, live)
        await a.stop()


async def test_job_work_is_still_passed_over_a_replica_whose_total_queue_is_full():
    """r0 holds no interactive work but is full of another front door's job work; r1 has some interactive work and
    room. A job's requests go to r1 only (by the interactive lengths r0 would win); an interactive request then goes
    to r0, the shorter interactive queue."""
    clock = ManualClock()
    r0, r1 = SharedReplica("r0"), SharedReplica("r1")
    a = router([r0, r1], clock)
    r0.elsewhere_jobs, r1.elsewhere = a.max_queue, 2
    await settle()
    jobs = [asyncio.ensure_future(f) for f in a.admit([job(i) for i in range(6)])]
    await settle(40)
    assert (r0.inside, r1.inside) == (0, 6)
    live = await burst(a, 0, 1)
    assert (r0.inside, r1.inside) == (1, 6)
    await finish([r0, r1], jobs, live)
    await a.stop()


async def test_a_jobs_call_in_a_pass_led_by_interactive_work_skips_a_replica_whose_whole_queue_is_full():
    """An interactive request and a job's wait together: the pass compares interactive lengths, where r0 (full of
    other doors' job work, no interactive work) looks free, yet the job's requests go to r1 only, whichever replica
    the draw offers first."""
    for seed in range(8):
        clock = ManualClock()
        r0, r1 = SharedReplica("r0"), SharedReplica("r1")
        a = router([r0, r1], clock, seed=seed)
        r0.elsewhere_jobs = a.max_queue
        await settle()
        jobs = [asyncio.ensure_future(f) for f in a.admit([job(i) for i in range(2)])]
        live = await burst(a, 0, 1)
        assert r0.inside_jobs == 0, f"seed {seed}: a job's call went to the replica whose whole queue is full"
        assert r1.inside_jobs == 2 and r0.inside + r1.inside == 3
        await finish([r0, r1], jobs, live)
        await a.stop()
