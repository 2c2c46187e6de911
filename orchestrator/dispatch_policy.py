"""How the router hands work to replicas: requests join a replica's running step loop, within its room. The router
keeps up to ``STEP_QUEUE_DEPTH`` running sets' worth at each replica, so the next work is encoded and waiting there
when the loop has room; when waiting work joins a running set is the replica's decision, by the join policy each
call carries (``router.scheduling``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from zimage_common.messages import INTERACTIVE

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
    nothing new until it has (``blocked``). ``join``: the join policy every call carries
    (``RouterConfig.join_policy``)."""

    def __init__(self, config: RouterConfig, scheduler: BatchScheduler):
        self.config = config
        self.scheduler = scheduler
        self.join = config.join_policy()

    def room(self, replica: Limits, load: ReplicaLoad) -> ReplicaCapacity | None:
        """The replica's room as its books stand, or None when it has none. The router keeps it with the free
        replicas and asks again only when the books change (a dispatch, a return)."""
        max_batch_size = self.config.max_batch_size
        depth_tokens = STEP_QUEUE_DEPTH * replica.max_batch_tokens
        depth_images = STEP_QUEUE_DEPTH * max_batch_size
        # Interactive work counts only the interactive work held here: the replica's loop runs its samples first and
        # parks a batch job's, so a replica full of job work still takes an interactive request at once (instead of
        # holding it until a job call returns). Job work counts everything held here (``job_room``).
        tokens = depth_tokens - (load.tokens - load.job_tokens)
        images = depth_images - (load.images - load.job_images)
        if images <= 0 or tokens <= 0:
            return None
        # an idle replica takes any request it can run, even one over its budget or adapter limit (it runs alone); a
        # busy one, what joins its running set within its room
        busy = load.outstanding > 0
        job_room = None
        if load.job_tokens or load.job_images:
            job_room = (max(0, min(depth_tokens - load.tokens, replica.max_batch_tokens)),
                        max(0, min(depth_images - load.images, max_batch_size)))
        return ReplicaCapacity(
            replica.replica_id, replica.max_pixels,
            min(tokens, replica.max_batch_tokens) if busy else replica.max_batch_tokens,
            load.outstanding, load.last_used, min(images, max_batch_size),
            frozenset(load.adapters) if busy and self.scheduler.max_adapters is not None else None,
            replica.max_batch_tokens, job_room)

    def blocked(self) -> Callable[[ReplicaCapacity], bool] | None:
        """Which free replicas take nothing in this pass: busy ones that could run the oldest waiting request by
        their plan but have no room for it now. None when nothing waits."""
        oldest = self.scheduler.oldest()
        if oldest is None:
            return None
        request, admits = oldest.request, self.scheduler.admits_as
        job = request.priority > INTERACTIVE  # oldest() is a job's only while no interactive request waits

        def blocked(room: ReplicaCapacity) -> bool:
            # a job's request is judged by the room job work has there, as it is scheduled: otherwise newer, smaller
            # job requests take what the oldest waits for, and a job's large images wait out their timeout
            return bool(room.outstanding) and request.pixels <= room.max_pixels \
                and request.tokens <= (room.limit_tokens or room.max_batch_tokens) and not admits(room, request, job)

        return blocked
