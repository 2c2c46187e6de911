"""The bridge from a replica's calls to its step loop (step-level batching, ``actors/steploop.py``): a joinable
call encodes on its own thread, its samples join the loop at its next step and leave it when done, and it decodes
on its own thread; cancels reach samples that are still encoding as well as those in the loop."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import replace

from zimage_common.messages import Batch, StageTimes

# The replica's log lines keep one logger name whichever part of it writes them: operators filter on it
# (docs/observability.md).
log = logging.getLogger("actors.worker")


class StepBridgeMixin:
    """``PipelineWorker``'s joined calls, ``cancel`` and ``loop_stats``."""

    def _step_loop(self):
        with self._loop_lock:
            if self._loop is None:
                from .steploop import StepLoop

                self._loop = StepLoop(self.engine, self.max_batch_tokens, self.max_batch_size, run=self._loop_run,
                                      name=f"step-loop-{self.replica_id}", policy=self.step_join)
                self._loop.fault = self._loop_fault
            return self._loop

    def _loop_run(self, fn):
        """Each step of the loop holds the devices as a whole batch would (so a whole-batch call on the same replica
        never runs beside it) and runs on the denoise stage's thread (and stream)."""
        with contextlib.nullcontext() if self.pipeline_stages else self._device_lock:
            return self._stages.run("denoise", fn)

    def _loop_fault(self, names: list[str]) -> None:
        if self._fault is not None and self._fault_kind == "oom_above":  # on the running set, as memory is
            self._fault(Batch(-1, tuple(self._joined[n] for n in names if n in self._joined)))

    def _run_joined(self, batch: Batch, samples, on_step):
        """One call of step-level batching: its samples join the loop at its next step, and leave it when done while
        the loop goes on; encode and decode run here, beside the loop (the stage locks and streams of stage
        pipelining). Stage times: encode, time in the loop (shared with whatever ran beside), decode. A cancel of
        its requests while they encode is kept, and they leave before their first step."""
        engine = self.engine
        for s in samples:
            engine.check_size(s.height, s.width)
        loop = self._step_loop()
        ids = {r.request_id for r in batch.requests}
        with self._cancel_lock:  # from here a cancel() of its requests is kept until they are in the loop
            self._encoding |= ids
        try:
            return self._run_joined_call(batch, samples, on_step, engine, loop)
        finally:
            with self._cancel_lock:
                self._encoding -= ids
                self._cancel_early -= ids

    def _run_joined_call(self, batch: Batch, samples, on_step, engine, loop):
        from .engine import _sync, has_images
        from .steploop import CancelledSample, Group, RunningSample

        guidance = [s.guidance_scale for s in samples]
        enc, encode_s = self._stages.run("encode", engine.encode_stage, samples)
        negatives = iter(enc.negative)
        steps = batch.key.num_inference_steps
        conditions, controls, image_encode_s = [None] * len(samples), [None] * len(samples), 0.0
        if has_images(samples):
            # edits and ControlNet: the input images' VAE encode, beside the loop on the VAE's stage (as
            # ``ZImageEngine.generate`` does it)
            conditions, controls, image_encode_s = self._stages.run("decode", engine.encode_images_stage, samples,
                                                                    steps)
        hooks = _OffLoopHook(on_step, engine.devices["transformer"], loop.stats) if on_step is not None else None
        running = []
        for r, s, lat, pos, g, cond, ctl in zip(batch.requests, samples, engine.initial_latents(samples),
                                                enc.positive, guidance, conditions, controls):
            rs = RunningSample.create(engine, r.request_id, r.tokens, lat, pos, next(negatives) if g > 0 else None,
                                      g, steps if cond is None else cond.num_inference_steps,
                                      start=0 if cond is None else cond.start, loras=s.loras, control=ctl,
                                      control_scale=s.control_scale)
            if cond is not None:  # img2img / inpainting: from the noised image, its own start, the blend per step
                rs.latents = cond.initial_latents(rs.scheduler)
                if cond.mask is not None:
                    rs.after_step = _edit_blend(cond)
            running.append(rs)
        # the samples' tensors were made on this thread's stream; the loop reads them on its own
        _sync(engine.devices["transformer"])
        group = Group(running, hooks)
        del enc, negatives, conditions, controls
        try:
            with self._cancel_lock:  # one step for cancel(): its requests are either encoding or in the loop
                for r in batch.requests:
                    self._joined[r.request_id] = r
                early = {r.request_id for r in batch.requests} & self._cancel_early
                if early:  # cancelled while encoding: they leave before their first step
                    loop.cancel(early)
                loop.submit(group)
            group.done.wait()
        finally:
            for r in batch.requests:
                self._joined.pop(r.request_id, None)
            if hooks is not None:
                hooks.close()  # every step's progress (and the final check) is in before the results are made
        if group.error is not None:
            raise group.error
        if all(s.cancelled for s in group.samples):
            raise CancelledSample(", ".join(s.name for s in group.samples))
        denoise_s = (group.finished_at or time.perf_counter()) - (group.joined_at or time.perf_counter())
        decoded, decode_s = self._stages.run("decode", engine.decode_stage,
                                             [s.latents for s in group.samples if not s.cancelled])
        decoded = iter(decoded)
        images = [None if s.cancelled else next(decoded) for s in group.samples]
        return images, StageTimes(encode_s=encode_s, denoise_s=denoise_s, decode_s=decode_s,
                                  total_s=encode_s + image_encode_s + denoise_s + decode_s,
                                  image_encode_s=image_encode_s)

    def _with_loop_stats(self, emit):
        """Progress events of a joined call carry the loop's step, running and joined counts (called in the loop
        thread right after the step, so they are the step's own)."""
        def wrapped(ev):
            stamp = getattr(_step_stamp, "value", None)  # the step's own counts, taken by _OffLoopHook
            if stamp is not None:
                ev = replace(ev, loop_step=stamp[0], running=stamp[1], joined=stamp[2])
            emit(ev)
        return wrapped

    def cancel(self, request_ids: list[str]) -> int:
        """Requests whose callers went away leave the step loop at its next step, or, still encoding, before their
        first; returns how many were there."""
        with self._cancel_lock:
            names = {i for i in request_ids if i in self._joined}
            early = {i for i in request_ids if i in self._encoding and i not in self._joined}
            self._cancel_early |= early
            if names and self._loop is not None:
                self._loop.cancel(names)
        return len(names) + len(early)

    def loop_stats(self) -> dict:
        """The step loop's counters (steps, joins, running, waiting, shrinks), empty before its first call."""
        from dataclasses import asdict

        return asdict(self._loop.stats) if self._loop is not None else {}


_step_stamp = threading.local()


class _OffLoopHook:
    """A joined call's per-step hook (progress, previews, the final non-finite check: ``screening.StepHook``), run
    off the step loop's thread, in step order: the loop only copies the clean-latent estimates the hook will read
    (at preview steps and the last step), so decoding a preview never holds up the other samples' steps."""

    def __init__(self, hook, device, stats=None):
        from concurrent.futures import ThreadPoolExecutor

        self.hook = hook
        self.device = device
        self.stats = stats  # the loop's counters: each event carries those of its own step
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="step-hook")
        self.error: BaseException | None = None

    def __call__(self, step: int, total: int, denoised) -> None:
        from .engine import _sync

        wanted = step == total or step in getattr(self.hook, "_plan", {})
        estimates = [e.clone() for e in denoised()] if wanted and denoised is not None else None
        if estimates is not None:
            _sync(self.device)  # the hook reads them on another thread's stream
        st = self.stats
        stamp = (st.steps, st.running, st.last_joined) if st is not None else None
        self.pool.submit(self._run, step, total, (lambda: estimates) if estimates is not None else None, stamp)

    def _run(self, step, total, denoised, stamp) -> None:
        _step_stamp.value = stamp
        try:
            self.hook(step, total, denoised)
        except Exception as e:  # noqa: BLE001 - a failed preview must not fail the image
            log.exception("step hook failed at step %d", step)
            self.error = e

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _edit_blend(cond):
    """The inpainting blend as a step-loop ``after_step`` hook: ``Conditioning.after_step`` with the sample's next
    timestep (None after its last step), as ``ZImageEngine.denoise`` calls it."""
    def after_step(s) -> None:
        nxt = s.scheduler.timesteps[s.step] if s.step < s.num_steps else None
        s.latents = cond.after_step(s.scheduler, s.latents, nxt)

    return after_step
