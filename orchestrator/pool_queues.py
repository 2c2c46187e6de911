"""A pooled front door's view of the shared replicas' queues, for power of two choices (``pow2.py``): the lengths
the replicas report (``queue_lens`` through the replica handle, ``actors/admission.py``: interactive samples and all
samples; a handle with only ``queue_len`` reports its total as both), what this router sent since, and the probes
that refresh a stale report in the background. The router's loop never waits for a probe: an answer wakes it.

A pass compares the replicas by one of the two lengths (``interactive``, set by the router before each pass): the
interactive length while an interactive request waits, else the total. A replica's job samples do not hold back
interactive work there, so a replica full of job work is still a candidate for an interactive request, and job work
still passes over a replica whose total queue is full (in a pass that compares interactive lengths, by
``full_for_jobs``).

A report is trusted for ``REPORT_TTL_S`` (what this router sent since counts on top); a stale one is still used
while its replica is asked again. A probe not answered within ``PROBE_TIMEOUT_S`` leaves the replica unknown: it
ranks after those that answered and is asked again after ``REPORT_TTL_S``. A replica whose queue holds
``QUEUE_SETS_MAX`` x ``max_batch_size`` samples (its loop's room and a set more waiting at its gate) is passed
over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .dispatch_policy import STEP_QUEUE_DEPTH
from .pow2 import QueueLengths

log = logging.getLogger("orchestrator.router")

REPORT_TTL_S = 1.0
PROBE_TIMEOUT_S = 0.5
QUEUE_SETS_MAX = STEP_QUEUE_DEPTH + 1


class PoolQueues:
    """``live``: the router's live replicas by id (read, never written here); ``loads``: its books by id (what it
    holds at a replica that never reported); ``wake``: called when an answer may let waiting work go;
    ``tasks``: where the probe tasks are kept alive."""

    def __init__(self, max_batch_size: int, clock, live: dict, loads: dict, wake: Callable[[], None], tasks: set):
        self.max_queue = QUEUE_SETS_MAX * max_batch_size
        self.clock = clock
        self._live = live
        self._loads = loads
        self._wake = wake
        self._tasks = tasks
        self._queues = QueueLengths(REPORT_TTL_S, clock=clock.now)
        self._probes: dict[str, asyncio.Task] = {}
        self._unanswered: dict[str, float] = {}  # replica -> when its last probe went unanswered
        self._no_report: set[str] = set()  # handles that cannot report a queue length
        self._stale: set[str] = set()  # replicas compared on a stale report in the last pass: to ask again
        self.interactive = False  # this pass compares interactive lengths (else totals); the router sets it

    def arrived(self, replica_id: str, replica) -> None:
        """A replica new to the roster (or back): ask its queue at once if it never reported."""
        if self._queues.last(replica_id) is None:
            if not _reports(replica):
                self._no_report.add(replica_id)
            else:
                self._stale.add(replica_id)

    def sent(self, replica_id: str, n: int, job: bool = False) -> None:
        self._queues.sent(replica_id, n, job)

    def forget(self, replica_id: str) -> None:
        self._queues.forget(replica_id)

    def length(self, replica_id: str, interactive: bool | None = None) -> int | None:
        """Its queue as last reported plus what this router sent since, interactive or total (by default as this
        pass compares); a stale report is still used, and the replica is asked again after this pass. None when it
        never reported."""
        interactive = self.interactive if interactive is None else interactive
        n = self._queues.get(replica_id, interactive)
        if n is None:
            self._stale.add(replica_id)
            n = self._queues.last(replica_id, interactive)
        return n

    def rank(self, replica_id: str) -> tuple[int, int]:
        """What power of two choices compares (smaller wins): a replica that left its last probe unanswered after
        one that answered; then the queue length, or where none was reported what this router holds there (a new
        replica gets work, and with it a report)."""
        n = self.length(replica_id)
        if n is None:
            load = self._loads.get(replica_id)
            n = 0 if load is None else load.images - (load.job_images if self.interactive else 0)
        return (replica_id in self._unanswered, n)

    def full(self, replica_id: str, interactive: bool | None = None) -> bool:
        """Passed over in this pass: its queue (by default the length this pass compares) is at ``max_queue``, or
        it never reported and is being asked (its answer wakes the loop). One that left its probe unanswered is not
        (it is compared last instead)."""
        if replica_id in self._unanswered or replica_id in self._no_report:
            return False
        n = self.length(replica_id, interactive)
        return n is None or n >= self.max_queue

    def full_for_jobs(self, replica_id: str) -> bool:
        """``full`` by its whole queue: a job's call in a pass that compares interactive lengths."""
        return self.full(replica_id, interactive=False)

    def ask(self, now: float) -> None:
        """Probe the replicas compared on a stale report (one probe at a time each; one left unanswered is asked
        again after ``REPORT_TTL_S``)."""
        for rid in self._stale:
            replica = self._live.get(rid)
            if replica is None or rid in self._probes or rid in self._no_report \
                    or now - self._unanswered.get(rid, float("-inf")) < REPORT_TTL_S:
                continue
            if not _reports(replica):
                self._no_report.add(rid)
                continue
            task = asyncio.get_running_loop().create_task(self._probe(rid, replica))
            self._probes[rid] = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._stale.clear()

    async def _probe(self, replica_id: str, replica) -> None:
        try:
            both = getattr(replica, "queue_lens", None)
            call = asyncio.ensure_future(both() if both is not None else replica.queue_len())
            alarm = asyncio.ensure_future(self.clock.sleep(PROBE_TIMEOUT_S))
            try:
                await asyncio.wait({call, alarm}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                alarm.cancel()
            if not call.done():
                call.cancel()
                raise TimeoutError(f"no answer within {PROBE_TIMEOUT_S}s")
            n = call.result()
            interactive, total = n if both is not None else (None, n)  # (a total alone stands for both)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - unknown until it answers; the health check judges the replica
            self._unanswered[replica_id] = self.clock.now()
            log.debug("replica %s did not report its queue length: %s", replica_id, e)
        else:
            self._queues.report(replica_id, total, interactive)
            self._unanswered.pop(replica_id, None)
        finally:
            self._probes.pop(replica_id, None)
        self._wake()  # a replica passed over (full, or not reported yet) may take work now


def _reports(replica) -> bool:
    """Whether the replica handle reports its queue (``queue_lens``, or an older one's ``queue_len``)."""
    return getattr(replica, "queue_lens", None) is not None or getattr(replica, "queue_len", None) is not None
