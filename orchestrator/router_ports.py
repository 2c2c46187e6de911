"""What the router needs from the outside world (``router.py``): a clock, replicas to dispatch to, the pool that
holds them, and an observer of what it does (metrics). Tests pass fakes and a manual clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from zimage_common.messages import Batch, BatchResult, FailureKind, ImageResult, StepProgress


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class Replica(Protocol):
    """A handle the router dispatches to. ``run`` calls ``on_progress`` after every step of the replica's loop that
    ran the batch's requests, and raises ``ReplicaUnavailableError`` when the replica's process is gone; every other
    outcome comes back inside the ``BatchResult``. ``cancel(request_ids)`` takes requests out of its loop."""

    replica_id: str
    max_pixels: int
    max_batch_tokens: int

    async def run(self, batch: Batch, on_progress: Callable[[StepProgress], None] | None = None) -> BatchResult:
        ...

    # Shared replicas also answer ``async queue_lens() -> (interactive, total)`` (samples waiting at their gate and
    # inside, from every front door), or only ``async queue_len() -> int`` (the total, taken for both); a handle with
    # neither is compared by the router's own books.


class ReplicaPool(Protocol):
    def live(self) -> Sequence[Replica]:
        """Replicas in rotation now."""

    def members(self) -> Sequence[Replica]:
        """Every replica of the deployment, live or recovering (not those dropped for good)."""

    def report_failure(self, replica_id: str, error: BaseException) -> None: ...


class RouterObserver:
    """Hooks for metrics and logs; the default does nothing. Queue depths are read from the router itself."""

    def dispatched(self, replica_id: str, batch: Batch, queue_times: list[float]) -> None: ...

    def batch_done(self, replica_id: str, out: BatchResult | None) -> None: ...

    def finished(self, result: ImageResult) -> None: ...

    def rejected(self, kind: FailureKind) -> None: ...

    def replica_event(self, replica_id: str, event: str) -> None:
        """A replica was lost, hung, came back or was dropped (the deployment reports these)."""

    def first_step(self, replica_id: str, waited_s: float) -> None:
        """A request ran its first denoising step, ``waited_s`` after it arrived."""

    def loop_step(self, replica_id: str, running: int, joined: int) -> None:
        """A replica's loop ran a step with ``running`` samples, ``joined`` of them new."""

    def loop_idle(self, replica_id: str) -> None:
        """A replica's loop has nothing left to run."""


# ---- the router --------------------------------------------------------------------------------------------
