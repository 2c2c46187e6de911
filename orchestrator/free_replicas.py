"""The live replicas with room, kept up to date as work goes out and comes back, so that a router-loop pass costs the
same with 8 replicas or 1,024.

The scheduler reads of a free replica only its room (``ReplicaCapacity`` less its id and last use): replicas with
equal rooms are interchangeable to it, so they are kept together as one *kind*. A pass asks each kind once whether
anything waiting is ready for it (a kind with nothing ready is closed for the rest of the pass: taking requests out
of the queue never makes a group readier), and hands out members one at a time:

- ``LeastLoaded``: the member with the fewest outstanding batches, then the longest idle, then by id (a router that
  alone sends to its replicas, whose books see all their work);
- ``PowerOfTwo``: two free replicas drawn at random, the shorter queue as the replicas report it wins (several front
  doors over one pool, ``pow2.py``).

Upkeep is O(log n) per change of one replica (a dispatch, a return); a pass is O(kinds) plus O(log n) per replica
handed out. Pure data: no clock, no asyncio.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .scheduler import ReplicaCapacity

__all__ = ["FreeReplicas", "LeastLoaded", "Pass", "PowerOfTwo", "Pick"]


def kind_of(room: ReplicaCapacity) -> tuple:
    """What the scheduler reads of a free replica besides its id and last use."""
    return (room.max_pixels, room.max_batch_tokens, room.outstanding, room.max_images, room.adapters,
            room.limit_tokens, room.job_room)


class _Kind:
    """The free replicas with one room. ``heap`` orders them by last use (lazy: an entry is live while the member's
    room is the one it was pushed with); ``ids`` lets a member be drawn at random (swap-remove)."""

    __slots__ = ("key", "sample", "members", "heap", "ids", "index")

    def __init__(self, key: tuple, sample: ReplicaCapacity):
        self.key = key
        self.sample = sample
        self.members: dict[str, ReplicaCapacity] = {}
        self.heap: list[tuple[int, str, ReplicaCapacity]] = []
        self.ids: list[str] = []
        self.index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.members)

    def add(self, room: ReplicaCapacity) -> None:
        rid = room.replica_id
        self.members[rid] = room
        heapq.heappush(self.heap, (room.last_used, rid, room))
        self.index[rid] = len(self.ids)
        self.ids.append(rid)

    def remove(self, rid: str) -> None:
        del self.members[rid]
        i = self.index.pop(rid)
        last = self.ids.pop()
        if last != rid:
            self.ids[i] = last
            self.index[last] = i
        if len(self.heap) > 2 * len(self.members) + 16:  # drop dead entries before they outnumber the live
            self.heap = [e for e in self.heap if self.members.get(e[1]) is e[2]]
            heapq.heapify(self.heap)

    def live(self, entry) -> bool:
        return self.members.get(entry[1]) is entry[2]


class FreeReplicas:
    """Every live replica with room, by kind."""

    def __init__(self, rooms: Iterable[ReplicaCapacity] = ()):
        self._kinds: dict[tuple, _Kind] = {}
        self._where: dict[str, _Kind] = {}
        for room in rooms:
            self.put(room)

    def put(self, room: ReplicaCapacity) -> None:
        """Add a replica, or replace what is known of its room."""
        rid = room.replica_id
        key = kind_of(room)
        kind = self._where.get(rid)
        if kind is not None:
            if kind.key == key and kind.members[rid] == room:
                return
            self._remove(rid, kind)
        kind = self._kinds.get(key)
        if kind is None:
            kind = self._kinds[key] = _Kind(key, room)
        kind.add(room)
        self._where[rid] = kind

    def drop(self, replica_id: str) -> None:
        """The replica has no room now (or left)."""
        kind = self._where.get(replica_id)
        if kind is not None:
            self._remove(replica_id, kind)

    def _remove(self, rid: str, kind: _Kind) -> None:
        kind.remove(rid)
        del self._where[rid]
        if not kind.members:
            del self._kinds[kind.key]

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, replica_id: str) -> bool:
        return replica_id in self._where

    def rooms(self) -> list[ReplicaCapacity]:
        """Every free replica's room (tests and logs; O(n))."""
        return [room for kind in self._kinds.values() for room in kind.members.values()]

    def kinds(self) -> list[_Kind]:
        return list(self._kinds.values())

    def start(self, pick: Pick | None = None, exclude: Callable[[ReplicaCapacity], bool] | None = None) -> Pass:
        """A pass over the free replicas: ``pick`` hands them out (``LeastLoaded`` by default); kinds for which
        ``exclude`` holds take part in nothing."""
        return Pass(self, pick or LEAST_LOADED, exclude)


class Pass:
    """One scheduling pass: each replica is handed out at most once (``next``); a kind found with nothing ready is
    ``close``d. Call ``end`` when done (the pass borrows the heaps' heads it handed out)."""

    def __init__(self, free: FreeReplicas, pick: Pick, exclude: Callable[[ReplicaCapacity], bool] | None):
        self.free = free
        self.pick = pick
        self.open: dict[tuple, _Kind] = {}
        self.avail: dict[tuple, int] = {}  # members not handed out yet, per open kind
        self.taken: list[tuple[_Kind, tuple]] = []  # heap entries handed out (LeastLoaded), put back by ``end``
        self.examined = 0  # kinds and replicas looked at (the routing work, counted for benchmarks and tests)
        self.passed = 0  # replicas passed over (PowerOfTwo)
        self.given: dict[str, int] = {}  # requests given to a replica in this pass (not in its books until dispatched)
        self.best: tuple | None = None  # the shortest queue among replicas given work in this pass (PowerOfTwo)
        for kind in free.kinds():
            self.examined += 1
            if exclude is None or not exclude(kind.sample):
                self.open[kind.key] = kind
                self.avail[kind.key] = len(kind)

    def next(self) -> ReplicaCapacity | None:
        """The next replica to offer work to, handed out (it is not offered again in this pass); None when none
        is left."""
        return self.pick.next(self)

    def close(self, room: ReplicaCapacity) -> None:
        """Nothing is ready for replicas like ``room``: no member of its kind is offered anything in this pass."""
        key = kind_of(room)
        self.open.pop(key, None)

    def count(self, admits: Callable[[ReplicaCapacity], bool], cap: int) -> int:
        """How many replicas not handed out yet (in open kinds) ``admits`` holds for, up to ``cap``."""
        n = 0
        for key, kind in self.open.items():
            self.examined += 1
            if self.avail[key] and admits(kind.sample):
                n += self.avail[key]
                if n >= cap:
                    return cap
        return n

    def gave(self, replica_id: str, n: int) -> None:
        self.given[replica_id] = self.given.get(replica_id, 0) + n
        self.pick.gave(self, replica_id)

    def idle(self) -> int:
        """Replicas with nothing outstanding, not handed out yet."""
        return sum(self.avail[k] for k, kind in self.open.items() if kind.sample.outstanding == 0)

    def end(self) -> None:
        """Give back the heap heads handed out (their replicas' rooms stand until the router changes them)."""
        for kind, entry in self.taken:
            if kind.live(entry):
                heapq.heappush(kind.heap, entry)
        self.taken.clear()

    # ---- for the picks ---------------------------------------------------------------------------------------
    def head(self, key: tuple) -> tuple | None:
        """The least recently used member of an open kind not handed out yet (its heap entry)."""
        kind = self.open[key]
        heap = kind.heap
        while heap and not kind.live(heap[0]):
            heapq.heappop(heap)
        return heap[0] if heap else None

    def take_head(self, key: tuple) -> ReplicaCapacity:
        kind = self.open[key]
        entry = heapq.heappop(kind.heap)
        self.taken.append((kind, entry))
        self._handed_out(key, entry[1])
        return entry[2]

    def draw(self) -> str | None:
        """A member not handed out yet, drawn uniformly over the open kinds."""
        total = sum(self.avail[k] for k in self.open)
        if total <= 0:
            return None
        i = self.pick.rng.randrange(total)
        for key, kind in self.open.items():
            n = self.avail[key]
            if i < n:
                return kind.ids[i]
            i -= n
        return None  # (unreachable)

    def draw_other(self, rid: str) -> str | None:
        """A member of an open kind other than ``rid``, handed out in this pass or not; None when there is none."""
        total = sum(len(kind) for kind in self.open.values())
        if total < 2:
            return None
        while True:
            i = self.pick.rng.randrange(total)
            for kind in self.open.values():
                if i < len(kind):
                    other = kind.ids[i]
                    break
                i -= len(kind)
            if other != rid:
                return other

    def available(self, rid: str) -> bool:
        """Whether ``rid`` is in an open kind and not handed out yet."""
        kind = self.free._where.get(rid)
        return kind is not None and kind.key in self.open and kind.index[rid] < self.avail[kind.key]

    def take(self, rid: str) -> ReplicaCapacity:
        """Hand out a drawn member: it moves past the end of its kind's drawable ids."""
        kind = self.free._where[rid]
        self._handed_out(kind.key, rid)
        return kind.members[rid]

    def _handed_out(self, key: tuple, rid: str) -> None:
        kind = self.open[key]
        self.examined += 1
        n = self.avail[key] - 1
        i, j = kind.index[rid], n
        if i <= n:  # swap it to just past the drawable ids (the first ``avail`` of ``ids``)
            other = kind.ids[j]
            kind.ids[i], kind.ids[j] = other, rid
            kind.index[other], kind.index[rid] = i, j
        self.avail[key] = n


class Pick(Protocol):
    rng: random.Random

    def next(self, p: Pass) -> ReplicaCapacity | None: ...

    def gave(self, p: Pass, replica_id: str) -> None: ...


class LeastLoaded:
    """Fewest outstanding batches first, then the longest idle (lowest last use), then by id."""

    rng = random.Random(0)  # (unused: nothing is drawn)

    def gave(self, p: Pass, replica_id: str) -> None:
        pass

    def next(self, p: Pass) -> ReplicaCapacity | None:
        best = None
        for key, kind in p.open.items():
            if not p.avail[key]:
                continue
            p.examined += 1
            entry = p.head(key)
            if entry is None:
                continue
            rank = (kind.sample.outstanding, entry[0], entry[1])
            if best is None or rank < best[0]:
                best = (rank, key)
        return None if best is None else p.take_head(best[1])


LEAST_LOADED = LeastLoaded()


@dataclass
class PowerOfTwo:
    """A free replica drawn at random is offered work unless another drawn at random (among all free ones, those
    already given a call in this pass included) has a shorter queue: then that one is offered, or, if it already
    has its call, neither is in this pass (the router schedules again after a pass that dispatched, and the winner
    may take more then). A replica whose queue is longer than one given work in this pass is passed over too: that
    one takes more in the next pass, so a burst does not spread to the long queues just because they are free.

    ``length(replica_id)``: (rank, samples), a lower rank first, then fewer samples (what the pass gave it counts);
    ``full(replica_id)``: whether to pass it over (its queue at the most it may hold, or not known yet).
    ``max_passed`` bounds the replicas passed over in one pass: past it, work waits for the next pass (a report, a
    return, an arrival)."""

    length: Callable[[str], tuple[int, int]]
    full: Callable[[str], bool]
    rng: random.Random
    max_passed: int = 16
    passed_over: int = 0  # replicas passed over as full, in every pass so far

    def next(self, p: Pass) -> ReplicaCapacity | None:
        while p.passed < self.max_passed:
            first = p.draw()
            if first is None:
                return None
            if self.full(first):
                p.take(first)
                p.passed += 1
                self.passed_over += 1
                continue
            rank = self._rank(p, first)
            if p.best is not None and p.best < rank:
                p.take(first)  # longer than a replica given work in this pass: that one takes more next pass
                p.passed += 1
                continue
            other = p.draw_other(first)
            if other is None or self.full(other) or not self._rank(p, other) < rank:
                return p.take(first)
            if p.available(other):
                return p.take(other)
            p.take(first)  # it lost to a replica that has its call in this pass already
            p.passed += 1
        return None

    def gave(self, p: Pass, replica_id: str) -> None:
        rank = self._rank(p, replica_id)
        if p.best is None or rank < p.best:
            p.best = rank

    def _rank(self, p: Pass, rid: str) -> tuple[int, int]:
        rank, n = self.length(rid)
        return rank, n + p.given.get(rid, 0)
