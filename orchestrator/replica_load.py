"""What the router knows of one replica: the work it has dispatched there and how fast that replica has been.

One ``ReplicaLoad`` per replica, created when the router first sees the replica and dropped once the replica has
left the deployment for good and nothing of it is outstanding. Everything the router tracks per replica lives
here, so a replica's books are one object rather than entries spread over parallel maps.

The estimates (``hang_limit``, ``partial_after``) are pure arithmetic on these books: no clock, no asyncio.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from zimage_common.messages import Batch

# A partial batch may go to a busy replica once its last outstanding batch is within this fraction of its
# expected end ...
LEAD = 0.25
# ... plus this many of the replica's recent encode times (see ``ReplicaLoad.partial_after``).
ENCODE_COVER = 2.0


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
    head_since: float = 0.0  # when the oldest outstanding batch started running (see ``returned``)
    last_used: int = -1  # id of the latest batch dispatched here (ties in the scheduler go to the longest idle)
    tokens: int = 0  # tokens of the outstanding batches
    images: int = 0  # images of the outstanding batches
    adapters: Counter = field(default_factory=Counter)  # LoRA adapter -> outstanding requests naming it
    loop_step: int = 0  # step-level batching: the latest loop step seen (metrics count each step once)
    rate: float | None = None  # seconds per unit of ``batch_work`` (moving average; None until one is timed)
    encode_s: float | None = None  # seconds of a batch's encodes (moving average; None until one is timed)
    leaving: bool = False  # left the deployment for good: dropped once nothing is outstanding
    # capacities derived from the books, by whoever asks (the dispatch policy), each with the inputs it was made
    # from; any change to the books clears them, so a loop pass reuses them instead of rebuilding one per replica
    cached: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    @property
    def outstanding(self) -> int:
        """Batches dispatched here and not yet returned."""
        return len(self.batches)

    # ---- the books -------------------------------------------------------------------------------------
    def dispatched(self, batch: Batch, now: float, count_adapters: bool = False) -> None:
        if not self.batches:
            self.head_since = now
        self.batches[batch.batch_id] = batch
        self.tokens += batch.tokens
        self.images += len(batch)
        if count_adapters:  # (read only where the adapters are limited)
            self.adapters.update(batch_adapters(batch))
        self.last_used = batch.batch_id
        self.cached.clear()

    def returned(self, batch: Batch, now: float) -> None:
        """Only the head's return starts the next batch; one behind it that came back first (it failed at once,
        its replica was lost) changes nothing about when the head started."""
        head = next(iter(self.batches), None)
        if self.batches.pop(batch.batch_id, None) is not None:
            self.tokens = max(0, self.tokens - batch.tokens)
            self.images = max(0, self.images - len(batch))
            if self.adapters:
                self.adapters -= batch_adapters(batch)  # (drops the adapters no request names now)
        if batch.batch_id == head:
            self.head_since = now
        self.cached.clear()

    def stepped(self, loop_step: int) -> bool:
        """Step-level batching: True the first time this replica's loop reports ``loop_step``."""
        if loop_step > self.loop_step:
            self.loop_step = loop_step
            return True
        return False

    # ---- the estimates ---------------------------------------------------------------------------------
    def observe(self, batch: Batch, seconds: float, encode_s: float = 0.0) -> None:
        """A batch finished here in ``seconds``, ``encode_s`` of them its prompts' and input images' encodes."""
        rate = seconds / max(1.0, batch_work(batch))
        self.rate = rate if self.rate is None else 0.8 * self.rate + 0.2 * rate
        if encode_s > 0:
            self.encode_s = encode_s if self.encode_s is None else 0.8 * self.encode_s + 0.2 * encode_s
        self.cached.clear()

    def expected(self, batch: Batch) -> float | None:
        """The batch's expected compute time on this replica, once one batch has been timed here."""
        return None if self.rate is None else self.rate * batch_work(batch)

    def encode_expected(self) -> float:
        """The replica's recent encode time per batch, its prompts' and any input images' (0 before one has been
        timed): the work a batch does before it needs the devices."""
        return 0.0 if self.encode_s is None else self.encode_s

    def hang_limit(self, batch: Batch, factor: float, floor: float, first: float) -> float:
        """How long the batch may run here before it counts as hung: ``factor`` times its expected time, never
        under ``floor``; ``first`` until a batch has been timed here."""
        if self.rate is None:
            return first
        return max(floor, factor * self.rate * batch_work(batch))

    def partial_after(self) -> float | None:
        """When this replica's dispatched work will be near enough its end to take a partial batch; None while
        nothing is outstanding or no batch has been timed here yet.

        The outstanding batches run one after another from when the head (the oldest) started, which is when the
        batch before it came back, or when it was dispatched to an idle replica; so the work ends at ``head start +
        sum(expected)``. A partial batch may go ``lead`` before that: ``LEAD`` of the last outstanding batch's
        expected time plus ``ENCODE_COVER`` times the replica's recent encode time. The batch sent then must be
        encoded before the devices come free: its encode runs beside the running batch, and there it takes several
        times its time alone and varies from batch to batch (H100, fp8, 1024^2, four prompts of 3-160 words:
        0.11-1.43 s, p50 0.46 s, against 0.11-0.14 s alone). With a quarter alone, batches of long prompts reached
        the replica too late and it stood idle 0.2 s a batch waiting for their encodes
        (docs/benchmarks-history.md)."""
        if not self.batches or self.rate is None:
            return None
        times = [self.rate * batch_work(b) for b in self.batches.values()]
        lead = LEAD * times[-1] + ENCODE_COVER * self.encode_expected()
        return self.head_since + sum(times) - lead
