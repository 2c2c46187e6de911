"""What the router knows of one replica: the work dispatched there and how fast it has been. One ``ReplicaLoad`` per
replica, created on first sight and dropped once the replica has left for good with nothing outstanding; its estimate
(``hang_limit``) is pure arithmetic, no clock."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from zimage_common.messages import Batch


def batch_work(batch: Batch) -> float:
    """A batch's work in the unit the replica's rate is learned in: tokens x steps."""
    return batch.tokens * batch.key.num_inference_steps


def batch_adapters(batch: Batch) -> Counter:
    """The LoRA adapters a batch names, each counted once per request naming it."""
    return Counter(name for r in batch.requests for name in r.adapter_names)


@dataclass(eq=False)
class ReplicaLoad:
    replica_id: str
    batches: dict[int, Batch] = field(default_factory=dict)  # outstanding batches by id, in dispatch order
    last_used: int = -1  # id of the latest batch dispatched here (ties in the scheduler go to the longest idle)
    tokens: int = 0  # tokens of the outstanding batches
    images: int = 0  # images of the outstanding batches
    job_tokens: int = 0  # of those, batch-job work's (its loop runs interactive samples first: dispatch_policy.room)
    job_images: int = 0
    adapters: Counter = field(default_factory=Counter)  # LoRA adapter -> outstanding requests naming it
    loop_step: int = 0  # the latest step of its loop seen (metrics count each step once)
    rate: float | None = None  # seconds per unit of ``batch_work`` (moving average; None until one is timed)
    leaving: bool = False  # left the deployment for good: dropped once nothing is outstanding
    beats: set = field(default_factory=set)  # the hang clocks of its batches in flight (router._run_watched)

    @property
    def outstanding(self) -> int:
        """Batches dispatched here and not yet returned."""
        return len(self.batches)

    # ---- the books -------------------------------------------------------------------------------------
    def dispatched(self, batch: Batch, count_adapters: bool = False) -> None:
        self.batches[batch.batch_id] = batch
        self.tokens += batch.tokens
        self.images += len(batch)
        if batch.is_job:
            self.job_tokens += batch.tokens
            self.job_images += len(batch)
        if count_adapters:  # (read only where the adapters are limited)
            self.adapters.update(batch_adapters(batch))
        self.last_used = batch.batch_id

    def returned(self, batch: Batch) -> None:
        if self.batches.pop(batch.batch_id, None) is not None:
            self.tokens = max(0, self.tokens - batch.tokens)
            self.images = max(0, self.images - len(batch))
            if batch.is_job:
                self.job_tokens = max(0, self.job_tokens - batch.tokens)
                self.job_images = max(0, self.job_images - len(batch))
            if self.adapters:
                self.adapters -= batch_adapters(batch)  # (drops the adapters no request names now)

    def stepped(self, loop_step: int) -> bool:
        """True the first time this replica's loop reports ``loop_step``."""
        if loop_step > self.loop_step:
            self.loop_step = loop_step
            return True
        return False

    # ---- the estimates ---------------------------------------------------------------------------------
    def observe(self, batch: Batch, seconds: float) -> None:
        """A batch finished here in ``seconds``."""
        rate = seconds / max(1.0, batch_work(batch))
        self.rate = rate if self.rate is None else 0.8 * self.rate + 0.2 * rate

    def hang_limit(self, batch: Batch, factor: float, floor: float, first: float) -> float:
        """How long the batch may run here (between two of its steps) before it counts as hung: ``factor`` times its
        expected time, never under ``floor``; ``first`` until a batch has been timed here."""
        if self.rate is None:
            return first
        return max(floor, factor * self.rate * batch_work(batch))
