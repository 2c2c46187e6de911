"""The replica set: every replica of a deployment with an explicit lifecycle state, its health checks, its recovery
after a failure and its removal when its node is gone; the router's replica pool (``live``, ``members``,
``report_failure``). States after Ray Serve's ``ReplicaState``::

    STARTING --start() answered--------------------------------------------> LIVE
    LIVE --report_failure(): a lost process, a hung batch, ----------------> RECOVERING
           health_failures_before_restart failed checks in a row (hung),
           or a health check that cannot reach the process (lost)
    RECOVERING --a new process loaded and warmed up------------------------> LIVE      ("back")
    RECOVERING --its node left the cluster---------------------------------> DROPPED   (removed for good)
    RECOVERING --no new process within deployment.start_timeout_s, --------> FAILED    (out of rotation)
                 or its restart raised a non-transient error

LIVE replicas are in rotation; STARTING, RECOVERING and FAILED ones are members, which admission counts (requests
wait for a restarting replica instead of being refused). A hung replica's process is killed (Ray restarts it); only
a new process counts as back, never the old one answering before the kill lands (its pid), unless it keeps answering
for ``OLD_PROCESS_GRACE_S``. Health checks run concurrently, at most one in flight per replica; the backend and the
clock are injected, so every path runs in milliseconds under a ``ManualClock`` (tests/fakes.py)."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from zimage_common.config import ClusterConfig, DeploymentConfig, ModelConfig
from zimage_common.errors import NotReadyError, ReplicaHungError, ReplicaUnavailableError, ZImageError
from zimage_common.messages import ReplicaHealth

from .router import Clock, MonotonicClock, Replica, RouterObserver

log = logging.getLogger(__name__)

RESTART_POLL_S = 20.0  # longest single wait for a restarting replica, so that a lost node is noticed meanwhile
RETRY_S = 0.5  # pause between two attempts to reach a restarting replica
OLD_PROCESS_GRACE_S = 10.0  # how long the old process may keep answering before it counts as back after all


class ReplicaState(str, enum.Enum):
    STARTING = "starting"  # created, loading and warming up for the first time
    LIVE = "live"  # in rotation, health-checked
    RECOVERING = "recovering"  # lost or hung: out of rotation until a new process has loaded
    FAILED = "failed"  # did not come back: out of rotation until the deployment restarts
    DROPPED = "dropped"  # its node left the cluster: removed for good


# ---- what the replica set needs from the outside world ---------------------------------------------------------
class Node(Protocol):
    name: str
    node_id: str
    gpus: int


class ReplicaHandle(Replica, Protocol):
    """A replica as the set sees it: the router's ``Replica`` plus its lifecycle."""

    node: Node

    async def start(self, timeout_s: float) -> ReplicaHealth:
        """Load and warm up (idempotent: a started replica answers at once). Raises ``NotReadyError`` past
        ``timeout_s`` and ``ReplicaUnavailableError`` while its process is gone or restarting."""

    async def check(self) -> Any:
        """A real small forward on every device; raises if the replica is not serving."""

    async def health(self) -> ReplicaHealth: ...

    def kill(self, no_restart: bool = False) -> None:
        """End the process; with ``no_restart=False`` the backend starts a fresh one (not yet loaded)."""

    def close(self) -> None:
        """End the process for good and release its resources."""


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a backend needs to create one replica of the plan."""

    replica_id: str
    node: Node
    n_gpus: int
    cpus: float
    max_pixels: int
    max_batch_tokens: int
    max_concurrency: int
    deployment_id: str
    model: ModelConfig
    device_map: dict[str, int] | None
    warmup_sizes: tuple[tuple[int, int], ...] | None  # None: no warm-up
    warmup_steps: int
    torch_threads: int | None
    memory_fraction: float | None
    encoder_replica: str | None  # the replica whose text encoder this one borrows
    max_batch_size: int = 0  # most samples in its step loop's running set; 0: no limit
    # What the replica takes in at once, (calls, tokens, samples), whatever number of front doors send to it
    # (actors/admission.py); None: no limit.
    admission: tuple[int | None, int | None, int | None] | None = None
    encode_threads: int = 2  # its encoder pool (actors/encoder_pool.py)
    # A pooled replica (frontdoor.pool): a named, detached actor in this Ray namespace that outlives the front door,
    # with this many call slots of its own for control calls (start, health, cancel, queue length), so that several
    # front doors' batches never hold up a health check. None: the replica ends with its front door.
    namespace: str | None = None
    control_slots: int = 0
    results_store: tuple[str, str] | None = None  # (namespace, actor name) of the Idempotency-Key store


class Backend(Protocol):
    """The cluster: Ray in ``ray_backend.RayBackend``, fakes in the tests."""

    def connect(self, cluster: ClusterConfig) -> None: ...

    def live_nodes(self) -> Sequence[Node]:
        """Alive nodes with at least one GPU."""

    async def wait_for_gpus(self, n: int, timeout_s: float) -> Sequence[Node]:
        """The live nodes once they hold ``n`` GPUs (nodes that join after the head); ``cluster.wait_for_gpus``."""
        ...

    def probe_gpu_memory_gib(self, node: Node) -> float:
        """Memory of one GPU of ``node`` (blocking: called in a thread)."""

    def node_alive(self, node_id: str) -> bool: ...

    def make_replica(self, spec: ReplicaSpec, encoder_host: ReplicaHandle | None = None) -> ReplicaHandle:
        """Create (not start) a replica; ``encoder_host`` is the replica whose text encoder it borrows. A pooled
        spec (``namespace`` set) whose replica exists already is attached to instead."""


# ---- the set -----------------------------------------------------------------------------------------------
class _CheckTimedOut(Exception):
    pass


@dataclass(eq=False)
class _Member:
    handle: ReplicaHandle
    state: ReplicaState = ReplicaState.STARTING
    generation: int = 0  # bumped every time the replica goes live: late results of older checks are ignored
    failures: int = 0  # consecutive failed health checks of this generation
    check: asyncio.Task | None = None  # the health check in flight
    check_since: float | None = None  # when it started (the injected clock)
    recovery: asyncio.Task | None = None


class ReplicaSet:
    """The replicas of a deployment and their lifecycle; the router's ``ReplicaPool``."""

    def __init__(self, backend: Backend, config: DeploymentConfig, clock: Clock | None = None,
                 observer: RouterObserver | None = None,
                 on_change: Callable[[str, ReplicaState, str], None] | None = None):
        self.backend = backend
        self.config = config
        self.clock = clock or MonotonicClock()
        self.observer = observer or RouterObserver()
        self.on_change = on_change  # (replica_id, new state, reason) after every transition
        # Awaited with a restarted replica before it is live again (the deployment re-registers runtime LoRAs).
        self.before_live: Callable[[str, ReplicaHandle], Awaitable[None]] | None = None
        self.health: dict[str, ReplicaHealth] = {}  # as of its last (re)start
        self.events: list[tuple[float, str, str]] = []  # (wall time, replica, what happened): faults and recoveries
        self._members: dict[str, _Member] = {}
        self._dropped: dict[str, str] = {}  # replica -> why
        self._health_task: asyncio.Task | None = None
        self._closed = False

    # ---- membership ------------------------------------------------------------------------------------
    def add(self, handle: ReplicaHandle) -> None:
        if handle.replica_id in self._members or handle.replica_id in self._dropped:
            raise ValueError(f"replica {handle.replica_id} is already in the set")
        self._members[handle.replica_id] = _Member(handle)

    @property
    def replicas(self) -> dict[str, ReplicaHandle]:
        """Every member (not dropped), in plan order."""
        return {rid: m.handle for rid, m in self._members.items()}

    def state(self, replica_id: str) -> ReplicaState:
        if replica_id in self._dropped:
            return ReplicaState.DROPPED
        return self._members[replica_id].state

    def states(self) -> dict[str, ReplicaState]:
        return {**{rid: ReplicaState.DROPPED for rid in self._dropped},
                **{rid: m.state for rid, m in self._members.items()}}

    def consecutive_failures(self, replica_id: str) -> int:
        return self._members[replica_id].failures

    # ---- the router's replica pool ---------------------------------------------------------------------
    def live(self) -> list[ReplicaHandle]:
        return [m.handle for m in self._members.values() if m.state is ReplicaState.LIVE]

    def members(self) -> list[ReplicaHandle]:
        return [m.handle for m in self._members.values()]

    def not_answering(self, after_s: float) -> list[str]:
        """Live replicas whose health check has been waiting for an answer longer than ``after_s``: a process that
        stopped answering (its Python held by something) shows here long before its checks time out and it is
        recycled."""
        now = self.clock.now()
        return sorted(rid for rid, m in self._members.items() if m.state is ReplicaState.LIVE
                      and m.check_since is not None and now - m.check_since > after_s)

    def report_failure(self, replica_id: str, error: BaseException) -> None:
        """A live replica died or hung: take it out of rotation, recycle it if it hung, and bring it back once
        the backend has restarted it (or drop it if its node is gone). Reports about a replica that is not live
        (already recovering, failed, dropped, or unknown) are ignored."""
        m = self._members.get(replica_id)
        if m is None or m.state is not ReplicaState.LIVE or self._closed:
            return
        hung = isinstance(error, ReplicaHungError)
        log.warning("replica %s is %s (%s); %s", replica_id, "hung" if hung else "down", error,
                    "recycling it" if hung else "waiting for it to restart")
        self._transition(replica_id, m, ReplicaState.RECOVERING, f"{'hung' if hung else 'lost'}: {error}")
        if hung:
            try:
                m.handle.kill(no_restart=False)  # the backend restarts the process fresh
            except Exception as e:  # noqa: BLE001 - already gone: recovery waits for the restart all the same
                log.debug("killing replica %s: %s", replica_id, e)
        m.recovery = asyncio.get_running_loop().create_task(self._recover(replica_id, m),
                                                            name=f"zimage-recover-{replica_id}")

    # ---- start / stop ----------------------------------------------------------------------------------
    async def start_replica(self, replica_id: str, timeout_s: float | None = None) -> ReplicaHealth:
        """First start of a replica: load and warm up, then it is live."""
        m = self._members[replica_id]
        h = await m.handle.start(self.config.start_timeout_s if timeout_s is None else timeout_s)
        self.health[replica_id] = h
        m.generation += 1
        m.failures = 0
        m.state = ReplicaState.LIVE
        return h

    def start_health_checks(self) -> None:
        if self._health_task is None and not self._closed:
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop(), name="zimage-health")

    async def close(self) -> None:
        """Stop checks and recoveries, then end every replica's process."""
        self._closed = True
        tasks = [t for t in [self._health_task, *(x for m in self._members.values() for x in (m.check, m.recovery))]
                 if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for m in self._members.values():
            m.handle.close()

    # ---- health checks ---------------------------------------------------------------------------------
    async def _health_loop(self) -> None:
        while True:
            await self.clock.sleep(self.config.health_interval_s)
            self.check_now()

    def check_now(self) -> list[asyncio.Task]:
        """Start a health check of every live replica that has none in flight; they run concurrently."""
        started = []
        for rid, m in self._members.items():
            if m.state is ReplicaState.LIVE and m.check is None:
                m.check_since = self.clock.now()
                m.check = asyncio.get_running_loop().create_task(self._check(rid, m, m.generation),
                                                                 name=f"zimage-check-{rid}")
                started.append(m.check)
        return started

    async def _check(self, replica_id: str, m: _Member, generation: int) -> None:
        timeout = self.config.health_timeout_s
        try:
            try:
                await self._within(m.handle.check(), timeout)
            except _CheckTimedOut:
                problem = f"health check took over {timeout:.0f}s"
            except ReplicaHungError as e:
                problem = f"health check failed: {e}"
            except ReplicaUnavailableError as e:
                # The process is gone (or restarting): no later check can succeed, so don't wait for more.
                if self._current(replica_id, m, generation):
                    self.report_failure(replica_id, e)
                return
            except Exception as e:  # noqa: BLE001 - any failure of the check counts
                problem = f"health check failed: {e}"
            else:
                if self._current(replica_id, m, generation):
                    m.failures = 0
                return
            if not self._current(replica_id, m, generation):
                return  # the replica went down and maybe came back meanwhile: this result is about the old one
            m.failures += 1
            limit = self.config.health_failures_before_restart
            if m.failures >= limit:
                self.report_failure(replica_id, ReplicaHungError(
                    f"{m.failures} health check(s) in a row failed, the last: {problem}"))
            else:
                log.warning("replica %s: %s (%d of %d before it is recycled)", replica_id, problem, m.failures,
                            limit)
        finally:
            if m.check is asyncio.current_task():
                m.check, m.check_since = None, None

    def _current(self, replica_id: str, m: _Member, generation: int) -> bool:
        return self._members.get(replica_id) is m and m.state is ReplicaState.LIVE and m.generation == generation

    async def _within(self, aw: Awaitable, timeout_s: float):
        """Await ``aw`` for at most ``timeout_s`` of the injected clock."""
        call = asyncio.ensure_future(aw)
        alarm = asyncio.ensure_future(self.clock.sleep(timeout_s))
        timed_out = False
        try:
            done, _ = await asyncio.wait({call, alarm}, return_when=asyncio.FIRST_COMPLETED)
            timed_out = call not in done
        finally:
            alarm.cancel()
            if not call.done():
                call.cancel()
        if timed_out:
            raise _CheckTimedOut()
        return call.result()

    # ---- recovery and dropping -------------------------------------------------------------------------
    async def _recover(self, replica_id: str, m: _Member) -> None:
        try:
            outcome = await self._wait_for_new_process(replica_id, m)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a bug here must not leave the replica silently down
            log.exception("replica %s: recovery failed", replica_id)
            outcome = f"recovery failed: {type(e).__name__}: {e}"
        m.recovery = None
        if outcome is None:
            return
        log.error("replica %s did not come back: %s", replica_id, outcome)
        self._transition(replica_id, m, ReplicaState.FAILED, f"failed: {outcome}")

    async def _wait_for_new_process(self, replica_id: str, m: _Member) -> str | None:
        """Poll the replica until a new process has loaded (then it is live again and this returns None), its
        node is gone (dropped, None), or it gives up (the reason)."""
        d, clock, handle = self.config, self.clock, m.handle
        # Every path here follows a process death or a kill (which the backend carries out asynchronously): only
        # a new process counts as back, never the old one answering before it goes.
        old = self.health.get(replica_id)
        old_pid = old.pid if old is not None else None
        same_process_since: float | None = None
        deadline = clock.now() + d.start_timeout_s
        while clock.now() < deadline:
            if not self._node_alive(handle):
                self._drop(replica_id, m, f"its node {handle.node.name} left the cluster")
                return None
            try:
                # Short waits, so a lost node is noticed; start() is idempotent, so asking again is safe.
                h = await handle.start(min(RESTART_POLL_S, d.start_timeout_s))
            except (ReplicaUnavailableError, NotReadyError) as e:
                log.debug("replica %s not back yet: %s", replica_id, e)
                await clock.sleep(RETRY_S)
                continue
            except ZImageError as e:
                return f"its restart failed: {e}"
            if old_pid is not None and h.pid == old_pid:
                # The old process still answers: a kill not yet carried out, or an error that was transient after
                # all. Give a kill OLD_PROCESS_GRACE_S to land; after that, the replica never went away.
                if same_process_since is None:
                    same_process_since = clock.now()
                if clock.now() - same_process_since < OLD_PROCESS_GRACE_S:
                    await clock.sleep(RETRY_S)
                    continue
            if self.before_live is not None:
                try:  # within what is left of start_timeout_s (a stalled re-registration must not hold it)
                    await self._within(self.before_live(replica_id, handle), max(0.0, deadline - clock.now()))
                except (ReplicaUnavailableError, NotReadyError) as e:
                    log.debug("replica %s not back yet: %s", replica_id, e)
                    await clock.sleep(RETRY_S)
                    continue
                except _CheckTimedOut:
                    return "its new process did not get its state back (before going live) within " \
                           "deployment.start_timeout_s"
            self.health[replica_id] = h
            m.generation += 1
            m.failures = 0
            log.info("replica %s is back", replica_id)
            self._transition(replica_id, m, ReplicaState.LIVE, "back")
            return None
        return "no new process within deployment.start_timeout_s"

    def _node_alive(self, handle: ReplicaHandle) -> bool:
        try:
            return self.backend.node_alive(handle.node.node_id)
        except Exception as e:  # noqa: BLE001 - unknown is not gone: keep waiting for the replica
            log.warning("could not ask whether node %s is alive: %s", handle.node.name, e)
            return True

    def _drop(self, replica_id: str, m: _Member, reason: str) -> None:
        """Remove a replica for good (its node is gone)."""
        del self._members[replica_id]
        self._dropped[replica_id] = reason
        try:
            m.handle.close()
        except Exception as e:  # noqa: BLE001
            log.debug("closing replica %s: %s", replica_id, e)
        self._transition(replica_id, m, ReplicaState.DROPPED, f"dropped: {reason}")
        log.error("replica %s dropped: %s; serving with %d replica(s): %s", replica_id, reason,
                  len(self._members), sorted(self._members))

    def _transition(self, replica_id: str, m: _Member, state: ReplicaState, what: str) -> None:
        if state != ReplicaState.LIVE and m.check is not None:
            # the process it asked may be gone: a check of it must neither hold back the next process's checks nor
            # make /readyz count the replica as not answering, nor outlive a dropped replica
            if m.check is not asyncio.current_task():
                m.check.cancel()
            m.check = m.check_since = None
        m.state = state
        self.events.append((time.time(), replica_id, what))
        self.observer.replica_event(replica_id, what.split(":")[0])
        if self.on_change is not None:
            self.on_change(replica_id, state, what)
