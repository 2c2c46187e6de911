"""Metrics edges (orchestrator/metrics.py and who feeds it): a request retried after its replica was lost is observed
once in the per-request histograms ``zimage_queue_time_seconds`` ("arrival to dispatch") and
``zimage_time_to_first_step_seconds`` ("arrival to the request's first denoising step"); a down replica has no
``zimage_replica_queue_length`` series (not its last value); every ``zimage_replica_events_total`` event label is
documented (docs/observability.md)."""

import asyncio
from pathlib import Path

from conftest import tiny_config
from fakes import FakePool, FakeReplica, ManualClock, lost
from test_replicas import settle as settle_set
from test_replicas import started_set

from orchestrator.metrics import PrometheusObserver
from orchestrator.router import Router
from orchestrator.server import Service
from zimage_common.config import RouterConfig
from zimage_common.errors import ReplicaError
from zimage_common.messages import ImageRequest, ReplicaHealth, StepProgress


def req(i):
    return ImageRequest(f"q{i}", f"prompt {i}", 1000 + i, 64, 64, 4, 0.0)


class SteppingReplica(FakeReplica):
    """Reports one denoising step for each batch, then (optionally, for its first batch) dies like a lost actor."""

    def __init__(self, replica_id, die_after_first_step=False):
        super().__init__(replica_id)
        self.die_after_first_step = die_after_first_step
        self.calls = 0

    async def run(self, batch, on_progress=None):
        self.calls += 1
        if on_progress is not None:
            on_progress(StepProgress(batch.batch_id, 1, 4, loop_step=self.calls, running=len(batch),
                                     joined=len(batch)))
        await asyncio.sleep(0)
        if self.die_after_first_step and self.calls == 1:
            raise lost()
        return await super().run(batch, on_progress)


def observed_router(*replicas):
    obs = PrometheusObserver()
    router = Router(FakePool(*replicas), RouterConfig(max_batch_size=4, max_wait_ms=0, queue_limit=100,
                                                      request_timeout_s=60, max_attempts=3),
                    clock=ManualClock(), observer=obs)
    obs.bind(router)
    router.start()
    return router, obs


async def test_queue_time_observed_once_per_request_when_a_lost_replica_is_retried():
    """Two requests, one of them re-dispatched after its replica died: the per-request histogram must hold two
    observations, not three (the retry's "queue time" also spans the failed run on the lost replica)."""
    a, b = FakeReplica("a"), FakeReplica("b")
    a.fail_with = lost()
    router, obs = observed_router(a, b)
    try:
        results = await asyncio.wait_for(asyncio.gather(router.submit(req(0)), router.submit(req(1))), 5)
        assert all(r.ok for r in results)
        assert any(r.attempts == 2 for r in results)  # one of them was retried
        g = obs.registry.get_sample_value
        assert g("zimage_requests_total", {"outcome": "ok"}) == 2
        assert g("zimage_queue_time_seconds_count") == 2, "a retried request observed twice in queue time"
    finally:
        await router.stop()


async def test_time_to_first_step_observed_once_per_request_when_retried():
    """The request stepped on replica a, which then died; it runs again on b. Its first denoising step was on a:
    the histogram must hold one observation for one request."""
    a, b = SteppingReplica("a", die_after_first_step=True), SteppingReplica("b")
    router, obs = observed_router(a, b)
    try:
        result = await asyncio.wait_for(router.submit(req(0)), 5)
        assert result.ok and result.attempts == 2 and a.calls == 1 and b.calls == 1
        g = obs.registry.get_sample_value
        assert g("zimage_time_to_first_step_seconds_count") == 1, "a retried request's first step counted twice"
    finally:
        await router.stop()


class TwoReplicaDeployment:
    """What ``Service._poll_health`` reads: r1 can be taken down (it then reports "down" and no queue length, as
    ``Deployment.replica_health`` / ``queue_lengths`` do for a replica that is not live)."""

    def __init__(self):
        self.up = {"r0", "r1"}

    async def replica_health(self):
        return {rid: ReplicaHealth(rid, True, {}, "bfloat16") if rid in self.up else "down" for rid in ("r0", "r1")}

    async def queue_lengths(self):
        return {rid: 7 for rid in sorted(self.up)}


async def test_replica_queue_length_does_not_stay_stale_after_the_replica_goes_down(tmp_path, monkeypatch):
    service = Service(tiny_config(tmp_path))
    dep = service.deployment = TwoReplicaDeployment()
    real_sleep = asyncio.sleep
    polls = []

    async def fast_sleep(delay, *args, **kw):  # the poll's 5 s pause, shortened
        if delay == 5:
            polls.append(1)
            delay = 0
        return await real_sleep(delay, *args, **kw)

    monkeypatch.setattr(asyncio, "sleep", fast_sleep)
    poll = asyncio.create_task(service._poll_health())
    try:
        async def polled(n):
            start = len(polls)
            while len(polls) < start + n:
                await real_sleep(0.001)

        await polled(2)
        g = service.observer.registry.get_sample_value
        assert g("zimage_replica_queue_length", {"replica": "r1"}) == 7
        dep.up = {"r0"}  # r1 is lost: nothing waits at it any more
        await polled(3)
        assert g("zimage_replica_up", {"replica": "r1"}) == 0
        assert g("zimage_replica_queue_length", {"replica": "r1"}) in (None, 0), \
            "a down replica keeps its last queue length"
    finally:
        poll.cancel()


async def test_replica_events_carry_only_the_documented_event_labels():
    """docs/observability.md lists every event label a replica's lifecycle emits, 'failed' (a restart that did not
    come back) included, in the docs table and the metric's help text."""
    rs, (r0, _), _, clock, _ = await started_set()
    obs = rs.observer = PrometheusObserver()
    r0.start_error = ReplicaError("model weights not found")
    rs.report_failure("r0", lost())
    await settle_set()
    events = {s.labels["event"] for m in obs.registry.collect() if m.name == "zimage_replica_events"
              for s in m.samples if s.name.endswith("_total")}
    assert "lost" in events
    doc = (Path(__file__).parents[1] / "docs" / "observability.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `zimage_replica_events_total`"))
    documented = set(row.split("`event` (", 1)[1].split(")", 1)[0].split(", "))
    assert events == {"lost", "failed"} and events <= documented, (events, documented)
