"""Step-level continuous batching: one denoising loop per replica over a changing set of running samples.

Whole-batch serving (``ZImageEngine.generate``) runs a batch from encode to decode; a request that arrives one step
after a batch started waits for all of it. Here a replica keeps one loop; each *call* (a group of requests the
router handed over, ``Batch.joinable``) encodes in its own thread, hands its samples to the loop, and waits; the
samples **join at the next step**, run their own steps, **leave when done** (their caller decodes them while the loop
goes on). Every sample carries its own state, so samples of any step count, size, guidance and progress share a
step:

- ``RunningSample.step`` / ``num_steps`` / ``start``: its own step index over its own schedule; ``start`` > 0 begins
  part-way (image-to-image: ``strength`` picks the start step, the caller puts the noised image latents in
  ``latents`` and calls ``scheduler.set_begin_index(start)``, which ``RunningSample.create`` does);
- ``RunningSample.scheduler``: its own flow-matching scheduler (``mu`` depends on its token count);
- ``RunningSample.after_step``: called after each of its steps with the sample (inpainting: blend the known
  region back into ``latents`` from the original image latents noised to the next sigma);
- guidance > 0: its negative pass rides in the same packed call;
- ``RunningSample.control`` / ``control_scale``: ControlNet hints (a running set with any runs
  ``actors.controlnet.controlled_forward``, the others with zero hints at scale 0, as in ``ZImageEngine.denoise``).

The math per sample is ``ZImageEngine.denoise``'s, so an image depends only on its own request: the packed
transformer keeps samples apart (``actors/packed.py``), noise comes from the request's own seed, and
``tests/test_steploop.py`` checks a request that joined a running loop against its solo run.

The packed layout is rebuilt only when the running set changes (a join or a leave), not at every step; the compiled
blocks are dynamic in the token count and the number of samples, so a membership change never recompiles.

Admission is first come first served within the replica's token budget, sample count and LoRA residency (the
running set names at most ``max_adapters`` distinct adapters, the resident slots the memory plan counts; the router
keeps within all three too; these are the replica's own guard). The head of the queue always joins an empty set,
and whatever waits with it starts with it. A running set that has already run steps takes the head only where
joining pays (``messages.JoinPolicy``: the GPU is not saturated yet, the set has run at most a step or so, or the
head's work is small against every running sample's): each join slows every running sample's steps, and at sizes
that saturate the GPU (1024x1024 on an H100: 0.098 s a step alone, 0.39 s for four) joining everything at once is
processor sharing, which with equal service times has a worse mean latency than running sets one after another.
(On one H100 this scheduling's mean latency is at or below whole-batch scheduling's at 50, 80 and 95% load,
1024x1024 and mixed sizes alike, since each stage runs on its warmed thread: docs/benchmarks-history.md.) The
router keeps up to two sets' worth waiting at the replica (``router.STEP_QUEUE_DEPTH``), encoded, so room is filled
at the next step.
Cancellation (``cancel``) takes request ids; a name not in the loop yet is kept for ``CANCEL_KEEP_S`` seconds, so a
cancel that arrives just before its call is submitted still takes it out. Faults: an out-of-memory step shrinks the
running set (the newest half goes back to wait, and the token budget is lowered until ``OOM_CAP_STEPS`` clean steps
pass) and retries; a lone sample that does not fit fails its call with ``out_of_memory``. Any other error in a step
is isolated: each call's samples run that step alone, and only the calls whose solo step fails are failed
(``replica_error``, which the router bisects), so one request's failure never fails another's; a solo re-run that
runs out of memory shrinks as above instead of failing its call. A failed step may have advanced some samples
before it failed (the per-sample updates run one after another): every running sample's state (step index,
latents, scheduler index) is put back to what it was before the step, so no sample is ever advanced twice.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from zimage_common.messages import JoinPolicy

from .controlnet import PackedControl, forward
from .engine import velocity
from .stages import run_here

log = logging.getLogger(__name__)

OOM_CAP_STEPS = 50  # clean steps after an out-of-memory shrink before the lowered token budget is lifted
CANCEL_KEEP_S = 300.0  # how long a cancelled name not (yet) in the loop is kept for a call submitted after it


@dataclass(eq=False)
class RunningSample:
    """One sample's denoising state in the loop."""

    name: str  # the request id (log lines, cancellation)
    tokens: int  # what it costs in the replica's token budget (``ImageRequest.tokens``)
    latents: torch.Tensor  # [C, h, w] float32 on the transformer's device
    positive: torch.Tensor  # caption embedding [L, D]
    negative: torch.Tensor | None  # the negative caption's, when guidance > 0
    guidance: float
    scheduler: object  # its own FlowMatchEulerDiscreteScheduler
    num_steps: int
    start: int = 0  # first step it runs (image-to-image starts part-way)
    after_step: Callable[[RunningSample], None] | None = None  # e.g. the inpainting mask blend
    loras: tuple = ()  # (adapter, scale) pairs: per-request LoRA (actors/lora.py), its negative pass's too
    control: torch.Tensor | None = None  # ControlNet input [C, 1, h, w] (actors/conditioning.encode_controls)
    control_scale: float = 0.0  # its conditioning scale (its negative pass uses the same hints, as in denoise)
    step: int = 0  # the next step it runs
    cancelled: bool = False  # its request's caller went away: it left the loop early
    pred: torch.Tensor | None = None  # its last velocity estimate (for the clean-latent estimate)
    sigma_next: torch.Tensor | None = None  # its sigma after its last step
    group: Group | None = field(default=None, repr=False)

    @classmethod
    def create(cls, engine, name: str, tokens: int, latents: torch.Tensor, positive: torch.Tensor,
               negative: torch.Tensor | None, guidance: float, num_steps: int, start: int = 0,
               after_step=None, loras=(), control: torch.Tensor | None = None,
               control_scale: float = 0.0) -> RunningSample:
        device = engine.devices["transformer"]
        latents = latents.to(device)
        (scheduler,) = engine._schedulers([latents], num_steps, device)
        if start:
            scheduler.set_begin_index(start)
        return cls(name, tokens, latents, positive.to(device, non_blocking=True),
                   None if negative is None else negative.to(device, non_blocking=True), float(guidance),
                   scheduler, num_steps, start, after_step, tuple(loras),
                   None if control is None else control.to(device), float(control_scale), step=start)

    @property
    def done(self) -> bool:
        return self.step >= self.num_steps

    @property
    def progress(self) -> tuple[int, int]:
        """(steps run, steps it runs in all), counted from its start step."""
        return self.step - self.start, self.num_steps - self.start

    def work(self) -> int:
        """What it has left to run: tokens x steps (the join policy's measure)."""
        return self.tokens * max(self.num_steps - self.step, 0)

    def adapters(self) -> set[str]:
        return {name for name, _ in self.loras}

    def estimate(self) -> torch.Tensor:
        """Its current estimate of the clean latents (exact after its last step, where sigma_next = 0)."""
        if self.pred is None:
            return self.latents
        return self.latents - self.sigma_next.to(self.latents.device, torch.float32) * self.pred


class Group:
    """The samples of one call: they join together, and the call is answered when all of them are done (or failed).
    ``on_step(step, total, denoised)`` is the engine's per-step hook (progress, previews, final check)."""

    def __init__(self, samples: list[RunningSample], on_step=None):
        self.samples = samples
        self.on_step = on_step
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.joined_at: float | None = None  # perf_counter when its samples first ran a step
        self.finished_at: float | None = None
        self._reported = 0
        for s in samples:
            s.group = self

    @property
    def finished(self) -> bool:
        return self.error is not None or all(s.done for s in self.samples)

    def report(self) -> None:
        """Call ``on_step`` when the slowest of its samples has moved on (so each step is reported once)."""
        if self.on_step is None:
            return
        live = [s for s in self.samples if not s.cancelled]
        if not live:
            return
        done = min(s.progress[0] for s in live)
        if done > self._reported:
            self._reported = done
            total = max(s.progress[1] for s in live)
            self.on_step(done, total, lambda: [s.estimate() for s in self.samples])


@dataclass
class LoopStats:
    steps: int = 0  # loop steps run
    joins: int = 0  # samples that joined, in all
    last_joined: int = 0  # samples that joined at the latest step
    running: int = 0  # samples in the latest step
    waiting: int = 0  # samples handed over and not yet running
    oom_shrinks: int = 0
    isolated_failures: int = 0  # steps that failed as a whole and were re-run per call


class StepLoop:
    """The loop. ``submit(group)`` hands a call's samples over (they join at the next step); the caller waits on
    ``group.done``. The loop thread starts on the first submit and idles (no GPU work) while nothing runs.

    ``run(fn)`` runs each step (the worker's device lock, and its denoise stage's thread and stream: cuDNN's plans
    are cached per thread, ``actors/stages.py``); ``fault(names)`` (tests) may raise
    before a step, given the running samples' names."""

    def __init__(self, engine, max_tokens: int | None = None, max_samples: int | None = None,
                 run: Callable[[Callable[[], Any]], Any] | None = None, name: str = "step-loop",
                 max_adapters: int | None = None, policy: JoinPolicy | None = None):
        self.engine = engine
        self.policy = policy or JoinPolicy()
        self.max_tokens = max_tokens
        self.max_samples = max_samples
        # distinct LoRA adapters the running set may name (the replica's resident slots); None: the engine's
        # LoRA store's max_resident, no limit without one
        if max_adapters is None:
            max_adapters = getattr(getattr(engine, "loras", None), "max_resident", None)
        self.max_adapters = max_adapters
        self.run = run or functools.partial(run_here, "denoise")
        self.fault: Callable[[list[str]], None] | None = None
        self.stats = LoopStats()
        self.on_step_done: Callable[[LoopStats], None] | None = None
        self._name = name
        self._cond = threading.Condition()
        self._waiting: deque[RunningSample] = deque()
        self._running: list[RunningSample] = []
        self._cancelled: dict[str, float] = {}  # request id -> when its cancel came (names not found yet wait)
        self.clock: Callable[[], float] = time.monotonic  # for CANCEL_KEEP_S (tests pass a manual one)
        self._groups: list[Group] = []  # calls not answered yet
        self._thread: threading.Thread | None = None
        self._layout_key: tuple | None = None
        self._layout = None
        self._embeds = None
        self._control = None  # the running set's ControlNet input (``_packed_control``), rebuilt with the layout
        self._oom_cap: int | None = None
        self._clean_steps = 0
        self._pace = _Pace(name)  # step times by running-set size, logged every PACE_LOG_S

    # ---- the callers' side ---------------------------------------------------------------------------------
    def submit(self, group: Group) -> Group:
        with self._cond:
            self._waiting.extend(group.samples)
            self._groups.append(group)
            self.stats.waiting = len(self._waiting)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return group

    def cancel(self, names: set[str]) -> None:
        """Samples of these requests leave at the next step (their call is answered with what is left)."""
        with self._cond:
            now = self.clock()
            for n in names:
                self._cancelled.setdefault(n, now)
            self._cond.notify_all()

    @property
    def running(self) -> int:
        return len(self._running)

    # ---- the loop --------------------------------------------------------------------------------------------
    def _budget(self) -> int | None:
        caps = [c for c in (self.max_tokens, self._oom_cap) if c is not None]
        return min(caps) if caps else None

    def _admit(self) -> int:
        """Move waiting samples into the running set, first come first served, within the budget, the sample cap
        and the adapter limit (distinct LoRA adapters named by the running set); the head always joins an empty set
        (so a sample over the budget still runs, alone), and what waits with it starts with it. A running set that
        has already run steps takes the head only where the join policy (``JoinPolicy``) says joining pays."""
        if not self._waiting:
            return 0
        joined = 0
        budget = self._budget()
        tokens = sum(s.tokens for s in self._running)
        adapters = set().union(*(s.adapters() for s in self._running))
        started = [s for s in self._running if s.step > s.start]  # those that already ran a step
        while self._waiting:
            s = self._waiting[0]
            if self._running:
                if self.max_samples is not None and len(self._running) >= self.max_samples:
                    break
                if budget is not None and tokens + s.tokens > budget:
                    break
                if self.max_adapters is not None and len(adapters | s.adapters()) > self.max_adapters:
                    break
                if started and not self._pays(s, tokens, started):
                    break
            self._waiting.popleft()
            self._running.append(s)
            tokens += s.tokens
            adapters |= s.adapters()
            joined += 1
        return joined

    def _pays(self, s: RunningSample, tokens: int, started: list[RunningSample]) -> bool:
        """Whether ``s`` joins a running set (``tokens`` in all) whose ``started`` samples already ran steps."""
        p = self.policy
        if tokens + s.tokens <= p.free_tokens:
            return True
        if all(r.step - r.start <= p.window for r in started):
            return True
        return s.work() <= p.short_ratio * min(r.work() for r in started)

    def _drop_cancelled(self) -> None:
        """Cancelled samples leave; a cancelled name not found (its call is not submitted yet) is kept for
        ``CANCEL_KEEP_S``, so a cancel that overtakes its call still applies. Under ``_cond``."""
        if not self._cancelled:
            return
        now = self.clock()
        self._cancelled = {n: t for n, t in self._cancelled.items() if now - t < CANCEL_KEEP_S}
        for s in [s for s in list(self._waiting) + self._running if s.name in self._cancelled]:
            s.cancelled = True
            s.step = s.num_steps  # leaves at once; the rest of its call runs on
            self._cancelled.pop(s.name, None)
        self._waiting = deque(s for s in self._waiting if not s.cancelled)

    def _loop(self) -> None:
        while True:
            try:
                self._iteration()
            except BaseException as e:  # noqa: BLE001 - a bug here must fail the calls in, not leave them waiting
                log.exception("step loop: unexpected error; failing the calls in the loop")
                with self._cond:
                    for g in self._groups:
                        g.error = g.error or e
                    self._retire()

    def _iteration(self) -> None:
        with self._cond:
            self._drop_cancelled()
            self._retire()
            while not self._running and not self._waiting:
                self._pace.idle()
                # nothing runs: let the last set's layout, captions and inputs go
                self._layout_key = self._layout = self._embeds = self._control = None
                self._cond.wait()
                self._drop_cancelled()
                self._retire()
            joined = self._admit()
            running = list(self._running)
            self.stats.waiting = len(self._waiting)
        if not running:
            return
        self._pace.step(len(running), sum(s.tokens for s in running), joined, len(self._waiting))
        now = time.perf_counter()
        for s in running:
            if s.group.joined_at is None:
                s.group.joined_at = now
        self.stats.joins += joined
        self.stats.last_joined = joined
        self.stats.running = len(running)
        self.stats.steps += 1  # (before the step: its hooks' progress events carry its own count)
        self._run_step(running)
        if self.on_step_done is not None:
            self.on_step_done(self.stats)

    @staticmethod
    def _report(groups: list[Group]) -> None:
        for g in groups:
            if g.error is None:
                try:
                    g.report()
                except Exception as e:  # noqa: BLE001 - a hook's failure fails its call, not the loop
                    log.exception("step hook of a call failed")
                    g.error = e

    def _retire(self) -> None:
        """Remove finished and failed samples; answer the calls that are complete. Under ``_cond``."""
        self._running = [s for s in self._running if not s.done and s.group.error is None]
        self._waiting = deque(s for s in self._waiting if s.group.error is None)
        for g in self._groups:
            if g.finished:
                g.finished_at = time.perf_counter()
                g.done.set()
        self._groups = [g for g in self._groups if not g.done.is_set()]

    def _run_step(self, running: list[RunningSample]) -> None:
        e = self._attempt(running)
        if e is None:
            self._clean_steps += 1
            if self._oom_cap is not None and self._clean_steps >= OOM_CAP_STEPS:
                log.info("step loop: %d clean steps since the out-of-memory shrink; token budget restored",
                         self._clean_steps)
                self._oom_cap = None
            return
        self._layout_key = None
        if _is_oom(e):
            _free_cuda_cache()
            self._shrink(running, e)
        else:
            self._isolate(running, e)

    def _attempt(self, samples: list[RunningSample]) -> Exception | None:
        """One step of ``samples`` under the guard; the error if it failed, after putting every sample back to its
        state before the step (the per-sample updates run one after another: a step that fails part-way has
        advanced some of them), so a retry runs the step once."""
        saved = [_Saved.of(s) for s in samples]

        def step() -> None:
            if self.fault is not None:
                self.fault([s.name for s in samples])
            self._step(samples)
            if any(s.done for s in samples):  # their callers decode on other streams: hand over finished work
                _sync(self.engine.devices["transformer"])
            # the calls' hooks read the step's results on the step's thread and stream, in the same trip (a hook's
            # failure fails its call, not the step)
            self._report(list(dict.fromkeys(s.group for s in samples)))

        try:
            self.run(step)
        except Exception as e:  # noqa: BLE001 - every failure becomes a shrink or a failed call
            for x in saved:
                x.restore()
            return e
        return None

    def _shrink(self, running: list[RunningSample], e: BaseException) -> None:
        self.stats.oom_shrinks += 1
        self._clean_steps = 0
        if len(running) == 1:
            log.warning("step loop: %s alone does not fit (%s)", running[0].name, e)
            running[0].group.error = e
            return
        keep = running[: len(running) // 2]  # the oldest half stays; the newest waits for room
        back = running[len(keep):]
        with self._cond:
            self._running = [s for s in self._running if s not in back]
            self._waiting.extendleft(reversed(back))
            self._oom_cap = sum(s.tokens for s in keep)
        log.warning("step loop: out of memory with %d samples (%s); running %d, token budget lowered to %d",
                    len(running), e, len(keep), self._oom_cap)

    def _isolate(self, running: list[RunningSample], e: BaseException) -> None:
        """A step failed as a whole: run it again per call, so only the calls whose own step fails are failed."""
        groups = list(dict.fromkeys(s.group for s in running))
        if len(groups) == 1:
            log.error("step loop: a step of one call failed: %s", e)
            groups[0].error = e
            return
        self.stats.isolated_failures += 1
        log.warning("step loop: a step of %d calls failed (%s); re-running it per call", len(groups), e)
        for g in groups:
            mine = [s for s in running if s.group is g]
            e2 = self._attempt(mine)
            if e2 is not None:
                if _is_oom(e2):  # memory, not this call's fault: shrink as any out-of-memory step (a lone sample
                    _free_cuda_cache()  # that does not fit fails with out_of_memory); they run this step later
                    self._shrink(mine, e2)
                else:
                    log.error("step loop: the call of %s failed alone: %s", [s.name for s in mine], e2)
                    g.error = e2
            self._layout_key = None

    @torch.no_grad()
    def _step(self, running: list[RunningSample]) -> None:
        """One packed transformer call for every running sample (and the negative pass of each with guidance), then
        each sample's own Euler step: ``ZImageEngine.denoise``'s math, one step, per-sample indices."""
        packed = self.engine.packed
        cfg = [k for k, s in enumerate(running) if s.guidance > 0]
        order = list(range(len(running))) + cfg  # the call's samples: every sample, then the negative passes
        key = tuple(running)  # the samples themselves (compared by identity): an id() could be a finished one's
        if key != self._layout_key:  # membership changed: shapes, captions and their cache change with it
            shapes = [(1, s.latents.shape[-2], s.latents.shape[-1]) for s in running]
            lens = [len(s.positive) for s in running] + [len(running[k].negative) for k in cfg]
            self._layout = packed.layout(shapes + [shapes[k] for k in cfg], lens)
            self._embeds = [s.positive for s in running] + [running[k].negative for k in cfg]
            self._layout_key = key
            if any(s.loras for s in running):  # the adapters of the running set, stacked once per membership
                self._layout.lora = self.engine.lora_batch([running[j].loras for j in order])
            self._control = PackedControl.build(self.engine.controlnet, [running[j].control for j in order],
                                                [running[j].control_scale for j in order],
                                                [running[j].latents.shape[-2:] for j in order],
                                                self.engine.devices["transformer"], self.engine.transformer.dtype)
        t = torch.stack([s.scheduler.timesteps[s.step] for s in running])
        t_in = ((1000 - t) / 1000)[order] if cfg else (1000 - t) / 1000
        dtype = self.engine.transformer.dtype
        x = [s.latents.to(dtype).unsqueeze(1) for s in running]
        x += [x[k] for k in cfg]  # the negative passes' inputs: the same tensors
        out = forward(packed, x, t_in, self._embeds, self._layout, self._control)
        negative_of = {j: len(running) + k for k, j in enumerate(cfg)}
        for j, s in enumerate(running):
            pred = velocity(out, j, s.guidance, negative_of.get(j))
            s.latents = s.scheduler.step(pred.unsqueeze(0), t[j], s.latents.unsqueeze(0), return_dict=False)[0][0]
            s.pred = pred
            s.sigma_next = s.scheduler.sigmas[s.step + 1]
            s.step += 1
            if s.after_step is not None:
                s.after_step(s)


PACE_LOG_S = 30.0  # how often the loop logs its pace


class _Pace:
    """The loop's pace for its log: the time from one step's start to the next one's (the loop runs at most a step or
    two ahead of the GPU, so over many steps this is the GPU's step time), by running-set size, and the samples that
    joined and waited. Steps after the loop idled are not counted (their start waited for work, not the GPU)."""

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


@dataclass
class _Saved:
    """A sample's state before a step (``_step`` updates the samples one after another: a step that fails part-way
    has advanced some of them)."""

    sample: RunningSample
    step: int
    latents: torch.Tensor  # the tensor itself: a step replaces ``latents``, it never writes into the old one
    pred: torch.Tensor | None
    sigma_next: torch.Tensor | None
    scheduler_index: int | None

    @classmethod
    def of(cls, s: RunningSample) -> _Saved:
        return cls(s, s.step, s.latents, s.pred, s.sigma_next, getattr(s.scheduler, "_step_index", None))

    def restore(self) -> None:
        s = self.sample
        if s.cancelled:  # it left meanwhile (``step`` = ``num_steps``): it stays out
            return
        s.step, s.latents, s.pred, s.sigma_next = self.step, self.latents, self.pred, self.sigma_next
        if hasattr(s.scheduler, "_step_index"):
            s.scheduler._step_index = self.scheduler_index


class CancelledSample(Exception):
    """Every sample of a call left the loop because their requests were cancelled."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
