"""Batch-job priority in the scheduler and the router (fakes, manual clock): interactive work goes first and never
shares a batch with a job's work, a free replica is held for interactive work that is not ready yet, and the
interactive reserve keeps a replica idle while interactive traffic is about, then lapses, without a busy loop."""

import asyncio

import pytest
from fakes import FakePool, FakeReplica, ManualClock

from orchestrator.router import Router
from orchestrator.scheduler import BatchScheduler, Pending, ReplicaCapacity
from zimage_common.config import RouterConfig
from zimage_common.messages import BATCH_JOB, INTERACTIVE, ImageRequest

BIG = 1 << 40


def rep(rid, outstanding=0):
    return ReplicaCapacity(rid, BIG, BIG, outstanding)


def pend(name, t, priority):
    return Pending(ImageRequest(name, "p", 1, 64, 64, 4, 0.0, priority=priority), enqueued_at=t, deadline=1e9)


def names(decisions):
    return [(rid, [p.request.request_id for p in ps]) for rid, ps in decisions]


def test_interactive_goes_first_in_batches_of_its_own():
    s = BatchScheduler(max_batch_size=4, max_wait_s=0.1, queue_limit=100)
    for i in range(6):
        s.add(pend(f"job{i}", 0.0, BATCH_JOB))
    s.add(pend("live0", 1.0, INTERACTIVE))
    s.add(pend("live1", 1.0, INTERACTIVE))
    assert names(s.schedule(1.2, [rep("a")])) == [("a", ["live0", "live1"])]  # newer, yet first; alone
    assert names(s.schedule(1.2, [rep("a")])) == [("a", ["job0", "job1", "job2", "job3"])]


def test_a_free_replica_waits_for_interactive_work_that_is_not_ready_yet():
    s = BatchScheduler(max_batch_size=4, max_wait_s=0.1, queue_limit=100)
    for i in range(4):
        s.add(pend(f"job{i}", 0.0, BATCH_JOB))
    s.add(pend("live", 1.0, INTERACTIVE))
    assert s.schedule(1.05, [rep("a")]) == []  # the job's full batch would run ahead of "live"
    assert s.next_deadline([rep("a")]) == 1.1  # woken when "live" is ready, not at once (no busy loop)
    # with a second free replica, one waits for "live" and the other takes the job's batch
    assert names(s.schedule(1.05, [rep("a"), rep("b")])) == [("b", ["job0", "job1", "job2", "job3"])]
    assert names(s.schedule(1.1, [rep("a")])) == [("a", ["live"])]


def test_the_reserve_leaves_idle_replicas_for_interactive_work():
    s = BatchScheduler(max_batch_size=2, max_wait_s=0.0, queue_limit=100)
    for i in range(8):
        s.add(pend(f"job{i}", 0.0, BATCH_JOB))
    free = [rep("a"), rep("b"), rep("c")]
    assert [rid for rid, _ in s.schedule(0.0, free, reserve=1)] == ["a", "b"]  # c stays idle
    assert s.next_deadline([rep("c")], reserve=1, reserve_until=7.0) == 7.0  # until the reserve lapses
    assert [rid for rid, _ in s.schedule(0.0, [rep("c"), rep("a", outstanding=1)], reserve=1)] == ["a"]
    assert [rid for rid, _ in s.schedule(0.0, [rep("c")], reserve=0)] == ["c"]


def counting_passes(router) -> list[int]:
    """Counts the router's scheduling passes (``[n]``), to check that it does not spin while nothing changes."""
    passes = [0]
    schedule = router.scheduler.schedule

    def counted(*args, **kw):
        passes[0] += 1
        return schedule(*args, **kw)

    router.scheduler.schedule = counted
    return passes


async def settle(n=20):
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.mark.timeout(20)
async def test_router_reserve_follows_interactive_traffic_and_lapses():
    clock = ManualClock()
    a, b = FakeReplica("a", manual=True), FakeReplica("b", manual=True)
    router = Router(FakePool(a, b), RouterConfig(max_batch_size=2, max_wait_ms=0, queue_limit=100),
                    clock=clock, interactive_reserve=(1, 5.0, None))
    passes = counting_passes(router)
    router.start()
    job = [ImageRequest(f"job{i}", "p", i, 64, 64, 4, 0.0, priority=BATCH_JOB) for i in range(6)]
    live = ImageRequest("live", "p", 99, 64, 64, 4, 0.0)
    (first,) = [asyncio.ensure_future(w) for w in router.admit([live])]  # interactive: the reserve is on for 5 s
    await settle()
    (a if a.waiting else b).release()
    assert (await first).ok
    await clock.advance(1.0)
    waiters = [asyncio.ensure_future(w) for w in router.admit(job)]
    await settle()

    def with_jobs():
        return [r.replica_id for r in (a, b) if any(bt.requests[0].priority == BATCH_JOB for bt in r.batches)]

    # one job call on one replica; the other is kept idle, and a busy replica takes no more job work meanwhile
    assert len(with_jobs()) == 1 and router.waiting == 4
    before = passes[0]
    await clock.advance(1.0)
    await settle()
    assert passes[0] - before <= 2  # nothing changed, and the loop did not spin
    await clock.advance(3.5)  # 5 s after "live": the reserve lapses and the job takes both replicas
    await settle()
    assert sorted(with_jobs()) == ["a", "b"] and router.waiting == 0
    for r in (a, b):
        while r.waiting:
            r.release()
            await settle()
    assert all(r.ok for r in await asyncio.gather(*waiters))
    await router.stop()


@pytest.mark.timeout(20)
async def test_a_replica_full_of_job_work_takes_an_interactive_request_at_once():
    """A job alone fills the replica's room (two running sets' worth); an interactive request then goes to it at
    once, since its loop runs interactive samples first and parks the job's, while the job gets no more room until
    its work returns (no busy loop meanwhile)."""
    clock = ManualClock()
    a = FakeReplica("a", manual=True)
    router = Router(FakePool(a), RouterConfig(max_batch_size=2, max_wait_ms=0, queue_limit=100), clock=clock)
    passes = counting_passes(router)
    router.start()
    job = [ImageRequest(f"job{i}", "p", i, 64, 64, 4, 0.0, priority=BATCH_JOB) for i in range(6)]
    waiters = [asyncio.ensure_future(w) for w in router.admit(job)]
    await settle()
    assert sum(len(b) for b in a.batches) == 4 and router.waiting == 2  # two sets' worth: the job's room is full
    before = passes[0]
    await clock.advance(1.0)
    await settle()
    assert passes[0] - before <= 2 and router.waiting == 2  # the job waits for room, without spinning
    (live,) = [asyncio.ensure_future(w) for w in router.admit([ImageRequest("live", "p", 99, 64, 64, 4, 0.0)])]
    await settle()
    assert [r.request_id for r in a.batches[-1].requests] == ["live"]  # sent at once, not after a job call
    while a.waiting:
        a.release()
        await settle()
    assert (await live).ok and all(r.ok for r in await asyncio.gather(*waiters))
    await router.stop()


def test_a_replica_refused_job_work_by_its_queue_leaves_the_others_of_its_room_open():
    """``no_jobs`` names one replica (its reported queue is full), not its room: a job's ready work goes to another
    free replica with the same room, in the same pass, while the first free one is held for interactive work."""
    from orchestrator.free_replicas import FreeReplicas

    s = BatchScheduler(max_batch_size=4, max_wait_s=1.0, queue_limit=100)
    s.add(Pending(ImageRequest("j0", "p", 1, 64, 64, 4, 0.0, priority=BATCH_JOB), enqueued_at=0.0, deadline=100.0))
    s.add(Pending(ImageRequest("i0", "p", 1, 64, 64, 4, 0.0), enqueued_at=9.9, deadline=100.0))  # not ready yet
    free = FreeReplicas([ReplicaCapacity(rid, BIG, BIG, 0, i) for i, rid in enumerate("XAB")])
    decisions = s.schedule(10.0, free, no_jobs=lambda rid: rid == "A")
    assert [(rid, [p.request.request_id for p in ps]) for rid, ps in decisions] == [("B", ["j0"])]
