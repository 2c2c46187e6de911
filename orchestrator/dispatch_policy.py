"""How the router hands work to replicas: requests join a replica's running step loop, within its room. The router
keeps up to ``STEP_QUEUE_DEPTH`` running sets' worth at each replica, so the next work is encoded and waiting there
when the loop has room; when waiting work joins a running set is the replica's decision, by the join policy each
call carries (``router.scheduling``). Capacities are cached on each ``ReplicaLoad`` until its books change."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from .replica_load import ReplicaLoad
from .scheduler import BatchScheduler, ReplicaCapacity

if TYPE_CHECKING:
    from zimage_common.config import RouterConfig

# The router keeps up to this many running sets' worth of requests (tokens and images) at a replica: its running set
# and what waits there, encoded, to join or to start the next set the moment there is room (a sample holds its room
# until its result is back, decode included: with only one set's worth the loop would run below its budget whenever
# samples decode).
STEP_QUEUE_DEPTH = 2


class Limits(Protocol):
    """A replica's plan limits, as the router's replica handle carries them."""

    replica_id: str
    max_pixels: int
    max_batch_tokens: int


class Dispatch:
    """Each live replica with room (``STEP_QUEUE_DEPTH`` running sets' worth of tokens and samples, less what it
    holds; its adapters within the scheduler's ``max_adapters``; one call within one set's budget) is a capacity.
    The oldest waiting request is never overtaken: a replica that could run it but has no room for it yet takes
    nothing new until it has. ``join``: the join policy every call carries (``RouterConfig.join_policy``)."""

    def __init__(self, config: RouterConfig, scheduler: BatchScheduler):
        self.config = config
        self.scheduler = scheduler
        self.join = config.join_policy()

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
        hit = load.cached.get("room")
        if hit is not None and hit[0] == key:
            return hit[1]
        room = None
        tokens = STEP_QUEUE_DEPTH * replica.max_batch_tokens - load.tokens
        images = STEP_QUEUE_DEPTH * max_batch_size - load.images
        if images > 0 and tokens > 0:
            # an idle replica takes any request it can run, even one over its budget or adapter limit (it runs
            # alone); a busy one, what joins its running set within its room
            busy = load.outstanding > 0
            room = ReplicaCapacity(
                replica.replica_id, replica.max_pixels,
                min(tokens, replica.max_batch_tokens) if busy else replica.max_batch_tokens,
                load.outstanding, load.last_used, min(images, max_batch_size),
                frozenset(load.adapters) if busy and limited else None)
        load.cached["room"] = (key, room)
        return room
