"""Fake replicas and pools for router tests: no Ray, no torch, completion under the test's control."""

import asyncio
from dataclasses import dataclass

import numpy as np

from zimage_common.errors import ReplicaUnavailableError
from zimage_common.messages import BatchResult, ImageResult, StageTimes


def fake_image(r):
    """A tiny image whose pixels encode the request, so tests can tell whose image a caller got."""
    return np.full((2, 2, 3), (r.seed % 256, len(r.prompt) % 256, 7), dtype=np.uint8)


class FakeReplica:
    def __init__(self, replica_id, max_pixels=1 << 40, max_batch_tokens=1 << 40, manual=False):
        self.replica_id = replica_id
        self.max_pixels = max_pixels
        self.max_batch_tokens = max_batch_tokens
        self.manual = manual  # when True, each batch waits until release() is called
        self.batches = []
        self._gates = []
        self.fail_with = None  # an exception to raise from run
        self.error_type = None  # or make every result fail with this error type
        self.oom_above = None
        self.stage_times = StageTimes()  # the batch's, as a replica reports them

    async def run(self, batch, on_progress=None):
        self.batches.append(batch)
        if self.manual:
            gate = asyncio.get_running_loop().create_future()
            self._gates.append(gate)
            await gate
        else:
            await asyncio.sleep(0)
        if self.fail_with is not None:
            raise self.fail_with
        results = []
        for r in batch.requests:
            kind = self.error_type
            if self.oom_above is not None and len(batch) > self.oom_above:
                kind = "out_of_memory"
            results.append(ImageResult(
                request_id=r.request_id, ok=kind is None, replica_id=self.replica_id, batch_id=batch.batch_id,
                batch_size=len(batch), seed=r.seed, width=r.width, height=r.height,
                image=fake_image(r) if kind is None else None,
                error=None if kind is None else f"fake {kind}", error_type=kind,
                stage_times=StageTimes(total_s=0.0)))
        return BatchResult(batch.batch_id, self.replica_id, tuple(results), self.stage_times)

    def release(self, n=1):
        for _ in range(n):
            gate = self._gates.pop(0)
            gate.set_result(None)

    @property
    def waiting(self):
        return len(self._gates)


class FakePool:
    def __init__(self, *replicas):
        self.replicas = list(replicas)
        self.down = set()
        self.failures = []

    def live(self):
        return [r for r in self.replicas if r.replica_id not in self.down]

    def members(self):
        return list(self.replicas)

    def report_failure(self, replica_id, error):
        self.failures.append(replica_id)
        self.down.add(replica_id)


def lost():
    return ReplicaUnavailableError("actor died")


class ManualClock:
    """A clock that moves only when a test calls ``advance``."""

    def __init__(self, start: float = 0.0):
        self._t = start
        self._sleepers: list[tuple[float, asyncio.Future]] = []

    def now(self) -> float:
        return self._t

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._t + seconds, fut))
        await fut

    async def advance(self, seconds: float) -> None:
        self._t += seconds
        due = [f for t, f in self._sleepers if t <= self._t]
        self._sleepers = [(t, f) for t, f in self._sleepers if t > self._t and not f.done()]  # (cancelled: gone)
        for f in due:
            if not f.done():
                f.set_result(None)
        for _ in range(5):  # let the woken tasks run
            await asyncio.sleep(0)


@dataclass(frozen=True)
class FakeNode:
    """A node as the deployment's backend reports it."""

    name: str
    node_id: str
    gpus: int = 1


class IdleDeployment:
    """A deployment that is up and never runs anything: for the server's own behaviour before admission."""

    ready, replicas, max_side, lora_names = True, {"r0": None}, None, None

    class router:  # noqa: N801 - what the metrics observer reads
        waiting = running = 0

    class replica:  # noqa: N801
        replica_id = "r0"

    def members(self):
        return [self.replica]

    def live(self):
        return [self.replica]

    async def replica_health(self):
        return {}

    async def shutdown(self, drain_timeout_s=None):
        return None
