"""The replica's denoising loop, the only way a replica denoises: one loop over a changing set of running samples.

A *call* (a group of requests the router handed over) is prepared on its caller's thread (``prepare``: encode,
each sample's state), its samples **join at the next step**, run their own steps, **leave when done**, and its
caller decodes them while the loop goes on (``finish``). Each sample carries its own step index over its own
schedule (``start`` > 0: image-to-image), an ``after_step`` hook (inpainting), guidance (its negative pass in the same
packed call), adapters and ControlNet input, so samples of any step count, size and progress share a step; the math
is ``ZImageEngine.step``'s, so an image depends only on its own request (``tests/test_steploop.py``). The set's
packed call is rebuilt only when its membership changes, from pieces each sample brought.

Admission is first come first served within the token budget, sample count and LoRA residency (``max_adapters``,
the slots the memory plan counts); the head of the queue always joins an empty set, and whatever waits with it
starts with it. A set that has already run steps takes the head only where joining pays: a join slows every running
sample's steps, and at sizes that saturate the GPU joining everything is processor sharing, worse in mean latency
than sets one after another. The loop times its steps (``step_cost.py``) and, where it knows what the sets involved
cost, lets the head join exactly where that lowers the summed completion times; elsewhere its call's
``config.JoinPolicy`` rules decide. ``never`` (``router.scheduling = "batch"``)
never joins.

Priority (``ImageRequest.priority``, which each sample carries): while a sample of a more urgent priority is running
or waiting, only that priority's samples step and join; less urgent running samples are *parked*: they keep their
whole state (latents, step index, schedule) in the running set, skip steps, report no progress, and resume when no
more urgent sample is left. So an interactive request never waits behind batch-job work already at the replica: it
joins at the next step whatever the job's samples hold in the token budget or sample count (the limits, the join
policy and the LoRA slots count the samples that step; a parked one holds only its latents), and it runs its steps
alone or beside its own priority. Less urgent waiting samples stay queued until then. A sample's steps depend only
on its own state, so a parked sample's image equals its unparked run. A step of batch-job samples alone runs at
batch-job CPU priority (``zimage_common/cpu_priority.py``), so on a shared host it yields the cores to interactive
work elsewhere.

Cancels take request ids; a name not in the loop yet is kept ``CANCEL_KEEP_S``, so a cancel that overtakes its call
still applies. An out-of-memory step shrinks the running set (the newest half waits; the budget stays lowered for
``OOM_CAP_STEPS`` clean steps); a lone sample that does not fit fails its call. Any other failed step is re-run per
call, so only the calls whose own step fails are failed (``replica_error``, which the router bisects). A failed step
first puts every sample back to its state before it, so none is advanced twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from zimage_common.config import JoinPolicy
from zimage_common.cpu_priority import run_as
from zimage_common.messages import INTERACTIVE, StageTimes

from .devices import free_cache, is_oom, mark
from .engine import Schedule, has_images
from .stages import run_here
from .step_cost import Pace, StepTimer, step_costs, work

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
    schedule: Schedule | None  # its own flow-matching schedule (``ZImageEngine.schedule``)
    num_steps: int
    start: int = 0  # first step it runs (image-to-image starts part-way)
    after_step: Callable[[RunningSample], None] | None = None  # e.g. the inpainting mask blend
    loras: tuple = ()  # (adapter, scale) pairs: per-request LoRA (actors/lora.py), its negative pass's too
    control: torch.Tensor | None = None  # ControlNet input [C, 1, h, w] (actors/conditioning.encode_controls)
    control_scale: float = 0.0  # its conditioning scale (its negative pass uses the same hints)
    pieces: tuple = ()  # its packed pieces, and its negative pass's (``ZImageEngine.pieces``)
    step: int = 0  # the next step it runs
    cancelled: bool = False  # its request's caller went away: it left the loop early
    pred: torch.Tensor | None = None  # its last velocity, negated (``ZImageEngine.step``)
    priority: int = 0  # its request's (``ImageRequest.priority``): lower runs first, higher is parked meanwhile
    group: Group | None = field(default=None, repr=False)
    # the adapters its ``loras`` named when it was made (``LoraStore.pin``): it runs on these to its end, whatever
    # is registered or removed meanwhile and whoever joins its set
    pinned: dict = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, engine, name: str, tokens: int, latents: torch.Tensor, positive: torch.Tensor,
               negative: torch.Tensor | None, guidance: float, num_steps: int, start: int = 0,
               after_step=None, loras=(), control: torch.Tensor | None = None,
               control_scale: float = 0.0, priority: int = 0) -> RunningSample:
        """What the sample needs on the transformer's device, built on the caller's thread, off the loop."""
        device = engine.devices["transformer"]
        latents = latents.to(device)
        positive = positive.to(device, non_blocking=True)
        negative = None if negative is None else negative.to(device, non_blocking=True)
        store = getattr(engine, "loras", None)
        pinned = store.pin([n for n, _ in loras]) if loras and store is not None else {}
        return cls(name, tokens, latents, positive, negative, float(guidance),
                   engine.schedule(latents.shape[-2], latents.shape[-1], num_steps), num_steps, start, after_step,
                   tuple(loras), None if control is None else control.to(device), float(control_scale),
                   engine.pieces(latents, positive, negative), step=start, priority=int(priority),
                   pinned=pinned)

    @property
    def done(self) -> bool:
        return self.step >= self.num_steps

    @property
    def lengths(self) -> tuple[int, ...]:
        """Its passes' lengths in the packed call: image tokens (2x2 latent patches) and its caption's; its negative
        pass's too with guidance."""
        image = (self.latents.shape[-2] // 2) * (self.latents.shape[-1] // 2)
        return (image + self.positive.shape[0],) + ((image + self.negative.shape[0],)
                                                     if self.negative is not None and self.guidance > 0 else ())

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
        """Its current estimate of the clean latents: x0 = x - sigma * v after a step to sigma, with v = -pred
        (exact after its last step, where sigma = 0)."""
        if self.pred is None:
            return self.latents
        return self.latents + self.schedule.sigmas[self.step] * self.pred


class Group:
    """The samples of one call: they join together, and the call is answered when all of them are done (or failed).
    ``on_step(step, total, denoised)`` is its per-step hook (progress, previews, final check)."""

    def __init__(self, samples: list[RunningSample], on_step=None, join: JoinPolicy | None = None):
        self.samples = samples
        self.on_step = on_step
        self.join = join  # when its samples join a running set (None: the loop's policy)
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.joined_at: float | None = None  # perf_counter when its samples first ran a step
        self.ready = None  # ``devices.mark`` of the loop's stream after its last step: where its decode may start
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
    parked: int = 0  # running samples of a less urgent priority that skipped the latest step
    waiting: int = 0  # samples handed over and not yet running
    oom_shrinks: int = 0
    isolated_failures: int = 0  # steps that failed as a whole and were re-run per call


class StepLoop:
    """``submit(group)`` hands a call's samples over; the caller waits on ``group.done``. The loop starts on the first
    submit through ``spawn(target)`` (the replica's denoise stage thread; by default a thread of its own) and idles
    while nothing runs; ``run_alone(group)`` runs one on the calling thread. ``fault(names)`` (tests) may raise before
    a step."""

    def __init__(self, engine, max_tokens: int | None = None, max_samples: int | None = None,
                 name: str = "step-loop", max_adapters: int | None = None, policy: JoinPolicy | None = None,
                 spawn: Callable[[Callable[[], None]], object] | None = None):
        self.engine = engine
        self.policy = policy or JoinPolicy()
        self.max_tokens = max_tokens
        self.max_samples = max_samples
        # distinct LoRA adapters the running set may name (the replica's resident slots); None: the engine's
        # LoRA store's max_resident, no limit without one
        if max_adapters is None:
            max_adapters = getattr(getattr(engine, "loras", None), "max_resident", None)
        self.max_adapters = max_adapters
        self.spawn = spawn or (lambda target: threading.Thread(target=target, name=name, daemon=True).start())
        self.fault: Callable[[list[str]], None] | None = None
        self.stats = LoopStats()
        self._cond = threading.Condition()
        self._waiting: deque[RunningSample] = deque()
        self._running: list[RunningSample] = []
        self._cancelled: dict[str, float] = {}  # request id -> when its cancel came (names not found yet wait)
        self.clock: Callable[[], float] = time.monotonic  # for CANCEL_KEEP_S (tests pass a manual one)
        self._groups: list[Group] = []  # calls not answered yet
        self._started = False
        self._layout_key: tuple | None = None
        self._packed = None  # the running set's packed call (``ZImageEngine.pack``), rebuilt when the set changes
        self._oom_cap: int | None = None
        self._clean_steps = 0
        self._pace = Pace(name)  # step times by running-set size, logged every step_cost.PACE_LOG_S
        # step times by work, which decide joins where they are known (``step_cost.py``); kept on the engine, so
        # the warm-up's loops measure for the serving loop
        self.costs = step_costs(engine)
        self._device = getattr(engine, "devices", {}).get("transformer")
        self._timer = StepTimer(self.costs, self._device) if self.costs is not None else None

    # ---- the callers' side ---------------------------------------------------------------------------------
    def submit(self, group: Group, start: bool = True) -> Group:
        with self._cond:
            self._waiting.extend(group.samples)
            self._groups.append(group)
            self.stats.waiting = len(self._waiting)
            if start and not self._started:
                self._started = True
                self.spawn(self._loop)
            self._cond.notify_all()
        return group

    def run_alone(self, group: Group) -> Group:
        """Run ``group`` to its end on the calling thread (a loop nobody else submits to)."""
        self.submit(group, start=False)
        try:
            while not group.done.is_set():
                self._guarded(wait=False)
        finally:
            run_as(INTERACTIVE)  # the caller's thread goes on at its own priority
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

    def _urgent(self) -> int | None:
        """The most urgent priority running or waiting (lowest value): only its samples step and join. Under
        ``_cond``."""
        return min((s.priority for s in (*self._running, *self._waiting)), default=None)

    def _admit(self) -> int:
        """Move waiting samples of the most urgent priority into the running set (see the module's docstring);
        returns how many joined. The limits count the samples that will step with them, not parked ones."""
        if not self._waiting:
            return 0
        urgent = self._urgent()
        joined = 0
        budget = self._budget()
        stepping = [s for s in self._running if s.priority == urgent]
        tokens = sum(s.tokens for s in stepping)
        adapters = set().union(*(s.adapters() for s in stepping))
        started = [s for s in stepping if s.step > s.start]  # those that already ran a step
        admitted = []
        for s in [s for s in self._waiting if s.priority == urgent]:  # first come first served within it
            if stepping:
                if self.max_samples is not None and len(stepping) >= self.max_samples:
                    break
                if budget is not None and tokens + s.tokens > budget:
                    break
                if self.max_adapters is not None and len(adapters | s.adapters()) > self.max_adapters:
                    break
                if started and not self._pays(s, tokens, started, stepping):
                    break
            admitted.append(s)
            stepping.append(s)
            self._running.append(s)
            tokens += s.tokens
            adapters |= s.adapters()
            joined += 1
        if admitted:
            self._waiting = deque(s for s in self._waiting if s not in admitted)
        return joined

    def _pays(self, s: RunningSample, tokens: int, started: list[RunningSample],
              stepping: list[RunningSample]) -> bool:
        """Whether ``s`` joins the ``stepping`` samples (``tokens`` in all), of which ``started`` already ran steps:
        by the loop's measured step costs where it knows them (``step_cost.py``), else by the call's ``JoinPolicy``."""
        p = s.group.join if s.group is not None and s.group.join is not None else self.policy
        if p.never:
            return False
        if self.costs is not None:
            measured = self.costs.pays([(r.lengths, r.num_steps - r.step) for r in stepping],
                                       (s.lengths, s.num_steps - s.step))
            if measured is not None:
                return measured
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
            self._guarded(wait=True)

    def _guarded(self, wait: bool) -> None:
        try:
            self._iteration(wait)
        except BaseException as e:  # noqa: BLE001 - a bug here must fail the calls in, not leave them waiting
            log.exception("step loop: unexpected error; failing the calls in the loop")
            with self._cond:
                for g in self._groups:
                    g.error = g.error or e
                self._retire()

    def _iteration(self, wait: bool = True) -> None:
        with self._cond:
            self._drop_cancelled()
            self._retire()
            while not self._running and not self._waiting:
                self._pace.idle()
                self._layout_key = self._packed = None  # nothing runs: let the last set's inputs go
                if not wait:
                    return
                self._cond.wait()
                self._drop_cancelled()
                self._retire()
            joined = self._admit()
            urgent = self._urgent()
            running = [s for s in self._running if s.priority == urgent]  # the rest are parked: they skip it
            parked = len(self._running) - len(running)
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
        self.stats.parked = parked
        self.stats.steps += 1  # (before the step: its hooks' progress events carry its own count)
        run_as(urgent)  # a step of batch-job samples only yields the CPU to interactive work (cpu_priority.py)
        self._run_step(running)

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
                if g.error is None:  # its last step, if a cancel ended it before its slowest sample ran that
                    self._report([g])  # step (the final check, and the events a stream waits for)
                g.finished_at = time.perf_counter()
                # on the loop's thread, before its next step is launched (nothing since its last one but estimates)
                g.ready = mark(self._device) if g.error is None else None
                g.done.set()
        self._groups = [g for g in self._groups if not g.done.is_set()]
        self.stats.waiting = len(self._waiting)

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
        if is_oom(e):
            free_cache()
            self._shrink(running, e)
        else:
            self._isolate(running, e)

    def _attempt(self, samples: list[RunningSample]) -> Exception | None:
        """One step of ``samples``; the error if it failed, after putting every sample back to its state before it
        (a failing ``after_step`` hook leaves the samples before it advanced)."""
        saved = [_Saved.of(s) for s in samples]
        try:
            if self.fault is not None:
                self.fault([s.name for s in samples])
            self._step(samples)
            # the calls' hooks see the step's results at once (a hook's failure fails its call, not the step)
            self._report(list(dict.fromkeys(s.group for s in samples)))
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
                if is_oom(e2):  # memory, not this call's fault: shrink as any out-of-memory step (a lone sample
                    free_cache()  # that does not fit fails with out_of_memory); they run this step later
                    self._shrink(mine, e2)
                else:
                    log.error("step loop: the call of %s failed alone: %s", [s.name for s in mine], e2)
                    g.error = e2
            self._layout_key = None

    def _step(self, running: list[RunningSample]) -> None:
        """One step of every running sample: ``ZImageEngine.step`` on the set's packed call."""
        key = tuple(running)  # the samples themselves (compared by identity): an id() could be a finished one's
        fresh = key != self._layout_key
        if fresh:
            self._packed = self.engine.pack(running)
            self._layout_key = key
        if self._timer is None or fresh:  # a new set's first step may compile or plan: its time is not the set's
            self.engine.step(running, self._packed)
            return
        self._timer.poll()
        self._timer.start(work([n for s in running for n in s.lengths], self.costs.attn_tokens))
        try:
            self.engine.step(running, self._packed)
        except BaseException:
            self._timer.abandon()
            raise
        self._timer.stop()


@dataclass
class _Saved:
    """A sample's state before a step."""

    sample: RunningSample
    step: int
    latents: torch.Tensor  # the tensor itself: a step replaces ``latents``, it never writes into the old one
    pred: torch.Tensor | None

    @classmethod
    def of(cls, s: RunningSample) -> _Saved:
        return cls(s, s.step, s.latents, s.pred)

    def restore(self) -> None:
        s = self.sample
        if s.cancelled:  # it left meanwhile (``step`` = ``num_steps``): it stays out
            return
        s.step, s.latents, s.pred = self.step, self.latents, self.pred


class CancelledSample(Exception):
    """Every sample of a call left the loop because their requests were cancelled."""


# ---- one call through the loop ----------------------------------------------------------------------------------
def prepare(engine, samples: Sequence, num_steps: int, on_step=None, run=run_here, encode=None,
            join: JoinPolicy | None = None) -> tuple[Group, StageTimes]:
    """A call's samples made ready to join a loop, off the loop: sizes checked, prompts encoded (``encode(prompts,
    negative_prompts, guidance)``, the replica's shared encodes; else on the encode stage), input images encoded
    (edits, ControlNet; on the VAE's stage), each sample's state built. ``run(stage, fn, *args)`` runs a stage
    (``actors/stages.py``). Returns the call's group and its stage times so far."""
    for s in samples:
        engine.check_size(s.height, s.width)
    prompts = ([s.prompt for s in samples], [s.negative_prompt for s in samples], [s.guidance_scale for s in samples])
    enc, encode_s = encode(*prompts) if encode is not None else run("encode", engine.encode_stage, *prompts)
    conditions, controls, image_encode_s = [None] * len(samples), [None] * len(samples), 0.0
    if has_images(samples):
        conditions, controls, image_encode_s = run("decode", engine.encode_images_stage, samples, num_steps)
    negatives = iter(enc.negative)
    running = []
    for i, (s, lat, pos, cond, ctl) in enumerate(zip(samples, engine.initial_latents(samples), enc.positive,
                                                      conditions, controls)):
        rs = RunningSample.create(engine, s.name or f"sample-{i}", s.tokens, lat, pos,
                                  next(negatives) if s.guidance_scale > 0 else None, s.guidance_scale,
                                  num_steps if cond is None else cond.num_inference_steps,
                                  start=0 if cond is None else cond.start, loras=s.loras, control=ctl,
                                  control_scale=s.control_scale, priority=getattr(s, "priority", 0))
        if cond is not None:  # img2img / inpainting: from the noised image, its own start, the blend per step
            rs.latents = cond.noised(rs.schedule.sigmas[cond.start], rs.schedule.keep[cond.start])
            if cond.mask is not None:
                rs.after_step = _blend(cond)
        running.append(rs)
    return Group(running, on_step, join), StageTimes(encode_s=encode_s, image_encode_s=image_encode_s)


def finish(engine, group: Group, times: StageTimes, run=run_here) -> tuple[list, StageTimes]:
    """A call's end once its group is done: its error raised, or its images decoded (None for a cancelled sample)
    and its stage times: encode, time in the loop (shared with whatever ran beside), decode."""
    if group.error is not None:
        raise group.error
    if all(s.cancelled for s in group.samples):
        raise CancelledSample(", ".join(s.name for s in group.samples))
    denoise_s = (group.finished_at or time.perf_counter()) - (group.joined_at or time.perf_counter())
    decoded, decode_s = run("decode", engine.decode_stage, [s.latents for s in group.samples if not s.cancelled],
                            group.ready)
    decoded = iter(decoded)
    images = [None if s.cancelled else next(decoded) for s in group.samples]
    total = times.encode_s + times.image_encode_s + denoise_s + decode_s
    return images, replace(times, denoise_s=denoise_s, decode_s=decode_s, total_s=total)


def generate(engine, samples: Sequence, num_steps: int, on_step=None, run=run_here) -> tuple[list, StageTimes]:
    """``samples`` as one call through a loop of their own on the calling thread: a uint8 image ``[H, W, 3]`` per
    sample and the stage times (warm-up, tools, tests)."""
    group, times = prepare(engine, samples, num_steps, on_step, run)
    StepLoop(engine).run_alone(group)
    return finish(engine, group, times, run)


def _blend(cond):
    """The inpainting blend as an ``after_step`` hook, with the sample's next sigma (None after its last step)."""
    def after_step(s: RunningSample) -> None:
        last = s.step >= s.num_steps
        s.latents = cond.after_step(s.latents, None if last else s.schedule.sigmas[s.step], s.schedule.keep[s.step])

    return after_step
