"""A replica's own admission: the calls, tokens and samples it takes in at once, whatever number of front doors
send to it.

One router keeps within a replica's budget by its own books (``orchestrator/replica_load.py``); several routers over
one pool (front doors) each believe they hold the replica alone. The gate is what holds the budget then: a call
enters before any of its work starts (screening, encode, the step loop), first come first served, while the calls,
tokens and samples inside stay within ``AdmissionLimits``; the rest wait here, un-encoded, costing no GPU memory. A
call larger than the limits alone enters when nothing else is inside (it could never enter otherwise, and the
router sends such a call only to an idle replica). The limits are what one router sends at most, so with a single
front door nothing ever waits here.

Interactive calls and a batch job's are admitted as the router books them (``orchestrator/dispatch_policy.py``): an
interactive call counts only the interactive calls inside (the step loop runs their samples first and parks a
job's), a job's call counts everything inside; and a waiting interactive call goes ahead of waiting job calls.

``queue_lens`` is what routers compare when they choose between two replicas (power of two choices,
``orchestrator/pow2.py``): the interactive samples waiting plus inside, and all samples waiting plus inside
(``queue_len``, also the replica's queue gauge). Both, because a job's samples hold back only job work here: a
replica whose queue is all job work still takes an interactive call at once, so routers judge interactive work by
the first and job work by the second. A call's requests may be cancelled while it waits: a call whose
requests are all cancelled leaves the queue at once, and the others enter without the cancelled ones.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AdmissionLimits:
    """What a replica takes in at once: calls (batches, or groups joining its step loop), their tokens (the router's
    budget unit, ``ImageRequest.tokens``) and their samples. None: no limit on that count."""

    calls: int | None = None
    tokens: int | None = None
    samples: int | None = None


@dataclass(eq=False)
class Ticket:
    """One call at the gate."""

    request_ids: tuple[str, ...]
    tokens: int
    samples: int
    job: bool = False  # a batch job's call (after every interactive one)
    cancelled: set[str] = field(default_factory=set)
    per_request: dict[str, int] = field(default_factory=dict)  # each request's tokens
    admitted: bool = False
    withdrawn: bool = False  # every request cancelled while it waited: it never enters

    @property
    def live_ids(self) -> tuple[str, ...]:
        return tuple(i for i in self.request_ids if i not in self.cancelled)


@dataclass
class GateStats:
    waiting_calls: int = 0
    waiting_samples: int = 0
    calls: int = 0  # inside now
    tokens: int = 0
    samples: int = 0
    peak_calls: int = 0  # the most inside at once since the replica started
    peak_tokens: int = 0
    peak_samples: int = 0
    admitted_total: int = 0  # calls that entered
    waited_total: int = 0  # of those, calls that had to wait
    wait_s_total: float = 0.0


class AdmissionGate:
    """First come first served admission within ``AdmissionLimits``. Thread-safe: each Ray actor call runs on a
    thread of its own and blocks in ``enter`` until its turn."""

    def __init__(self, limits: AdmissionLimits, clock=None):
        import time

        self.limits = limits
        self._clock = clock or time.monotonic
        self._cond = threading.Condition()
        self._queue: deque[Ticket] = deque()
        self._inside: set[Ticket] = set()
        self._jobs = [0, 0, 0]  # calls, tokens, samples of the job calls inside
        self.stats = GateStats()

    def enter(self, request_ids, tokens: int, samples: int, timeout_s: float | None = None,
              job: bool = False, request_tokens=None) -> Ticket:
        """Wait for the call's turn and room; returns its ticket (``admitted``), or, when every request of it was
        cancelled meanwhile, a ``withdrawn`` one. ``job``: a batch job's call. ``request_tokens``: each request's
        tokens (one sample each; without them, an even share), so that a request cancelled while the call waits
        stops counting. ``timeout_s`` (tests): raise TimeoutError past it."""
        request_ids = tuple(request_ids)
        if request_tokens is None:
            request_tokens = [tokens // len(request_ids) + (i < tokens % len(request_ids))
                              for i in range(len(request_ids))]
        ticket = Ticket(request_ids, tokens, samples, job, per_request=dict(zip(request_ids, request_tokens)))
        t0 = self._clock()
        deadline = None if timeout_s is None else t0 + timeout_s
        with self._cond:
            self._queue.append(ticket)
            waited = False
            while not ticket.withdrawn and not (self._turn(ticket) and self._fits(ticket)):
                waited = True
                left = None if deadline is None else deadline - self._clock()
                if left is not None and left <= 0:
                    self._queue.remove(ticket)
                    self._cond.notify_all()
                    raise TimeoutError(f"not admitted within {timeout_s}s")
                self._cond.wait(left)
            if ticket.withdrawn:
                return ticket
            self._queue.remove(ticket)
            ticket.admitted = True
            self._inside.add(ticket)
            self._count(ticket, 1)
            s = self.stats
            s.peak_calls, s.peak_tokens = max(s.peak_calls, s.calls), max(s.peak_tokens, s.tokens)
            s.peak_samples = max(s.peak_samples, s.samples)
            s.admitted_total += 1
            s.waited_total += waited
            s.wait_s_total += self._clock() - t0
            self._cond.notify_all()  # the next in the queue may fit beside it
        return ticket

    def leave(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket in self._inside:
                self._inside.remove(ticket)
                self._count(ticket, -1)
                self._cond.notify_all()

    def cancel(self, request_ids) -> set[str]:
        """Mark these requests of waiting calls cancelled; returns those found waiting."""
        wanted = set(request_ids)
        found: set[str] = set()
        with self._cond:
            for t in list(self._queue):
                hit = wanted.intersection(t.request_ids) - t.cancelled
                if not hit:
                    continue
                t.cancelled |= hit
                # the others enter without them: they neither wait nor need room (one sample each)
                t.samples = max(0, t.samples - len(hit))
                t.tokens = max(0, t.tokens - sum(t.per_request.get(i, 0) for i in hit))
                found |= hit
                if not t.live_ids:
                    t.withdrawn = True
                    self._queue.remove(t)
            if found:
                self._cond.notify_all()
        return found

    def queue_len(self) -> int:
        """Samples waiting at the gate and inside it."""
        return self.queue_lens()[1]

    def queue_lens(self) -> tuple[int, int]:
        """(interactive samples, all samples) waiting at the gate and inside it, read at once."""
        with self._cond:
            waiting = sum(t.samples for t in self._queue)
            waiting_jobs = sum(t.samples for t in self._queue if t.job)
            total = waiting + self.stats.samples
            return total - waiting_jobs - self._jobs[2], total

    def snapshot(self) -> GateStats:
        with self._cond:
            s = GateStats(**vars(self.stats))
            s.waiting_calls = len(self._queue)
            s.waiting_samples = sum(t.samples for t in self._queue)
            return s

    def _count(self, t: Ticket, sign: int) -> None:
        """A call enters (``sign`` 1) or leaves (-1): what is inside, and of it the job calls'."""
        s = self.stats
        s.calls, s.tokens, s.samples = s.calls + sign, s.tokens + sign * t.tokens, s.samples + sign * t.samples
        if t.job:
            self._jobs = [self._jobs[0] + sign, self._jobs[1] + sign * t.tokens, self._jobs[2] + sign * t.samples]

    def _turn(self, t: Ticket) -> bool:
        """First come first served within a kind; interactive calls before job calls."""
        for other in self._queue:
            if other is t:
                return True
            if other.job == t.job or not other.job:
                return False
        return False

    def _fits(self, t: Ticket) -> bool:
        s = self.stats
        calls, tokens, samples = (s.calls, s.tokens, s.samples) if t.job else \
            (s.calls - self._jobs[0], s.tokens - self._jobs[1], s.samples - self._jobs[2])
        if not calls:
            return True  # alone (of what it counts) it always enters, even over the limits
        lim = self.limits
        return ((lim.calls is None or calls + 1 <= lim.calls)
                and (lim.tokens is None or tokens + t.tokens <= lim.tokens)
                and (lim.samples is None or samples + t.samples <= lim.samples))
