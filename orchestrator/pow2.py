"""The queue lengths that several routers sharing replicas choose by: power of two choices (Ray Serve's
``PowerOfTwoChoicesRequestRouter``; the draw itself is ``free_replicas.PowerOfTwo``, the probes ``pool_queues.py``).

A router's own books (``replica_load.py``) see only what it sent; with several front doors the replicas' queues are
the sum of all of theirs, which only the replicas know (``actors/admission.py``: ``queue_lens``). Asking every replica
for every request would cost a round trip per replica, so, as Ray Serve does:

- the router picks two candidates at random among those that can take the request;
- it compares their queue lengths as last reported (``QueueLengths``: each report is trusted for ``ttl_s``, and the
  router counts what it sent since on top, so a burst from one front door does not all land on one replica before
  the next report);
- the shorter queue wins; a replica whose report is stale or missing is asked (``stale``), and one at
  ``max_queue`` is not a candidate.

Each replica reports two lengths: its interactive samples and all its samples. A batch job's samples hold back only
job work at a replica (its gate lets an interactive call pass waiting job calls, its step loop parks job samples for
interactive ones), so interactive work is compared by the interactive length and job work by the total; otherwise a
replica full of other front doors' job work would be passed over for an interactive request it would start at once.
What this router sent since counts by kind: a job's call to the total only, an interactive call to both.

The work per request is constant whatever the number of replicas. A small cache with an injected clock: nothing
here calls Ray.

Where it plugs in: with a pool of several front doors (``Router(shared=True)``), the router hands its free replicas
to the scheduler by ``free_replicas.PowerOfTwo`` over ``QueueLengths`` (it probes ``queue_lens`` through the replica
handle for the replicas whose report is stale, in the background); with replicas of its own it keeps ordering them
least-outstanding first by its own books, which see all their work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class _Report:
    length: int  # all samples
    interactive: int | None  # of those, interactive samples (None: the replica reports only its total)
    at: float
    sent_since: int = 0
    sent_interactive: int = 0

    def value(self, interactive: bool) -> int:
        if interactive and self.interactive is not None:
            return self.interactive + self.sent_interactive
        return self.length + self.sent_since


class QueueLengths:
    """Each replica's last reported queue lengths (all samples, and interactive samples), plus what this router sent
    it since. ``interactive`` (the readers' argument): the interactive length, else the total."""

    def __init__(self, ttl_s: float = 1.0, clock: Callable[[], float] | None = None):
        import time

        self.ttl_s = ttl_s
        self._clock = clock or time.monotonic
        self._reports: dict[str, _Report] = {}

    def report(self, replica_id: str, length: int, interactive: int | None = None) -> None:
        """``length``: all samples; ``interactive``: of those, the interactive ones (None: a replica that reports
        only its total, which then stands for both)."""
        self._reports[replica_id] = _Report(int(length), None if interactive is None else int(interactive),
                                            self._clock())

    def sent(self, replica_id: str, n: int = 1, job: bool = False) -> None:
        """This router sent ``n`` samples: a job's count to the total only, interactive ones to both."""
        r = self._reports.get(replica_id)
        if r is not None:
            r.sent_since += n
            if not job:
                r.sent_interactive += n

    def get(self, replica_id: str, interactive: bool = False) -> int | None:
        """The length to compare, or None when there is no fresh report."""
        r = self._reports.get(replica_id)
        if r is None or self._clock() - r.at > self.ttl_s:
            return None
        return r.value(interactive)

    def last(self, replica_id: str, interactive: bool = False) -> int | None:
        """The length as last reported plus what was sent since, however old; None when it never reported."""
        r = self._reports.get(replica_id)
        return None if r is None else r.value(interactive)

    def stale(self, replica_ids: Sequence[str]) -> list[str]:
        """The replicas to ask for their queue length before choosing among them."""
        return [rid for rid in replica_ids if self.get(rid) is None]

    def forget(self, replica_id: str) -> None:
        self._reports.pop(replica_id, None)
