"""The batching decision, as pure logic: which requests go together, to which free replica, and when. No clock, no
asyncio, no Ray: the router passes ``now`` and the free replicas in and gets decisions out.

- Requests that share a ``BatchKey`` (the step count) may share a call, whatever their sizes, prompts and guidance.
  Within a key, first come first served; across keys, the key whose oldest request is oldest goes first.
- A call is filled in arrival order up to the replica's token budget (``ImageRequest.tokens``), ``max_batch_size``
  images and ``max_adapters`` distinct LoRA adapters (the resident slots its plan counts); a request that would
  overflow it waits while later, smaller ones may still fill it (the oldest always leads the next call).
- A group is *ready* when it fills a replica's room or its oldest request has waited ``max_wait_s``. A free replica
  (one with room: ``dispatch_policy.Dispatch``) takes the oldest ready group it can serve; else it waits until the
  earliest one will be (``next_deadline``). Waiting work is shared among the free replicas (4 requests, 2 replicas:
  two calls of 2), least-outstanding, then longest-idle replica first.
- Priority (``ImageRequest.priority``: interactive before batch jobs): priorities never share a call, groups are
  taken in priority order, and a replica that could serve interactive work not ready yet is held for it. While
  interactive traffic is about, batch-job work leaves ``reserve`` replicas idle, runs in calls of at most
  ``background_max_batch`` images, and goes to no busy replica (``interactive_recent``), so an interactive request
  never waits behind a batch job's work at a replica. There, denoising steps are by priority (a job's samples are
  parked while interactive ones run: ``actors/steploop.py``), waiting encodes and decodes run most urgent first
  (``actors/stages.py``) but one already running is not preempted, and a job's work runs at a lower CPU priority.
  A batch job fills only what that leaves.

The cost of a decision does not grow with the number of replicas or the queue's length: free replicas come in kinds
of equal room (``free_replicas.py``), each asked once a pass; a batch is filled from the first ``FILL_LOOKAHEAD``
requests of its group; deadlines are kept in a heap."""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from zimage_common.errors import CapacityError, QueueFullError
from zimage_common.messages import INTERACTIVE, BatchKey, ImageRequest

from .free_replicas import FreeReplicas, Pass, Pick

# A batch is filled from at most this many of its group's requests, in arrival order (a request that would overflow
# the batch lets later, smaller ones in, within this window): a deep queue costs each decision no more than this.
FILL_LOOKAHEAD = 64


@dataclass(frozen=True)
class ReplicaCapacity:
    """What the router knows of a replica when scheduling: its plan's limits and its current load."""

    replica_id: str
    max_pixels: int  # largest single image
    max_batch_tokens: int  # most tokens in one packed batch (the plan's memory budget, or the router's)
    outstanding: int = 0  # batches dispatched and not yet returned
    last_used: int = -1  # dispatch sequence number of its latest batch (ties go to the longest idle)
    max_images: int | None = None  # room left at it (None: max_batch_size)
    # the LoRA adapters what it holds already names (new work joins them, within max_adapters in all); None: free
    adapters: frozenset[str] | None = None
    # its plan's token budget, where max_batch_tokens is what is left of it (a busy replica); None: max_batch_tokens
    limit_tokens: int | None = None
    # (tokens, images) batch-job work may still take where it holds job work, which counts against job work's room
    # but not against interactive work's (the fields above); None: the fields above
    job_room: tuple[int, int] | None = None

    def for_jobs(self) -> ReplicaCapacity | None:
        """The room batch-job work sees here, or None when it has none."""
        if self.job_room is None:
            return self
        tokens, images = self.job_room
        if tokens <= 0 or images <= 0:
            return None
        return replace(self, max_batch_tokens=min(self.max_batch_tokens, tokens),
                       max_images=images if self.max_images is None else min(self.max_images, images), job_room=None)

    def fits(self, request: ImageRequest) -> bool:
        return request.pixels <= self.max_pixels and request.tokens <= self.max_batch_tokens


@dataclass(eq=False)  # each request is itself: two equal requests never stand for each other in a queue
class Pending:
    request: ImageRequest
    enqueued_at: float
    deadline: float
    attempts: int = 0
    max_batch: int | None = None  # set after an out-of-memory split: never batch this request above it
    ticket: Any = field(default=None, compare=False)  # the router's handle (a future); opaque here
    replica_id: str | None = None  # where it runs while dispatched (the router's)
    progress: Any = field(default=None, compare=False)  # the caller's per-step callback, if it wants one
    queued: bool = field(default=False, compare=False)  # in the scheduler's queue now (its deadline heap reads it)
    abandoned: bool = field(default=False, compare=False)  # its caller went away while it ran: never run it again
    order: int = field(default=-1, compare=False)  # its place in arrival order (the scheduler's), kept by retries
    # its queue time and first step went to the metrics (once a request, whatever retries it takes)
    queue_observed: bool = field(default=False, compare=False)
    first_step_observed: bool = field(default=False, compare=False)


class BatchScheduler:
    def __init__(self, max_batch_size: int, max_wait_s: float, queue_limit: int, max_adapters: int | None = None):
        self.max_batch_size = max_batch_size
        # distinct LoRA adapters one batch may name (a replica's resident slots: what its plan counts memory for)
        self.max_adapters = max_adapters
        self.max_wait_s = max_wait_s
        self.queue_limit = queue_limit
        self._groups: OrderedDict[tuple[BatchKey, int], deque[Pending]] = OrderedDict()
        # per group: (largest pixels, most tokens, whether any names an adapter) of the requests added since it was
        # made; a replica within them admits every request of the group without asking each
        self._bounds: dict[tuple[BatchKey, int], tuple[int, int, bool]] = {}
        self._deadlines: list[tuple[float, int, Pending]] = []  # (deadline, seq, pending), lazy: see ``queued``
        self._seq = itertools.count()
        self._arrivals = itertools.count()
        self._size = 0
        self.examined = 0  # replica kinds and replicas looked at by every pass so far (the routing work)

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
        key = _group(p.request)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = deque()
            self._bounds[key] = (0, 0, False)
        if front:  # back to its place: behind older work still queued, ahead of everything newer
            group.insert(next((i for i, q in enumerate(group) if q.order > p.order), len(group)), p)
        else:
            p.order = next(self._arrivals)
            group.append(p)
        pixels, tokens, named = self._bounds[key]
        r = p.request
        self._bounds[key] = (max(pixels, r.pixels), max(tokens, r.tokens), named or bool(r.loras))
        p.queued = True
        heapq.heappush(self._deadlines, (p.deadline, next(self._seq), p))
        self._size += 1

    def check_servable(self, request: ImageRequest, replicas: Sequence[ReplicaCapacity]) -> None:
        """Raise ``CapacityError`` when no replica of the deployment could ever run this request."""
        if replicas and not any(r.fits(request) for r in replicas):
            best = max(r.max_pixels for r in replicas)
            budget = max(r.max_batch_tokens for r in replicas)
            raise CapacityError(
                f"size {request.width}x{request.height} ({request.pixels} pixels, about {request.tokens} tokens "
                f"with its prompt) is larger than any replica of this deployment can serve (largest: {best} pixels "
                f"per image, {budget} tokens per batch); use a smaller size or a placement with more GPU memory "
                f"per replica",
                param="size",
            )

    def remove(self, p: Pending) -> bool:
        key = _group(p.request)
        group = self._groups.get(key)
        if group is None or not p.queued:
            return False
        try:
            group.remove(p)
        except ValueError:
            return False
        self._unqueued(key, group, 1)
        p.queued = False
        return True

    def _unqueued(self, key, group: deque[Pending], n: int) -> None:
        self._size -= n
        if not group:
            del self._groups[key]
            del self._bounds[key]
        if len(self._deadlines) > 2 * self._size + 64:  # drop entries of requests gone before they pile up
            self._deadlines = [(p.deadline, next(self._seq), p) for g in self._groups.values() for p in g]
            heapq.heapify(self._deadlines)

    def expire(self, now: float) -> list[Pending]:
        """Remove and return every queued request whose deadline has passed."""
        gone = []
        while self._deadlines and self._deadlines[0][0] <= now:  # (``remove`` may rebuild the heap)
            _, _, p = heapq.heappop(self._deadlines)
            if p.queued and self.remove(p):
                gone.append(p)
        return gone

    def earliest_deadline(self) -> float | None:
        heap = self._deadlines
        while heap and not heap[0][2].queued:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    # ---- decisions -------------------------------------------------------------------------------------
    def _ordered_groups(self) -> list[tuple[tuple[BatchKey, int], deque[Pending]]]:
        return sorted(self._groups.items(), key=lambda kv: (kv[0][1], kv[1][0].enqueued_at))

    def _fitting(self, key, group: deque[Pending], replica: ReplicaCapacity) -> tuple[Sequence[Pending], int]:
        """The requests of ``group`` that ``replica`` admits, in order, and how many: the group itself when the
        replica is within the group's bounds (nothing to ask of each); else those found among its first ones."""
        pixels, tokens, named = self._bounds[key]
        if pixels <= replica.max_pixels and tokens <= replica.max_batch_tokens \
                and not (named and replica.adapters is not None and self.max_adapters is not None):
            return group, len(group)
        fitting = []
        for p in itertools.islice(group, 4 * FILL_LOOKAHEAD):
            if self.admits(replica, p.request):
                fitting.append(p)
                if len(fitting) >= FILL_LOOKAHEAD:
                    break
        return fitting, len(fitting)

    def _fill(self, fitting: Sequence[Pending], replica: ReplicaCapacity, limit: int) -> list[Pending]:
        """The requests of ``fitting`` (a group's requests ``replica`` admits) a batch for it takes: from the first
        ``FILL_LOOKAHEAD`` in arrival order, within its token budget, ``limit`` images and ``max_adapters`` distinct
        LoRA adapters, and within any request's own cap after an out-of-memory split."""
        taken: list[Pending] = []
        tokens = 0
        adapters: frozenset[str] | set[str] = replica.adapters or frozenset()
        if replica.max_images is not None:
            limit = min(limit, replica.max_images)
        cap = limit  # the smallest cap of the requests taken
        for p in itertools.islice(fitting, FILL_LOOKAHEAD):
            if len(taken) >= limit:
                break
            names = adapters | p.request.adapter_names if p.request.loras else adapters
            if len(taken) + 1 > min(cap, p.max_batch or cap) or tokens + p.request.tokens > replica.max_batch_tokens \
                    or (self.max_adapters is not None and len(names) > self.max_adapters):
                if not taken:  # the head always runs, alone if it must
                    return [p]
                continue
            taken.append(p)
            tokens += p.request.tokens
            adapters = names
            if p.max_batch:
                cap = min(cap, p.max_batch)
        return taken

    def schedule(self, now: float, free: Sequence[ReplicaCapacity] | FreeReplicas, reserve: int = 0,
                 background_max_batch: int | None = None, interactive_recent: bool = False,
                 pick: Pick | None = None, exclude: Callable[[ReplicaCapacity], bool] | None = None,
                 no_jobs: Callable[[str], bool] | None = None) -> list[tuple[str, list[Pending]]]:
        """Form batches for the free replicas, offered in the order ``pick`` hands them out (least outstanding
        first, then longest idle, then by id, unless told otherwise; none of those ``exclude`` names). Returns
        ``[(replica_id, requests)]`` and removes those requests from the queue. ``reserve``: idle replicas that
        batch-job work must leave idle; ``background_max_batch``: the most images in a batch-job batch;
        ``interactive_recent``: busy replicas take no batch-job work (see Priority above); ``no_jobs``: the
        replicas (by id) that take no batch-job work in this pass, though they may take interactive work."""
        if not self._groups:
            return []
        p = _as_free(free).start(pick, exclude)
        try:
            return self._decide(now, p, reserve, background_max_batch, interactive_recent, no_jobs)
        finally:
            p.end()
            self.examined += p.examined

    def _decide(self, now: float, p: Pass, reserve: int, background_max_batch: int | None,
                interactive_recent: bool, no_jobs: Callable[[str], bool] | None) -> list[tuple[str, list[Pending]]]:
        decisions = []
        held: set = set()  # groups not ready yet that a free replica is kept for (see Priority above)
        groups = self._ordered_groups()
        idle = p.idle()
        while groups and (replica := p.next()) is not None:
            holding = None
            decided = skipped = False
            free = replica
            for key, group in groups:
                replica, job = free, key[1] > INTERACTIVE
                if holding is not None and key[1] > holding:
                    break  # this replica waits for the higher-priority group
                if job:  # (batch-job groups come last in the order)
                    if free.outstanding == 0 and idle <= reserve:
                        break  # kept idle for interactive requests
                    if free.outstanding and interactive_recent:
                        break
                    if (replica := free.for_jobs()) is None:
                        break  # full of job work; interactive work may still join (ReplicaCapacity.job_room)
                    if no_jobs is not None and no_jobs(free.replica_id):
                        skipped = True  # this replica only (its reported queue): others of its room may take it
                        break
                fitting, count = self._fitting(key, group, replica)
                if not fitting:
                    continue
                limit = self.max_batch_size
                if job and background_max_batch is not None:
                    limit = min(limit, background_max_batch)
                full = self._fill(fitting, replica, limit)
                waited = now - fitting[0].enqueued_at >= self.max_wait_s
                if len(full) < count or len(full) >= limit or waited:
                    # waiting work is shared among this replica and the free ones after it that admit its head
                    head = fitting[0].request
                    refused = no_jobs if job else None
                    sharing = 1 + p.count(lambda r, h=head, j=job, n=refused: self.admits_as(r, h, j) and (
                        n is None or not n(r.replica_id)), count - 1) if count > 1 else 1
                    taken = self._fill(fitting, replica, min(limit, -(-count // sharing)))
                    for q in taken:
                        group.remove(q)
                        q.queued = False
                    self._unqueued(key, group, len(taken))
                    decisions.append((replica.replica_id, taken))
                    p.gave(replica.replica_id, len(taken))
                    idle -= replica.outstanding == 0
                    decided = True
                    groups = self._ordered_groups()  # its head changed: the order may have
                    break
                if key not in held and any(k[1] > key[1] for k in self._groups):
                    held.add(key)
                    holding = key[1]
            if not decided and holding is None and not skipped:
                # Nothing is ready for it, and nothing would be for a replica with the same room: taking requests
                # out of a group makes it no readier.
                p.close(free)
        return decisions

    def admits_as(self, replica: ReplicaCapacity, request: ImageRequest, job: bool) -> bool:
        """``admits``, by the room a job's work has there when ``job``."""
        room = replica.for_jobs() if job else replica
        return room is not None and self.admits(room, request)

    def admits(self, replica: ReplicaCapacity, request: ImageRequest) -> bool:
        """Whether ``replica`` can take ``request`` now: it fits, and its adapters join those the work it holds
        names within ``max_adapters``."""
        if not replica.fits(request):
            return False
        if replica.adapters is None or self.max_adapters is None:
            return True
        return len(replica.adapters | request.adapter_names) <= self.max_adapters

    def oldest(self) -> Pending | None:
        """The request that has waited longest (it may block newer ones that would fit: ``Dispatch.blocked``)."""
        heads = [g[0] for g in self._groups.values()]
        return min(heads, key=lambda p: (p.request.priority, p.enqueued_at)) if heads else None

    def next_deadline(self, free: Sequence[ReplicaCapacity] | FreeReplicas, reserve: int = 0,
                      reserve_until: float | None = None, interactive_recent: bool = False,
                      exclude: Callable[[ReplicaCapacity], bool] | None = None) -> float | None:
        """When the earliest group becomes ready for one of ``free`` (max wait elapses), or the earliest request
        times out; None when nothing is queued. Batch-job work held
        back by priority counts from when it may go: once the interactive work ahead of it is ready (its own time
        is in the list), or once the ``reserve`` lapses (``reserve_until``)."""
        first = self.earliest_deadline()
        if first is None:
            return None
        times = [first]
        kinds = [k for k in _as_free(free).kinds() if exclude is None or not exclude(k.sample)]
        self.examined += len(kinds)
        idle = sum(len(k) for k in kinds if k.sample.outstanding == 0)
        ordered = self._ordered_groups()  # interactive groups first
        for kind in kinds:
            sample = kind.sample
            interactive = False  # whether interactive work fits this kind: job work waits for it (as ``_decide``)
            for key, g in ordered:
                r = sample
                if key[1] > INTERACTIVE and r.outstanding and interactive_recent:
                    if reserve_until is not None:  # (until then, the replica's next return wakes the router)
                        times.append(reserve_until)
                    continue
                if key[1] > INTERACTIVE and (r := sample.for_jobs()) is None:
                    continue  # full of job work: its next return wakes the router
                fitting, count = self._fitting(key, g, r)
                if count:
                    ready = fitting[0].enqueued_at + self.max_wait_s
                    if key[1] == INTERACTIVE:
                        interactive = True
                    else:
                        if interactive:
                            continue
                        if r.outstanding == 0 and idle <= reserve and reserve_until is not None:
                            ready = max(ready, reserve_until)
                    times.append(ready)
        return min(times)


def _as_free(free: Sequence[ReplicaCapacity] | FreeReplicas) -> FreeReplicas:
    return free if isinstance(free, FreeReplicas) else FreeReplicas(free)


def _group(request: ImageRequest) -> tuple[BatchKey, int]:
    """Requests that may share a batch: the same key and the same priority."""
    return request.key, request.priority
