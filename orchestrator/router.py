"""The router: one queue for the whole deployment, dynamic batching, dispatch to free replicas, results back.

The loop reads like the policy: expire what timed out, let the scheduler form batches for free replicas,
dispatch them, wait for something to change. The clock and the replica pool are passed in, so tests run it
with fakes and a manual clock. The batching decision itself lives in ``scheduler.py``; what the router knows of each
replica (its outstanding work, its speed) in ``replica_load.py``; how much work a replica's step loop may hold, and
the join policy each call carries, in ``dispatch_policy.py``.

Which free replica is offered work first: with replicas of its own, the least outstanding by the router's books
(they see all the replicas' work); with replicas shared by several front doors (``shared``, ``frontdoor.pool``),
power of two choices over the queue lengths the replicas report (``pow2.py``), a stale report asked for again in
the background (``pool_queues.py``: ``queue_lens`` through the replica handle), never awaited by the loop.

What a request costs the router does not grow with the number of replicas: the free ones are kept as they change
(``free_replicas.py``), the roster is read again only when it changes (``wake``) or every ``ROSTER_REFRESH_S``, and
deadlines sit in heaps (``benchmarks/routing_scale.py`` measures it from 8 to 1,024 replicas).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

from pydantic import ValidationError

from zimage_common.config import RouterConfig
from zimage_common.errors import NotReadyError, QueueFullError, ReplicaHungError, ReplicaUnavailableError
from zimage_common.logging_setup import batch_log_context
from zimage_common.messages import INTERACTIVE, Batch, BatchResult, FailureKind, ImageRequest, ImageResult, StepProgress

from .dispatch_policy import STEP_QUEUE_DEPTH, Dispatch
from .free_replicas import LEAST_LOADED, FreeReplicas, PowerOfTwo
from .pool_queues import REPORT_TTL_S, PoolQueues
from .replica_load import ReplicaLoad
from .router_ports import Clock, MonotonicClock, Replica, ReplicaPool, RouterObserver
from .scheduler import BatchScheduler, Pending, ReplicaCapacity

__all__ = ["STEP_QUEUE_DEPTH", "Clock", "MonotonicClock", "Replica", "ReplicaPool", "Router", "RouterObserver"]

log = logging.getLogger(__name__)

ROSTER_REFRESH_S = 1.0  # the pool's live replicas are read again at least this often (and whenever ``wake`` says)


def batch_wait_s(config: RouterConfig) -> float:
    """How long a request may wait at the router for batch-mates while a replica has room. Under step scheduling,
    none: the replica's loop takes later arrivals at its next step, so a wait only delays the first. Whole batches
    (scheduling=batch) cannot take anyone once they start, so there a request waits up to ``max_wait_ms``."""
    return 0.0 if config.scheduling == "step" else config.max_wait_ms / 1000.0


class Router:
    def __init__(self, pool: ReplicaPool, config: RouterConfig, clock: Clock | None = None,
                 observer: RouterObserver | None = None, max_batch_adapters: int | None = None,
                 interactive_reserve: tuple[int, float, int | None] = (0, 0.0, None), shared: bool = False,
                 rng: random.Random | None = None):
        self.pool = pool
        self.config = config
        self.clock = clock or MonotonicClock()
        self.observer = observer or RouterObserver()
        self.scheduler = BatchScheduler(config.max_batch_size, batch_wait_s(config), config.queue_limit,
                                        max_batch_adapters)
        self._loads: dict[str, ReplicaLoad] = {}  # replica_id -> its books (replica_load.py)
        self._live: dict[str, Replica] = {}  # the pool's live replicas, as last read
        self._limits: list[ReplicaCapacity] = []  # the members' distinct plan limits (admission checks them)
        self._roster_changed = True  # a replica came or went: read the roster again, forget those gone for good
        self._roster_at = float("-inf")
        self._rooms_stale = False  # every live replica's room to be computed again (the policy changed)
        self._free = FreeReplicas()  # the live replicas with room
        self._running: dict[str, Pending] = {}  # request_id -> pending, dispatched and not yet answered
        self._running_deadlines: list[tuple[float, int, Pending]] = []  # lazy: an entry of a request not running
        self._seq = itertools.count()
        self._batch_ids = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._inflight_tasks: set[asyncio.Task] = set()
        self._accepting = True
        self._policy = Dispatch(config, self.scheduler)
        # (replicas, seconds, batch): while an interactive request arrived within the last `seconds`, batch-job work
        # leaves this many replicas idle for interactive requests (never the last live replica) and runs in batches
        # of at most `batch` images (None: max_batch_size) (scheduler.py, Priority)
        self.interactive_reserve = interactive_reserve
        self._last_interactive = float("-inf")
        # replicas shared with other front doors: power of two choices over their reported queue lengths
        self.shared = shared
        self.queues = PoolQueues(config.max_batch_size, self.clock, self._live, self._loads, self._wake_if_waiting,
                                 self._inflight_tasks)
        self.max_queue = self.queues.max_queue
        self._pick = PowerOfTwo(self.queues.rank, self.queues.full, rng or random.Random()) if shared \
            else LEAST_LOADED

    @property
    def scheduling(self) -> str:
        """``router.scheduling``: the join policy the calls carry from now on."""
        return self.config.scheduling

    @scheduling.setter
    def scheduling(self, value: str) -> None:
        # Settable on a running router (benchmarks/step_batching.py compares the values on one warm deployment):
        # only the join policy of the calls sent from now on changes; those out keep theirs.
        try:
            self.config = self.config.model_validate({**self.config.model_dump(), "scheduling": value})
        except ValidationError:
            raise ValueError(f"router.scheduling must be 'step' or 'batch', got {value!r}") from None
        self._policy = Dispatch(self.config, self.scheduler)
        self.scheduler.max_wait_s = batch_wait_s(self.config)
        self._roster_changed = self._rooms_stale = True  # (every room again, by the new policy)

    def load(self, replica_id: str) -> ReplicaLoad:
        """The router's books on a replica (made on first sight)."""
        load = self._loads.get(replica_id)
        if load is None:
            load = self._loads[replica_id] = ReplicaLoad(replica_id)
        return load

    # ---- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="zimage-router")

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Stop accepting; wait until queued and running requests are answered. True if all were."""
        self._accepting = False
        t_end = None if timeout_s is None else time.monotonic() + timeout_s
        while len(self.scheduler) or self._running:
            if t_end is not None and time.monotonic() > t_end:
                return False
            await asyncio.sleep(0.02)
        return True

    async def stop(self) -> None:
        self._accepting = False
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for t in list(self._inflight_tasks):
            t.cancel()
        for p in self.scheduler.expire(float("inf")) + list(self._running.values()):
            self._finish(p, self._error_result(p, "the deployment shut down", FailureKind.NOT_READY))

    def wake(self) -> None:
        """Something changed outside (a replica came back or left): reconsider dispatch now."""
        self._roster_changed = True
        self._wake.set()

    @property
    def waiting(self) -> int:
        return len(self.scheduler)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def examined(self) -> int:
        """Replica kinds and replicas the scheduling passes have looked at so far (the routing work)."""
        return self.scheduler.examined

    # ---- the public entry point ------------------------------------------------------------------------
    async def submit(self, request: ImageRequest, timeout_s: float | None = None,
                     on_progress: Callable[[StepProgress], None] | None = None) -> ImageResult:
        """Queue one request and wait for its result. Raises on admission (queue full, not servable, not
        accepting); after admission every outcome, failures and timeouts included, is an ``ImageResult``.
        Cancelling the awaiting task drops the request if it has not been dispatched yet. ``on_progress`` is
        called after every denoising step of the batch that runs the request."""
        (waiter,) = self.admit([request], timeout_s, [on_progress])
        return await waiter

    def admit(self, requests: Sequence[ImageRequest], timeout_s: float | None = None,
              on_progress: Sequence[Callable[[StepProgress], None] | None] | None = None,
              ) -> list[Awaitable[ImageResult]]:
        """Queue several requests (one API call's ``n`` images) all or nothing: either every one is queued and
        an awaitable of its result comes back for each, or none is and the reason is raised (queue full, not
        servable, not accepting). Nothing is computed for a refused call. Await every returned awaitable;
        cancelling one drops its request if it has not been dispatched yet."""
        if not self._accepting:
            self.observer.rejected(FailureKind.NOT_READY)
            raise NotReadyError("the deployment is shutting down and accepts no new requests")
        # Admission looks at every member, live or recovering: while a replica restarts, requests wait in the
        # queue for it (up to their timeout) rather than being turned away.
        self._read_roster(self.clock.now())
        members = self._limits
        if not members:
            self.observer.rejected(FailureKind.NOT_READY)
            raise NotReadyError("the deployment has no replicas; retry shortly")
        try:
            for request in requests:
                self.scheduler.check_servable(request, members)
        except Exception as e:
            self.observer.rejected(getattr(e, "kind", FailureKind.INVALID_REQUEST))
            raise
        room = self.config.queue_limit - len(self.scheduler)
        if len(requests) > room:
            self.observer.rejected(FailureKind.QUEUE_FULL)
            raise QueueFullError(
                f"the queue has room for {max(0, room)} more request(s) and this call needs {len(requests)} "
                f"({len(self.scheduler)} waiting, router.queue_limit={self.config.queue_limit}); retry later")
        now = self.clock.now()
        if any(r.priority == INTERACTIVE for r in requests):
            self._last_interactive = now
        timeout = timeout_s if timeout_s is not None else self.config.request_timeout_s
        progress = list(on_progress) if on_progress is not None else [None] * len(requests)
        pendings = []
        for request, listener in zip(requests, progress):
            p = Pending(request, enqueued_at=now, deadline=now + timeout, progress=listener)
            p.ticket = asyncio.get_running_loop().create_future()
            pendings.append(p)
        for p in pendings:  # no await in between: the room checked above is still there
            self.scheduler.add(p)
        self._wake.set()
        return [self._waiter(p) for p in pendings]

    def _waiter(self, p: Pending) -> asyncio.Future:
        """The caller's future of ``p``'s result. Cancelling it, whether or not anyone awaits it yet (a gather of
        them cancelled at once), drops the request if it has not been dispatched, else has its replica drop it;
        the router's own ticket is never cancelled."""
        waiter = asyncio.shield(p.ticket)
        waiter.add_done_callback(lambda w: self._caller_left(p) if w.cancelled() else None)
        return waiter

    def _caller_left(self, p: Pending) -> None:
        if p.ticket.done():
            return
        if self.scheduler.remove(p):
            log.info("request %s cancelled by its caller before it ran", p.request.request_id)
            self.observer.finished(self._error_result(p, "cancelled by the client", FailureKind.CANCELLED))
        else:
            p.abandoned = True
            self._cancel_running(p)

    # ---- the loop ----------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                deadline = self._pass(self.clock.now())
            except Exception:  # noqa: BLE001 - a bug here must not silently stop all serving
                log.exception("router loop error; continuing")
                deadline = self.clock.now() + 0.1
            await self._wait_for_change(deadline)

    def _pass(self, now: float) -> float | None:
        """One pass: dispatch all that is ready now; returns when the next thing is due (None: nothing is)."""
        self._read_roster(now)
        self._expire(now)
        passed_over = getattr(self._pick, "passed_over", 0)
        # until nothing more is ready: a schedule gives each free replica at most one call
        while True:
            if self.shared:
                # The pick hands out a replica before the scheduler knows which group it is for: while an
                # interactive request waits, the pass compares the interactive lengths (job work at a replica does
                # not hold it back), and a job's call in that pass still skips a replica whose whole queue is full;
                # else the pass compares the totals (job work waits behind all of it).
                oldest = self.scheduler.oldest()
                self.queues.interactive = oldest is not None and oldest.request.priority == INTERACTIVE
            decisions = self.scheduler.schedule(
                now, self._free, *self._reserve(now), pick=self._pick, exclude=self._policy.blocked(),
                no_jobs=self.queues.full_for_jobs if self.shared and self.queues.interactive else None)
            if not decisions:
                break
            for replica_id, pendings in decisions:
                self._dispatch(replica_id, pendings, now)
        self.queues.ask(now)
        deadline = self._next_deadline(now)
        if getattr(self._pick, "passed_over", 0) > passed_over and len(self.scheduler):
            # work waits while replicas with room were passed over as full: look again once their reports age
            deadline = min(deadline, now + REPORT_TTL_S) if deadline is not None else now + REPORT_TTL_S
        return deadline

    def _expire(self, now: float) -> None:
        for p in self.scheduler.expire(now):
            self._finish(p, self._timeout_result(p, now, "while queued"))
        while self._running_deadlines and self._running_deadlines[0][0] <= now:
            _, _, p = heapq.heappop(self._running_deadlines)
            if self._running.get(p.request.request_id) is p:
                self._cancel_running(p)
                self._finish(p, self._timeout_result(p, now, "while running"))

    def _dispatch(self, replica_id: str, pendings: list[Pending], now: float) -> None:
        replica = self._replica(replica_id)
        batch = Batch(next(self._batch_ids), tuple(p.request for p in pendings), join=self._policy.join)
        for p in pendings:
            p.attempts += 1
            self._running[p.request.request_id] = p
            p.replica_id = replica_id
            heapq.heappush(self._running_deadlines, (p.deadline, next(self._seq), p))
        if len(self._running_deadlines) > 2 * len(self._running) + 64:  # entries of answered requests: drop them
            self._running_deadlines = [(p.deadline, next(self._seq), p) for p in self._running.values()]
            heapq.heapify(self._running_deadlines)
        load = self.load(replica_id)
        load.dispatched(batch, count_adapters=self.scheduler.max_adapters is not None)
        self._update_room(replica_id)
        if self.shared:
            self.queues.sent(replica_id, len(batch), batch.is_job)
        self.observer.dispatched(replica_id, batch, [now - p.enqueued_at for p in pendings if not p.queue_observed])
        for p in pendings:
            p.queue_observed = True
        with batch_log_context(batch):  # the batch task's log lines carry its requests' ids
            log.debug("batch %d: %d images, %d tokens, %s -> %s", batch.batch_id, len(batch), batch.tokens,
                      batch.key, replica_id)
            task = asyncio.get_running_loop().create_task(self._run(replica, load, batch, pendings))
        self._inflight_tasks.add(task)
        task.add_done_callback(self._inflight_tasks.discard)

    async def _run(self, replica: Replica, load: ReplicaLoad, batch: Batch, pendings: list[Pending]) -> None:
        out = None
        try:
            try:
                out = await self._run_watched(replica, load, batch, pendings)
            except ReplicaUnavailableError as e:
                log.warning("replica %s lost during batch %d (%s); re-dispatching %d request(s)",
                            replica.replica_id, batch.batch_id, e, len(pendings))
                self._report_failure(replica.replica_id, e)
                for p in pendings:
                    self._retry_or_fail(p, f"replica {replica.replica_id} died: {e}", FailureKind.REPLICA_LOST)
                return
            except Exception as e:  # noqa: BLE001 - a transport bug must fail the requests, not hang them
                log.exception("batch %d on %s: unexpected error", batch.batch_id, replica.replica_id)
                # As data, so that _deliver bisects it like any whole-batch failure (it may be one request's).
                self._deliver(batch, pendings, BatchResult(batch.batch_id, replica.replica_id, tuple(
                    self._error_result(p, f"{type(e).__name__}: {e}", FailureKind.REPLICA_ERROR) for p in pendings)))
                return
            self._deliver(batch, pendings, out)
        finally:
            self._returned(replica.replica_id, load, batch, pendings, out)

    def _returned(self, rid: str, load: ReplicaLoad, batch: Batch, pendings: list[Pending],
                  out: BatchResult | None) -> None:
        load.returned(batch)
        for p in pendings:
            if p.replica_id == rid:
                p.replica_id = None
        if not load.images:
            self.observer.loop_idle(rid)
            load.loop_step = 0  # a restarted replica's loop counts its steps from 0 again
        if load.leaving and not load.outstanding and self._loads.get(rid) is load:
            del self._loads[rid]
        if self._loads.get(rid) is load:
            self._update_room(rid)
        self.observer.batch_done(rid, out)
        self._wake.set()

    async def _run_watched(self, replica: Replica, load: ReplicaLoad, batch: Batch,
                           pendings: list[Pending]) -> BatchResult:
        """Run the batch; raise ``ReplicaHungError`` if the replica's loop runs no step within the hang limit (any
        step of its loop restarts the clock of every batch there: a batch-job call parked while interactive samples
        step is waiting on a loop that runs, not hung). The first step and the loop's occupancy feed the metrics."""
        listeners = [p.progress for p in pendings if p.progress is not None]
        stepped = asyncio.Event()
        load.beats.add(stepped)
        first = []

        def on_step(ev: StepProgress) -> None:
            for beat in load.beats:
                beat.set()
            if not first:
                first.append(True)
                now = self.clock.now()
                for p in pendings:
                    if not p.first_step_observed:
                        p.first_step_observed = True
                        self.observer.first_step(replica.replica_id, now - p.enqueued_at)
            if load.stepped(ev.loop_step):
                self.observer.loop_step(replica.replica_id, ev.running, ev.joined)
            for f in list(listeners):
                try:
                    f(ev)
                except Exception:  # noqa: BLE001 - a caller's listener never fails the call it shares
                    log.exception("a progress listener failed; it gets no more events of this call")
                    listeners.remove(f)

        run = asyncio.ensure_future(replica.run(batch, on_progress=on_step))
        limit = load.hang_limit(batch, self.config.hang_factor, self.config.hang_min_s,
                                self.config.first_batch_timeout_s)
        started = self.clock.now()
        try:
            while True:
                alarm = asyncio.ensure_future(self.clock.sleep(limit))
                beat = asyncio.ensure_future(stepped.wait())
                try:
                    await asyncio.wait({run, alarm, beat}, return_when=asyncio.FIRST_COMPLETED)
                except asyncio.CancelledError:
                    run.cancel()  # (the router stops: the call's await goes with it)
                    raise
                finally:
                    alarm.cancel()
                    beat.cancel()
                if run.done() or not stepped.is_set():
                    break
                stepped.clear()  # a step ran: the hang clock starts again
        finally:
            load.beats.discard(stepped)
        if not run.done():
            run.cancel()
            raise ReplicaHungError(f"batch {batch.batch_id} ran {limit:.0f}s without a step, past its hang limit "
                                   f"(router.hang_factor x expected, at least router.hang_min_s)")
        out = run.result()
        if out.results and all(r.ok for r in out.results):
            load.observe(batch, out.stage_times.total_s or self.clock.now() - started)
        return out

    def _deliver(self, batch: Batch, pendings: list[Pending], out: BatchResult) -> None:
        by_id = {r.request_id: r for r in out.results}
        now = self.clock.now()
        if out.results and all(r.error_type == FailureKind.NOT_READY for r in out.results):
            # A restarted actor that has not loaded its model yet: the same as a lost replica.
            self._report_failure(out.replica_id, RuntimeError(out.results[0].error))
            for p in pendings:
                self._retry_or_fail(p, f"replica {out.replica_id} is not ready", FailureKind.REPLICA_LOST)
            return
        # A batch whose every member failed may have failed for one member's input (no per-request check caught
        # it): bisect it. Where some members succeeded, the replica already kept the failure to its requests.
        failed_whole = len(batch) > 1 and not any(r.ok for r in out.results)  # a cancelled member counts too
        for p in pendings:
            r = by_id.get(p.request.request_id)
            if r is None:
                self._finish(p, self._error_result(p, "the replica returned no result for it",
                                                   FailureKind.REPLICA_ERROR))
            elif r.ok:
                self._finish(p, _with_times(r, p, now))
            elif r.error_type == FailureKind.OUT_OF_MEMORY and len(batch) > 1:
                # Split: retry each request in batches of at most half this size.
                p.max_batch = max(1, len(batch) // 2)
                p.attempts -= 1  # a split is not a failed attempt
                self._requeue(p)
            elif r.error_type == FailureKind.REPLICA_ERROR and failed_whole:
                # Bisect as for out of memory: each half runs again without counting an attempt, down to single
                # requests, so the innocent members succeed and only the culprit fails.
                log.info("batch %d failed as a whole (%s); bisecting %s", batch.batch_id, r.error,
                         p.request.request_id)
                p.max_batch = max(1, len(batch) // 2)
                p.attempts -= 1
                self._requeue(p)
            elif r.error_type == FailureKind.REPLICA_LOST:
                self._retry_or_fail(p, r.error or "a replica it depends on was lost", FailureKind.REPLICA_LOST)
            elif r.error_type == FailureKind.OUT_OF_MEMORY:
                self._finish(p, _with_times(r, p, now, error=(
                    f"out of GPU memory for a single {p.request.width}x{p.request.height} image on replica "
                    f"{r.replica_id}: {r.error}. Use a smaller size or a placement with more memory per replica.")))
            else:
                self._finish(p, _with_times(r, p, now))

    def _retry_or_fail(self, p: Pending, reason: str, kind: str) -> None:
        if p.attempts < self.config.max_attempts and self.clock.now() < p.deadline:
            self._requeue(p)
        else:
            self._finish(p, self._error_result(p, f"{reason} (after {p.attempts} attempt(s))", kind))

    def _requeue(self, p: Pending) -> None:
        if self._running.pop(p.request.request_id, None) is None or p.ticket.done():
            return  # already answered (timed out meanwhile)
        if p.abandoned:  # a split, a bisection or a lost replica would run it again for nobody
            self._finish(p, self._error_result(p, "cancelled by the client", FailureKind.CANCELLED))
            return
        self.scheduler.add(p, front=True)

    def _finish(self, p: Pending, result: ImageResult) -> None:
        if self._running.get(p.request.request_id) is p:
            del self._running[p.request.request_id]
        if p.ticket is not None and not p.ticket.done():
            p.ticket.set_result(result)
            self.observer.finished(result)

    # ---- helpers -------------------------------------------------------------------------------------------
    def _replica(self, replica_id: str) -> Replica:
        return self._live[replica_id]

    def _report_failure(self, replica_id: str, error: BaseException) -> None:
        self._free.drop(replica_id)
        self._roster_changed = True
        self.pool.report_failure(replica_id, error)

    def _read_roster(self, now: float) -> None:
        """Read the pool's live replicas and members again if told it changed (``wake``) or every
        ``ROSTER_REFRESH_S``; drop the books of replicas that left the deployment for good (a dropped replica's id
        never comes back; one with batches still out goes when the last returns). A replica that is only recovering
        keeps its books: what it learned of its speed still holds when it is back."""
        if not self._roster_changed and now - self._roster_at < ROSTER_REFRESH_S:
            return
        self._roster_changed, self._roster_at = False, now
        rooms_stale, self._rooms_stale = self._rooms_stale, False
        live = {r.replica_id: r for r in self.pool.live()}
        gone = [rid for rid in self._live if rid not in live]
        before = dict(self._live)
        self._live.clear()
        self._live.update(live)
        for rid in gone:
            self._free.drop(rid)
            self.queues.forget(rid)
        for rid, replica in live.items():
            if before.get(rid) is replica and not rooms_stale:
                continue  # (its room follows its books already)
            self._update_room(rid)
            if self.shared:
                self.queues.arrived(rid, replica)
        members = self.pool.members()
        self._limits = list({(r.max_pixels, r.max_batch_tokens): ReplicaCapacity(r.replica_id, r.max_pixels,
                                                                                    r.max_batch_tokens)
                             for r in members}.values())
        ids = {r.replica_id for r in members}
        for rid, load in list(self._loads.items()):
            if rid not in ids:
                load.leaving = True
                if not load.outstanding:
                    del self._loads[rid]

    def _update_room(self, replica_id: str) -> None:
        """Its books changed (or the roster did): keep it with the free replicas, or not, by its room now."""
        replica = self._live.get(replica_id)
        room = None if replica is None else self._policy.room(replica, self.load(replica_id))
        if room is None:
            self._free.drop(replica_id)
        else:
            self._free.put(room)

    def _wake_if_waiting(self) -> None:
        if len(self.scheduler):
            self._wake.set()

    def _cancel_running(self, p: Pending) -> None:
        """A dispatched request whose caller went away (or that timed out) leaves its replica's loop at the next
        step, freeing its room."""
        replica_id = p.replica_id
        if replica_id is None:
            return
        try:
            replica = self._replica(replica_id)
        except KeyError:
            return
        cancel = getattr(replica, "cancel", None)
        if cancel is not None:
            task = asyncio.get_running_loop().create_task(cancel([p.request.request_id]))
            self._inflight_tasks.add(task)
            task.add_done_callback(self._inflight_tasks.discard)
            log.info("request %s: asked replica %s to drop it from its step loop", p.request.request_id,
                     replica_id)

    def _reserve(self, now: float) -> tuple[int, int | None, bool]:
        """(idle replicas batch-job work leaves, its largest batch, whether busy replicas take none) now."""
        replicas, seconds, batch = self.interactive_reserve
        if now - self._last_interactive > seconds:
            return 0, None, False
        return min(replicas, len(self._live) - 1), batch, replicas > 0

    def _next_deadline(self, now: float) -> float | None:
        heap = self._running_deadlines
        while heap and self._running.get(heap[0][2].request.request_id) is not heap[0][2]:
            heapq.heappop(heap)
        times = [heap[0][0]] if heap else []
        reserve, _, recent = self._reserve(now)
        d = self.scheduler.next_deadline(self._free, reserve, self._last_interactive + self.interactive_reserve[1]
                                         + 1e-3 if reserve or recent else None, recent, self._policy.blocked())
        if d is not None:
            times.append(d)
        return min(times) if times else None

    async def _wait_for_change(self, deadline: float | None) -> None:
        waiters = [asyncio.ensure_future(self._wake.wait())]
        if deadline is not None:
            waiters.append(asyncio.ensure_future(self.clock.sleep(deadline - self.clock.now())))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    def _error_result(self, p: Pending, message: str, kind: str) -> ImageResult:
        now = self.clock.now()
        r = p.request
        return ImageResult(request_id=r.request_id, ok=False, seed=r.seed, width=r.width, height=r.height,
                           error=message, error_type=kind, latency_s=now - p.enqueued_at, attempts=p.attempts)

    def _timeout_result(self, p: Pending, now: float, where: str) -> ImageResult:
        return self._error_result(
            p, f"request timed out {where} after {now - p.enqueued_at:.1f}s "
               f"(router.request_timeout_s or the request's timeout)", FailureKind.TIMEOUT)


def _with_times(r: ImageResult, p: Pending, now: float, error: str | None = None) -> ImageResult:
    latency = now - p.enqueued_at
    queue = max(0.0, latency - r.stage_times.total_s)
    return replace(r, queue_s=queue, latency_s=latency, attempts=p.attempts,
                   **({"error": error} if error is not None else {}))
