"""How the router hands work to replicas: whole batches, or requests joining a replica's running step loop.

Everything that differs between ``router.scheduling = "batch"`` and ``"step"`` is here, behind one small interface,
so the router itself never tests the mode:

- ``free``: the live replicas that may take work now, each as the capacity the scheduler fills;
- ``joinable``: whether a dispatched batch joins the replica's running loop (and streams a step at a time);
- ``cancels_running``: whether a dispatched request whose caller went away is taken out of its replica's loop.

Capacities are derived from each replica's ``ReplicaLoad`` and cached on it until its books change, so a loop pass
with nothing new builds none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from .replica_load import ReplicaLoad
from .scheduler import BatchScheduler, ReplicaCapacity

if TYPE_CHECKING:
    from zimage_common.config import RouterConfig

# Step-level batching: the router keeps up to this many running sets' worth of requests (tokens and images) at a
# replica: its running set and what waits there, encoded, to join or to start the next set the moment there is room
# (a sample holds its room until its result is back, decode included: with only one set's worth the loop would run
# below its budget whenever samples decode).
STEP_QUEUE_DEPTH = 2


class Limits(Protocol):
    """A replica's plan limits, as the router's replica handle carries them."""

    replica_id: str
    max_pixels: int
    max_batch_tokens: int


class DispatchPolicy(Protocol):
    name: str
    joinable: bool
    cancels_running: bool

    def free(self, replicas: Sequence[tuple[Limits, ReplicaLoad]]) -> list[ReplicaCapacity]: ...


class WholeBatches:
    """Each batch runs alone on its replica; a replica takes another while it has fewer than ``max_inflight``
    outstanding, a partial one only once its work nears its end (``ReplicaLoad.partial_after``)."""

    name = "batch"
    joinable = False
    cancels_running = False

    def __init__(self, max_inflight: int):
        self.max_inflight = max_inflight

    def free(self, replicas: Sequence[tuple[Limits, ReplicaLoad]]) -> list[ReplicaCapacity]:
        return [capacity(r, load) for r, load in replicas if load.outstanding < self.max_inflight]


def capacity(replica: Limits, load: ReplicaLoad) -> ReplicaCapacity:
    """The replica's capacity for a whole batch: its plan limits, its load and when it takes a partial batch."""
    key = (replica.max_pixels, replica.max_batch_tokens)
    hit = load.cached.get("batch")
    if hit is not None and hit[0] == key:
        return hit[1]
    c = ReplicaCapacity(replica.replica_id, replica.max_pixels, replica.max_batch_tokens, load.outstanding,
                        load.last_used, load.partial_after())
    load.cached["batch"] = (key, c)
    return c


class StepLoop:
    """Step-level batching: requests join a replica's running loop at its next step. Each live replica with room
    (``STEP_QUEUE_DEPTH`` running sets' worth of tokens and samples, less what it holds) is a capacity of that room
    (tokens, samples and distinct LoRA adapters left: what it holds names at most the scheduler's ``max_adapters``,
    the resident slots its memory plan counts; one call never exceeds one running set's budget). The oldest waiting
    request is never overtaken: a replica that could run it but has no room for it yet takes nothing new until it
    has (its running samples leave within their steps)."""

    name = "step"
    joinable = True
    cancels_running = True

    def __init__(self, config: RouterConfig, scheduler: BatchScheduler):
        self.config = config
        self.scheduler = scheduler

    def free(self, replicas: Sequence[tuple[Limits, ReplicaLoad]]) -> list[ReplicaCapacity]:
        oldest = self.scheduler.oldest()
        out = []
        for r, load in replicas:
            room = self._room(r, load)
            if room is None:
                continue
            if load.outstanding and oldest is not None and oldest.request.pixels <= r.max_pixels \
                    and oldest.request.tokens <= r.max_batch_tokens \
                    and not self.scheduler.admits(room, oldest.request):
                continue
            out.append(room)
        return out

    def _room(self, replica: Limits, load: ReplicaLoad) -> ReplicaCapacity | None:
        max_batch_size = self.config.max_batch_size
        limited = self.scheduler.max_adapters is not None
        key = (replica.max_pixels, replica.max_batch_tokens, max_batch_size, limited)
        hit = load.cached.get("step")
        if hit is not None and hit[0] == key:
            return hit[1]
        room = None
        tokens = STEP_QUEUE_DEPTH * replica.max_batch_tokens - load.tokens
        images = STEP_QUEUE_DEPTH * max_batch_size - load.images
        if images > 0 and tokens > 0:
            # an idle replica takes any request it can run, even one over its budget or adapter limit (it runs
            # alone); a busy one, what joins its running set within its room. partial_after (whole-batch mode's
            # wait for a busy replica's batch to near its end) does not apply: work joins a running loop at its
            # next step
            busy = load.outstanding > 0
            room = ReplicaCapacity(
                replica.replica_id, replica.max_pixels,
                min(tokens, replica.max_batch_tokens) if busy else replica.max_batch_tokens,
                load.outstanding, load.last_used, None, min(images, max_batch_size),
                frozenset(load.adapters) if busy and limited else None)
        load.cached["step"] = (key, room)
        return room


def policy(scheduling: str, config: RouterConfig, scheduler: BatchScheduler, max_inflight: int) -> DispatchPolicy:
    """The policy for ``router.scheduling``."""
    if scheduling == "step":
        return StepLoop(config, scheduler)
    if scheduling == "batch":
        return WholeBatches(max_inflight)
    raise ValueError(f"unknown router.scheduling {scheduling!r} (batch or step)")
