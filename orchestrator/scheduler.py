"""The batching decision, as pure logic: which requests go together, to which free replica, and when.

No clock, no asyncio, no Ray: the router passes ``now`` and the free replicas in, gets decisions out. Tests drive
it with hand-written times.

Policy:
- Requests that share a ``BatchKey`` (size, steps, guidance) may share a batch. Within a key, first come first
  served; across keys, the key whose oldest request is oldest goes first.
- A group is *ready* when it fills a replica's batch, or its oldest request has waited ``max_wait_s``.
- A free replica takes the oldest ready group it can serve (its plan's batch and pixel limits); if no group is
  ready, it waits until the earliest one will be (``next_deadline``). So no replica idles past max_wait while
  work it can serve is queued.
- Waiting work is shared among the free replicas: 4 requests and 2 free replicas make two batches of 2, not
  one of 4 and an idle replica (batching buys a GPU little; a second replica halves the latency).
- Replicas are taken least-outstanding first, then longest-idle first, so load spreads evenly.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from .errors import CapacityError, QueueFullError
from .messages import BatchKey, ImageRequest


@dataclass(frozen=True)
class ReplicaCapacity:
    """What the router knows of a replica when scheduling: its plan's limits and its current load."""

    replica_id: str
    max_pixels: int  # largest single image
    max_batch_pixels: int  # most images x pixels in one batch (the plan's memory budget)
    outstanding: int = 0  # batches dispatched and not yet returned
    last_used: int = -1  # dispatch sequence number of its latest batch (ties go to the longest idle)

    def fits(self, key: BatchKey) -> bool:
        return key.pixels <= self.max_pixels

    def batch_limit(self, key: BatchKey) -> int:
        return max(1, self.max_batch_pixels // key.pixels)


@dataclass
class Pending:
    request: ImageRequest
    enqueued_at: float
    deadline: float
    attempts: int = 0
    max_batch: int | None = None  # set after an out-of-memory split: never batch this request above it
    ticket: Any = field(default=None, compare=False)  # the router's handle (a future); opaque here
    progress: Any = field(default=None, compare=False)  # the caller's per-step callback, if it wants one


class BatchScheduler:
    def __init__(self, max_batch_size: int, max_wait_s: float, queue_limit: int):
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_limit = queue_limit
        self._groups: OrderedDict[BatchKey, deque[Pending]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    # ---- admission -------------------------------------------------------------------------------------
    def add(self, p: Pending, *, front: bool = False) -> None:
        """Queue a request. ``front=True`` is for retries: they keep their place ahead of newer work and are
        admitted even over the limit, so a replica failure never turns accepted work into a rejection."""
        if not front and self._size >= self.queue_limit:
            raise QueueFullError(
                f"the queue is full ({self._size} requests waiting, router.queue_limit={self.queue_limit}); "
                f"retry later",
            )
        group = self._groups.get(p.request.key)
        if group is None:
            group = self._groups[p.request.key] = deque()
        if front:
            group.appendleft(p)
        else:
            group.append(p)
        self._size += 1

    def check_servable(self, key: BatchKey, replicas: list[ReplicaCapacity]) -> None:
        """Raise ``CapacityError`` when no replica of the deployment could ever run this size."""
        if replicas and not any(r.fits(key) for r in replicas):
            best = max(r.max_pixels for r in replicas)
            raise CapacityError(
                f"size {key.width}x{key.height} ({key.pixels} pixels) is larger than any replica of this "
                f"deployment can serve (largest: {best} pixels per image); use a smaller size or a placement "
                f"with more GPU memory per replica",
                param="size",
            )

    def remove(self, p: Pending) -> bool:
        group = self._groups.get(p.request.key)
        if group is None:
            return False
        try:
            group.remove(p)
        except ValueError:
            return False
        self._size -= 1
        if not group:
            del self._groups[p.request.key]
        return True

    def expire(self, now: float) -> list[Pending]:
        """Remove and return every queued request whose deadline has passed."""
        gone = [p for g in self._groups.values() for p in g if p.deadline <= now]
        for p in gone:
            self.remove(p)
        return gone

    # ---- decisions -------------------------------------------------------------------------------------
    def _ordered_groups(self) -> list[tuple[BatchKey, deque[Pending]]]:
        return sorted(self._groups.items(), key=lambda kv: kv[1][0].enqueued_at)

    def _limit(self, key: BatchKey, group: deque[Pending], replica: ReplicaCapacity) -> int:
        limit = min(self.max_batch_size, replica.batch_limit(key))
        head_cap = group[0].max_batch
        return min(limit, head_cap) if head_cap else limit

    def schedule(self, now: float, free: list[ReplicaCapacity]) -> list[tuple[str, list[Pending]]]:
        """Form batches for the free replicas (least outstanding first, ties by id). Returns
        ``[(replica_id, requests)]`` and removes those requests from the queue."""
        decisions = []
        order = sorted(free, key=lambda r: (r.outstanding, r.last_used, r.replica_id))
        for n, replica in enumerate(order):
            for key, group in self._ordered_groups():
                if not replica.fits(key):
                    continue
                limit = self._limit(key, group, replica)
                if len(group) >= limit or now - group[0].enqueued_at >= self.max_wait_s:
                    sharing = sum(1 for r in order[n:] if r.fits(key))
                    limit = min(limit, -(-len(group) // sharing))
                    taken = []
                    while group and len(taken) < limit:
                        if group[0].max_batch and len(taken) >= group[0].max_batch:
                            break
                        taken.append(group.popleft())
                    self._size -= len(taken)
                    if not group:
                        del self._groups[key]
                    decisions.append((replica.replica_id, taken))
                    break
        return decisions

    def next_deadline(self, free: list[ReplicaCapacity]) -> float | None:
        """When the earliest group becomes ready for one of ``free`` (max wait elapses), or the earliest
        request times out; None when nothing is queued."""
        times = [p.deadline for g in self._groups.values() for p in g]
        if free:
            times += [g[0].enqueued_at + self.max_wait_s for k, g in self._groups.items() if any(r.fits(k) for r in free)]
        return min(times) if times else None
