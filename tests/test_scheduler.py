"""The batching decision as pure logic with hand-written times."""

import pytest

from orchestrator.scheduler import BatchScheduler, Pending, ReplicaCapacity
from zimage_common.errors import CapacityError, QueueFullError
from zimage_common.messages import ImageRequest

BIG = 1 << 40


def rep(rid, outstanding=0, max_pixels=BIG, max_batch_tokens=BIG):
    return ReplicaCapacity(rid, max_pixels, max_batch_tokens, outstanding)


def pend(i, t, size=64, steps=4, guidance=0.0, deadline=1e9):
    return Pending(ImageRequest(f"q{i}", "p", i, size, size, steps, guidance), enqueued_at=t, deadline=deadline)


def ids(decision):
    return [p.request.request_id for p in decision[1]]


def test_full_batch_goes_at_once():
    s = BatchScheduler(max_batch_size=2, max_wait_s=1.0, queue_limit=10)
    for i in range(3):
        s.add(pend(i, 0.0))
    d = s.schedule(0.0, [rep("a")])
    assert len(d) == 1 and ids(d[0]) == ["q0", "q1"]
    assert len(s) == 1


def test_partial_batch_waits_for_max_wait():
    s = BatchScheduler(max_batch_size=4, max_wait_s=0.5, queue_limit=10)
    s.add(pend(0, 10.0))
    assert s.schedule(10.2, [rep("a")]) == []
    assert s.next_deadline([rep("a")]) == pytest.approx(10.5)
    d = s.schedule(10.5, [rep("a")])
    assert ids(d[0]) == ["q0"]


def test_sizes_and_guidance_share_batches_steps_do_not():
    """A packed batch takes any mix of sizes, prompt lengths and guidance; only the step count must match."""
    s = BatchScheduler(max_batch_size=8, max_wait_s=0.0, queue_limit=10)
    s.add(pend(0, 0.0, size=64))
    s.add(pend(1, 0.1, size=128))
    s.add(pend(2, 0.2, size=64, guidance=2.0))
    s.add(pend(3, 0.3, size=64, steps=8))
    s.add(pend(4, 0.4, size=96))
    got = [tuple(ids(s.schedule(1.0, [rep("a")])[0])) for _ in range(2)]
    assert got == [("q0", "q1", "q2", "q4"), ("q3",)]
    assert len(s) == 0


def test_token_budget_fills_in_arrival_order_and_the_skipped_request_leads_next():
    s = BatchScheduler(max_batch_size=16, max_wait_s=0.0, queue_limit=10)
    big, small = pend(1, 0.1, size=256), pend(2, 0.2, size=64)  # 288 and 64 tokens
    for p in (pend(0, 0.0, size=256), big, small, pend(3, 0.3, size=64)):
        s.add(p)
    budget = rep("a", max_batch_tokens=288 + 2 * 64)
    assert ids(s.schedule(1.0, [budget])[0]) == ["q0", "q2", "q3"]  # q1 would overflow: the small ones fill
    assert ids(s.schedule(1.0, [budget])[0]) == ["q1"]


def test_a_full_token_budget_is_ready_before_max_wait():
    s = BatchScheduler(max_batch_size=16, max_wait_s=5.0, queue_limit=10)
    for i in range(4):
        s.add(pend(i, 0.0, size=256))  # 288 tokens each
    d = s.schedule(0.1, [rep("a", max_batch_tokens=1000)])  # the fourth does not fit: the budget is full
    assert ids(d[0]) == ["q0", "q1", "q2"]
    s2 = BatchScheduler(max_batch_size=16, max_wait_s=5.0, queue_limit=10)
    s2.add(pend(0, 0.0, size=256))
    assert s2.schedule(0.1, [rep("a", max_batch_tokens=1000)]) == []  # room left: waits for batch-mates


def test_waiting_work_is_shared_among_free_replicas():
    s = BatchScheduler(max_batch_size=4, max_wait_s=0.0, queue_limit=10)
    for i in range(5):
        s.add(pend(i, 0.0))
    d = s.schedule(0.0, [rep("a"), rep("b")])
    assert [ids(x) for x in d] == [["q0", "q1", "q2"], ["q3", "q4"]]


def test_ties_go_to_the_longest_idle_replica():
    s = BatchScheduler(max_batch_size=4, max_wait_s=0.0, queue_limit=10)
    s.add(pend(0, 0.0))
    a = ReplicaCapacity("a", BIG, BIG, 0, last_used=7)
    b = ReplicaCapacity("b", BIG, BIG, 0, last_used=3)
    assert s.schedule(0.0, [a, b])[0][0] == "b"


def test_oldest_key_first_and_fifo_within_key():
    s = BatchScheduler(max_batch_size=2, max_wait_s=0.0, queue_limit=10)
    s.add(pend(0, 0.0, steps=8))
    s.add(pend(1, 0.1, steps=4))
    s.add(pend(2, 0.2, steps=8))
    s.add(pend(3, 0.3, steps=8))
    d = s.schedule(1.0, [rep("a")])
    assert ids(d[0]) == ["q0", "q2"]
    d = s.schedule(1.0, [rep("a")])
    assert ids(d[0]) == ["q1"]  # key of q1 is now the oldest


def test_full_group_of_other_key_does_not_wait_behind_partial():
    s = BatchScheduler(max_batch_size=2, max_wait_s=5.0, queue_limit=10)
    s.add(pend(0, 0.0, steps=8))  # alone, not yet due
    s.add(pend(1, 0.1, steps=4))
    s.add(pend(2, 0.2, steps=4))  # full pair
    d = s.schedule(0.3, [rep("a")])
    assert ids(d[0]) == ["q1", "q2"]


def test_least_outstanding_replica_first():
    s = BatchScheduler(max_batch_size=1, max_wait_s=0.0, queue_limit=10)
    s.add(pend(0, 0.0))
    d = s.schedule(0.0, [rep("a", outstanding=1), rep("b", outstanding=0)])
    assert d[0][0] == "b"


def test_every_free_replica_gets_work_while_work_waits():
    s = BatchScheduler(max_batch_size=2, max_wait_s=0.0, queue_limit=10)
    for i in range(5):
        s.add(pend(i, 0.0))
    d = s.schedule(0.0, [rep("a"), rep("b"), rep("c")])
    assert [x[0] for x in d] == ["a", "b", "c"] and [len(x[1]) for x in d] == [2, 2, 1]


def test_replica_memory_limits_batch_and_size():
    s = BatchScheduler(max_batch_size=8, max_wait_s=0.0, queue_limit=10)
    for i in range(4):
        s.add(pend(i, 0.0, size=64))
    s.add(pend(9, 0.0, size=256))
    small = rep("small", max_pixels=64 * 64, max_batch_tokens=2 * 64)  # a 64x64 request with prompt "p": 64 tokens
    d = s.schedule(0.0, [small])
    assert ids(d[0]) == ["q0", "q1"]  # two 64x64 images fill its token budget
    d = s.schedule(0.0, [small])
    assert ids(d[0]) == ["q2", "q3"]
    assert s.schedule(0.0, [small]) == []  # the 256x256 request never goes to it
    assert ids(s.schedule(0.0, [rep("big")])[0]) == ["q9"]


def test_capacity_error_when_no_replica_fits():
    s = BatchScheduler(max_batch_size=8, max_wait_s=0.0, queue_limit=10)
    with pytest.raises(CapacityError, match="256x256"):
        s.check_servable(pend(0, 0, size=256).request, [rep("a", max_pixels=128 * 128)])


def test_queue_limit_and_retries_bypass_it():
    s = BatchScheduler(max_batch_size=8, max_wait_s=0.0, queue_limit=2)
    s.add(pend(0, 0))
    s.add(pend(1, 0))
    with pytest.raises(QueueFullError, match="queue_limit=2"):
        s.add(pend(2, 0))
    s.add(pend(3, 0), front=True)  # a retry of accepted work is never rejected
    assert len(s) == 3
    assert ids(s.schedule(0, [rep("a")])[0])[0] == "q3"


def test_expire_and_remove():
    s = BatchScheduler(max_batch_size=8, max_wait_s=10, queue_limit=10)
    a, b = pend(0, 0, deadline=5), pend(1, 0, deadline=50)
    s.add(a)
    s.add(b)
    assert s.next_deadline([]) == 5
    assert s.expire(6) == [a]
    assert s.remove(b) and not s.remove(b)
    assert len(s) == 0 and s.next_deadline([rep("a")]) is None


def test_split_cap_after_oom():
    s = BatchScheduler(max_batch_size=8, max_wait_s=0, queue_limit=10)
    for i in range(4):
        p = pend(i, 0)
        p.max_batch = 2
        s.add(p)
    d = s.schedule(0, [rep("a")])
    assert len(d[0][1]) == 2


def test_a_batch_names_no_more_distinct_adapters_than_a_replica_holds():
    """The plan counts memory for ``lora_max_resident`` adapters: a batch that named more would hold them all."""
    from dataclasses import replace

    s = BatchScheduler(max_batch_size=8, max_wait_s=0.0, queue_limit=10, max_adapters=2)
    for i, loras in enumerate([("a",), ("b",), ("c",), (), ("a", "b"), ("c",)]):
        p = pend(i, 0.1 * i)
        s.add(replace(p, request=replace(p.request, loras=tuple((n, 1.0) for n in loras))))
    assert ids(s.schedule(1.0, [rep("r")])[0]) == ["q0", "q1", "q3", "q4"]  # a and b; c waits
    assert ids(s.schedule(1.0, [rep("r")])[0]) == ["q2", "q5"]


def test_a_replica_joining_a_running_set_takes_only_requests_whose_adapters_fit_beside_it():
    """Step-level batching: a busy replica's running set already names adapters (``ReplicaCapacity.adapters``); new
    work joins it only within ``max_adapters`` in all. Its head gets no exception (it would not run alone), and a
    replica that can take nothing gets no batch and no wake-up for it."""
    from dataclasses import replace

    s = BatchScheduler(max_batch_size=8, max_wait_s=0.0, queue_limit=10, max_adapters=2)
    for i, loras in enumerate([("c",), (), ("a",), ("a", "c")]):
        p = pend(i, 0.1 * i, deadline=50.0)
        s.add(replace(p, request=replace(p.request, loras=tuple((n, 1.0) for n in loras))))
    joining = replace(rep("r", outstanding=1), adapters=frozenset({"a", "b"}))
    assert ids(s.schedule(1.0, [joining])[0]) == ["q1", "q2"]  # c would make three
    assert s.schedule(1.0, [joining]) == [] and len(s) == 2
    assert s.next_deadline([joining]) == 50.0  # only the requests' own deadlines: nothing it could take is ready
    fresh = replace(rep("r"), adapters=None)  # an idle replica: a batch of its own
    assert ids(s.schedule(1.0, [fresh])[0]) == ["q0", "q3"]


def test_while_interactive_traffic_is_about_a_busy_replica_takes_no_batch_job_work():
    """A replica holds up to two running sets' worth; batch-job work waiting there would hold up an interactive
    request sent to it, so while interactive traffic is about only idle replicas take it."""
    from dataclasses import replace

    from zimage_common.messages import BATCH_JOB

    s = BatchScheduler(max_batch_size=4, max_wait_s=0, queue_limit=10)
    s.add(Pending(replace(pend(0, 0.0).request, priority=BATCH_JOB), 0.0, 1e9))
    busy, idle = rep("a", outstanding=1), rep("b")
    assert s.schedule(1.0, [busy], interactive_recent=True) == []
    assert s.next_deadline([busy], reserve_until=5.0, interactive_recent=True) == 5.0  # then it may
    assert [rid for rid, _ in s.schedule(1.0, [busy, idle], interactive_recent=True)] == ["b"]
    s.add(Pending(replace(pend(1, 0.0).request, priority=BATCH_JOB), 0.0, 1e9))
    assert [rid for rid, _ in s.schedule(1.0, [busy])] == ["a"]  # the traffic is gone: any replica with room
