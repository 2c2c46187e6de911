"""What a step of the loop costs, measured by the loop itself, and whether a join pays by that measure.

Joining a running set is never free: every running sample's steps slow down. Whether it pays depends on how a step's
time grows with the set, which depends on the card, the precision, compilation and the sizes in the set; a fixed
rule (``config.JoinPolicy``'s token and step thresholds) is right on one card and wrong on another. So the loop times
its own steps (``StepTimer``: CUDA events read when they complete, never a host sync; wall time on the CPU) and keeps,
per amount of work in a step, the recent step times (``StepCosts``). A step's work is its samples' transformer FLOPs in
units of one token's linear layers: ``sum(L + L^2 / attn_tokens)`` over the samples' packed lengths ``L``, where
``attn_tokens`` is the length at which a sample's attention costs as much as its linear layers (the model's shape
gives it: a block's parameters over twice its width).

``pays(stepping, joiner)`` compares the sum of the completion times of the running samples and the joiner, counted in
steps at the measured costs, in two futures: the joiner steps with them from now on, or it waits until they are all
done and then runs alone (what a running set that takes no newcomer does). It joins where the first sum is smaller:
the join's gain to the joiner outweighs what it costs every running sample. Where the costs of some set in either
future are not known (not measured near that work yet), it answers None and the loop falls back on ``JoinPolicy``'s
rules.

``Pace`` is the loop's pace for its log (step times by running-set size, every ``PACE_LOG_S``).
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections import deque
from collections.abc import Sequence

log = logging.getLogger("actors.steploop")

BUCKETS_PER_DOUBLING = 8  # work is bucketed on a log scale: neighbours differ by about 9%
KEEP = 8  # recent step times kept per bucket; the estimate is their minimum (a step only gets slower by outside
# causes: a compile, an encode sharing the GPU, a preview decode)
PENDING_MAX = 64  # timed steps whose events have not completed yet, at most (older ones are dropped)


def work(lengths: Sequence[int], attn_tokens: float) -> float:
    """A step's work (see the module's docstring)."""
    return float(sum(n + n * n / attn_tokens for n in lengths))


class StepCosts:
    """Recent step times by work, and the join decision they support."""

    def __init__(self, attn_tokens: float):
        self.attn_tokens = float(attn_tokens)
        self._times: dict[int, deque[float]] = {}
        self._keys: list[int] = []  # sorted buckets with times

    def _bucket(self, w: float) -> int:
        return round(math.log2(max(w, 1.0)) * BUCKETS_PER_DOUBLING)

    @staticmethod
    def _center(b: int) -> float:
        return 2.0 ** (b / BUCKETS_PER_DOUBLING)

    def observe(self, w: float, seconds: float) -> None:
        b = self._bucket(w)
        if b not in self._times:
            self._times[b] = deque(maxlen=KEEP)
            bisect.insort(self._keys, b)
        self._times[b].append(seconds)

    def estimate(self, w: float) -> float | None:
        """Seconds a step of work ``w`` takes: the measured bucket's; else interpolated between the nearest measured
        buckets around it; below every measured one, the smallest one's if that is at most twice the work (a smaller
        step is no slower); else unknown (None): above every measured bucket nothing says how much batching gains, and
        the loop's rules decide (their joins then measure it)."""
        b = self._bucket(w)
        if b in self._times:
            return min(self._times[b])
        i = bisect.bisect_left(self._keys, b)
        if 0 < i < len(self._keys):
            lo, hi = self._keys[i - 1], self._keys[i]
            clo, chi = min(self._times[lo]), min(self._times[hi])
            wlo, whi = self._center(lo), self._center(hi)
            return clo + (chi - clo) * (w - wlo) / (whi - wlo)
        if i == 0 and self._keys and self._center(self._keys[0]) <= 2 * w:
            return min(self._times[self._keys[0]])
        return None

    def timeline(self, samples: Sequence[tuple[Sequence[int], int]]) -> tuple[float, float] | None:
        """``samples`` ((packed lengths of its passes, steps left)) all stepping together from now, leaving as they
        finish: the sum of the seconds until each is done, and the seconds until the last is; None where a set's cost
        is unknown."""
        left = sorted(samples, key=lambda s: s[1])
        t = total = 0.0
        done = 0
        while left:
            c = self.estimate(work([n for lengths, _ in left for n in lengths], self.attn_tokens))
            if c is None:
                return None
            t += (left[0][1] - done) * c
            done = left[0][1]
            total += t * sum(1 for s in left if s[1] == done)
            left = [s for s in left if s[1] > done]
        return total, t

    def pays(self, stepping: Sequence[tuple[Sequence[int], int]], joiner: tuple[Sequence[int], int]) -> bool | None:
        """Whether ``joiner`` ((packed lengths of its passes, steps left)) joining the ``stepping`` samples now lowers
        the sum of their completion times against waiting until they are all done and then running alone; None where
        a cost is unknown."""
        joined, running = self.timeline([*stepping, joiner]), self.timeline(stepping)
        alone = self.estimate(work(joiner[0], self.attn_tokens))
        if joined is None or running is None or alone is None:
            return None
        total, end = running
        return joined[0] < total + end + joiner[1] * alone


def step_costs(engine) -> StepCosts | None:
    """The engine's step costs, made on first use; None for an engine without a transformer's shape (fakes). A
    block's linear layers are about 12 x dim^2 parameters (attention's four projections, the 8/3 x dim feed-forward's
    three), 24 x dim^2 FLOPs a token, against 4 x dim FLOPs a token per token of its attention: equal at 6 x dim."""
    costs = getattr(engine, "step_costs", None)
    if costs is None:
        dim = getattr(getattr(getattr(engine, "transformer", None), "config", None), "dim", None)
        if not isinstance(dim, int):
            return None
        costs = engine.step_costs = StepCosts(6 * dim)
    return costs


class StepTimer:
    """Times each step of the loop without stalling it: on a GPU, a pair of CUDA events around the step, read once
    they have completed (``poll``); on the CPU the step is synchronous, so its wall time."""

    def __init__(self, costs: StepCosts, device=None, clock=time.perf_counter):
        self.costs = costs
        self.clock = clock
        self.cuda = device is not None and getattr(device, "type", str(device)) == "cuda"
        self.device = device
        self._pending: deque = deque()
        self._open: tuple | None = None

    def start(self, w: float) -> None:
        if self.cuda:
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            self._open = (w, ev)
        else:
            self._open = (w, self.clock())

    def stop(self) -> None:
        if self._open is None:
            return
        w, begin = self._open
        self._open = None
        if self.cuda:
            import torch

            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(self.device))
            self._pending.append((w, begin, end))
            if len(self._pending) > PENDING_MAX:
                self._pending.popleft()
            self.poll()
        else:
            self.costs.observe(w, self.clock() - begin)

    def abandon(self) -> None:
        """The step failed: its time says nothing about its work."""
        self._open = None

    def poll(self) -> None:
        while self._pending and self._pending[0][2].query():
            w, begin, end = self._pending.popleft()
            self.costs.observe(w, begin.elapsed_time(end) / 1000.0)


PACE_LOG_S = 30.0  # how often the loop logs its pace


class Pace:
    """The loop's pace for its log, by running-set size: the time from one step's start to the next one's (over many
    steps the GPU's step time: the launch queue bounds how far the loop runs ahead), not counting a step after an
    idle spell; and the samples that joined and waited."""

    def __init__(self, name: str, clock=time.perf_counter):
        self.name = name
        self.clock = clock
        self._reset(clock())
        self._prev: tuple[float, int] | None = None  # (start, running) of the step before

    def _reset(self, now: float) -> None:
        self.since = now
        self.by_size: dict[int, list[float]] = {}  # running samples -> [steps, seconds, tokens]
        self.joined = 0
        self.waiting_max = 0

    def idle(self) -> None:
        self._prev = None

    def step(self, running: int, tokens: int, joined: int, waiting: int) -> None:
        now = self.clock()
        if self._prev is not None:
            start, n = self._prev
            row = self.by_size.setdefault(n, [0, 0.0, 0])
            row[0] += 1
            row[1] += now - start
        self._prev = (now, running)
        self.by_size.setdefault(running, [0, 0.0, 0])[2] = tokens
        self.joined += joined
        self.waiting_max = max(self.waiting_max, waiting)
        if now - self.since >= PACE_LOG_S:
            log.info("%s: %s; joined %d, waiting at most %d", self.name, self.summary(), self.joined,
                     self.waiting_max)
            self._reset(now)

    def summary(self) -> str:
        return ", ".join(f"{n} running ({int(r[2])} tokens): {int(r[0])} steps of {r[1] / r[0]:.3f}s"
                         for n, r in sorted(self.by_size.items()) if r[0]) or "no steps"
