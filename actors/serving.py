"""A replica's serving path (``run_batch``, ``run_batch_stream``): each call's requests screened on their own, encoded
on the caller's thread (with other calls' prompts waiting at the same time), run in the replica's step loop
(``actors/steploop.py``) and decoded here while the loop goes on. Cancels reach requests still encoding as well as
those in the loop. A failure becomes one failed ``ImageResult`` per request it touched (``_run``)."""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, replace

from zimage_common.cpu_priority import WORK_PRIORITY, run_as
from zimage_common.errors import ReplicaUnavailableError
from zimage_common.logging_setup import logs_batch
from zimage_common.messages import INTERACTIVE, Batch, BatchResult, FailureKind, ImageResult, StageTimes

from .devices import mark

# The replica's log lines keep one logger name whichever part of it writes them: operators filter on it
# (docs/observability.md).
log = logging.getLogger("actors.worker")


class ServingMixin:
    """``PipelineWorker``'s ``run_batch``, ``run_batch_stream``, ``cancel``, ``loop_stats`` and ``encode`` (another
    replica's prompts)."""

    def run_batch(self, batch: Batch) -> BatchResult:
        return self._serve(batch)

    def run_batch_stream(self, batch: Batch):
        """Like ``run_batch``, but first yields a ``StepProgress`` after every denoising step (Ray streams each
        item to the router as it is produced), with the preview images of requests that asked for
        ``partial_images``, then the ``BatchResult``."""
        events: queue.Queue = queue.Queue()
        out: list[BatchResult] = []
        failed: list[BaseException] = []

        def work() -> None:
            try:
                out.append(self._serve(batch, events.put))
            except BaseException as e:  # noqa: BLE001 - raised to the caller below, as run_batch would
                failed.append(e)
            finally:
                events.put(None)

        t = threading.Thread(target=work, name=f"batch-{batch.batch_id}", daemon=True)
        t.start()
        while (event := events.get()) is not None:
            yield event
        t.join()
        if failed:
            raise failed[0]
        yield out[0]

    def _serve(self, batch: Batch, emit=None) -> BatchResult:
        """The call at its requests' most urgent priority: its stage calls queue and run by it, and this thread runs
        at its CPU niceness meanwhile (``zimage_common/cpu_priority.py``)."""
        priority = min((r.priority for r in batch.requests), default=INTERACTIVE)
        token = WORK_PRIORITY.set(priority)
        run_as(priority)
        ids = {r.request_id for r in batch.requests}
        with self._cancel_lock:  # from here (screening waits for the encode stage) a cancel of them is kept
            self._encoding |= ids
        try:
            return self._serve_call(batch, emit)
        finally:
            with self._cancel_lock:
                self._encoding -= ids
                self._cancel_early -= ids
            run_as(INTERACTIVE)
            WORK_PRIORITY.reset(token)

    @logs_batch  # every log line about the batch carries its requests' ids
    def _serve_call(self, batch: Batch, emit=None) -> BatchResult:
        """Each request screened on its own first (``actors/screening.py``: an unencodable prompt or a size the model
        cannot place fails alone, ``invalid_request``), a sample that ends non-finite fails alone
        (``request_error``); results carry the token counts the HTTP layer reports as ``usage``."""
        from .screening import StepHook, screen

        if not self._ready or self.engine is None:
            return self._run(batch)
        # the tokenizer is not thread-safe: on the encode stage's thread, never beside another call's encode
        checked = self._stages.run("encode", screen, self.engine, batch)
        by_id: dict[str, ImageResult] = {}
        out = None
        if checked.runnable:
            run = batch if len(checked.runnable) == len(batch) else replace(batch, requests=checked.runnable)
            hook = StepHook(self.engine, run, emit, self._preview_decode)
            out = self._run(run, hook)
            if hook.preview_s:
                log.info("replica %s: batch %d: previews decoded in %.3fs", self.replica_id, batch.batch_id,
                         hook.preview_s)
            for r in out.results:
                if r.ok and r.request_id in hook.nonfinite:
                    log.error("replica %s: request %s came out non-finite", self.replica_id, r.request_id)
                    r = replace(r, ok=False, image=None, error="the image came out non-finite (NaN or inf)",
                                error_type=FailureKind.REQUEST_ERROR)
                by_id[r.request_id] = replace(r, prompt_tokens=checked.prompt_tokens.get(r.request_id),
                                              image_tokens=checked.image_tokens.get(r.request_id))
        for r in batch.requests:
            if r.request_id in checked.failed:
                message, param = checked.failed[r.request_id]
                by_id[r.request_id] = self._failure(batch, r, message, FailureKind.INVALID_REQUEST, width=r.width,
                                                    height=r.height, param=param)
        times = out.stage_times if out is not None else StageTimes()
        return BatchResult(batch.batch_id, self.replica_id, tuple(by_id[r.request_id] for r in batch.requests),
                           times)

    def _run(self, batch: Batch, on_step=None) -> BatchResult:
        """The call through the loop, and the one place where its failure becomes results."""
        if not self._ready:
            return self._failed(batch, "replica is not started", FailureKind.NOT_READY)
        from .devices import free_cache, is_oom
        from .lora import AdapterGone
        from .steploop import CancelledSample

        try:
            if self._fault is not None and self._fault_kind != "stall":
                self._fault(batch)
            images, times = self._run_call(batch, on_step)
        except Exception as e:  # noqa: BLE001 - every failure becomes data for the router
            if isinstance(e, CancelledSample):
                log.info("replica %s: batch %d cancelled: %s", self.replica_id, batch.batch_id, e)
                return self._failed(batch, "cancelled by the client", FailureKind.CANCELLED)
            if isinstance(e, AdapterGone):
                return self._adapter_gone(batch, e)
            kind = FailureKind.OUT_OF_MEMORY if is_oom(e) else FailureKind.REPLICA_ERROR
            if isinstance(e, ReplicaUnavailableError):
                kind = FailureKind.REPLICA_LOST  # the shared encoder's replica is gone: the router retries elsewhere
            log.exception("replica %s: batch %d (%d images, %s) failed", self.replica_id, batch.batch_id, len(batch),
                          batch.key)
            if kind == FailureKind.OUT_OF_MEMORY:
                free_cache()
            return self._failed(batch, f"{type(e).__name__}: {e}", kind)
        self.batches_run += 1
        self.images_run += len(batch)
        results = tuple(
            ImageResult(
                request_id=r.request_id, ok=True, replica_id=self.replica_id, batch_id=batch.batch_id,
                batch_size=len(batch), seed=r.seed, width=r.width, height=r.height, image=img,
                stage_times=times,
            ) if img is not None else  # a request of the call whose caller went away
            self._failure(batch, r, "cancelled by the client", FailureKind.CANCELLED)
            for r, img in zip(batch.requests, images)
        )
        return BatchResult(batch.batch_id, self.replica_id, results, times)

    def _run_call(self, batch: Batch, on_step):
        """Encode here (shared with other calls encoding now), join the loop, wait, decode here. A cancel of the
        call's requests while they encode is kept, and they leave before their first step."""
        from .engine import Sample
        from .steploop import finish, prepare

        samples = [Sample(r.prompt, r.seed, r.width, r.height, r.guidance_scale, r.negative_prompt, r.loras,
                          image=r.image, mask=r.mask, strength=r.strength, num_inference_steps=r.num_inference_steps,
                          control_image=r.control_image, control_scale=r.control_scale, name=r.request_id,
                          tokens=r.tokens, priority=r.priority)
                   for r in batch.requests]
        loop = self._step_loop()
        ids = {r.request_id for r in batch.requests}  # in _encoding since the call began (_serve)
        hooks = group = None
        try:
            hooks = _OffLoopHook(on_step, loop.stats) if on_step is not None else None
            group, times = prepare(self.engine, samples, batch.key.num_inference_steps, hooks, self._stages.run,
                                   self._encodes, batch.join)
            with self._cancel_lock:  # one step for cancel(): its requests are either encoding or in the loop
                for r in batch.requests:
                    self._joined[r.request_id] = r
                early = ids & self._cancel_early
                if early:  # cancelled while encoding: they leave before their first step
                    loop.cancel(early)
                loop.submit(group)
            group.done.wait()
        finally:
            with self._cancel_lock:  # out of the loop: a cancel from here finds nothing to stop
                self._encoding -= ids
                for i in ids:
                    self._joined.pop(i, None)
            if hooks is not None:
                hooks.close()  # every step's progress (and the final check) is in before the results are made
                # The loop marks a call finished once it has launched the last step; the final check reads that
                # step's output, so it waited for the GPU to run the steps launched ahead (about one at 1024x1024),
                # and for any preview still decoding. That wait is the denoise's: counted there, not left between
                # the stages.
                if group is not None and group.finished_at is not None:
                    group.finished_at = max(group.finished_at, time.perf_counter())
        return finish(self.engine, group, times, self._stages.run)

    def _step_loop(self):
        with self._loop_lock:
            if self._loop is None:
                from .steploop import StepLoop

                # the loop runs on the denoise stage's thread, where warm-up built attention's plans
                self._loop = StepLoop(self.engine, self.max_batch_tokens, self.max_batch_size,
                                      name=f"step-loop-{self.replica_id}",
                                      # in a context of its own: not the first call's (its log lines' request ids)
                                      spawn=lambda target: self._stages.submit("denoise", contextvars.Context().run,
                                                                               target))
                self._loop.fault = self._loop_fault
            return self._loop

    @property
    def _encodes(self) -> SharedEncodes:
        if self._shared_encodes is None:
            self._shared_encodes = SharedEncodes(self._stages, self.engine)
        return self._shared_encodes

    def _loop_fault(self, names: list[str]) -> None:
        # on the running set at a step, as memory runs out and a GPU wedges
        if self._fault is not None and self._fault_kind in ("oom_above", "stall"):
            self._fault(Batch(-1, tuple(self._joined[n] for n in names if n in self._joined)))

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
        return asdict(self._loop.stats) if self._loop is not None else {}

    def _preview_decode(self, latents, ready=None):
        """A preview's decode (``screening.StepHook``), on the decode stage's thread."""
        return self._stages.run("decode", self.engine.decode, latents, ready)

    def encode(self, prompts: list[str], negative_prompts: list[str | None], guidance: float,
               priority: int = INTERACTIVE):
        """Serve another replica's encode (component replication): embeddings come back on the CPU. ``priority``:
        the borrowing call's (a batch job's encode queues behind this replica's interactive work, as its own do)."""
        from actors.engine import EncodedPrompts

        if not self._ready:
            raise RuntimeError(f"replica {self.replica_id} (shared text encoder) is not started")
        token = WORK_PRIORITY.set(priority)
        run_as(priority)
        try:
            enc, _ = self._encodes(prompts, negative_prompts, [float(guidance)] * len(prompts)
                                   if isinstance(guidance, (int, float)) else guidance)
        finally:
            run_as(INTERACTIVE)
            WORK_PRIORITY.reset(token)
        with self._cancel_lock:  # (calls come in on several threads)
            self.encodes_served += 1
        return EncodedPrompts([t.cpu() for t in enc.positive], [t.cpu() for t in enc.negative])

    def _adapter_gone(self, batch: Batch, e) -> BatchResult:
        """Adapters removed while the call ran: the requests that name them are the caller's 400 (as a queued one
        gets at screening); the others failed with the step and are the router's to run again (it bisects a
        replica_error batch, and each of them passes screening)."""
        log.info("replica %s: batch %d: %s", self.replica_id, batch.batch_id, e)
        return BatchResult(batch.batch_id, self.replica_id, tuple(
            self._failure(batch, r, f"LoRA adapter(s) {', '.join(sorted(r.adapter_names & e.names))} were removed "
                          f"(DELETE /v1/loras) while this request ran; register it again or send the request without "
                          f"it (GET /v1/loras lists them)", FailureKind.INVALID_REQUEST, param="loras")
            if r.adapter_names & e.names else
            self._failure(batch, r, f"a step of its batch failed: {e}", FailureKind.REPLICA_ERROR)
            for r in batch.requests), StageTimes())

    def _failed(self, batch: Batch, reason: str, kind: str) -> BatchResult:
        """The whole batch failed: every request with the same reason."""
        results = tuple(self._failure(batch, r, reason, kind) for r in batch.requests)
        return BatchResult(batch.batch_id, self.replica_id, results, StageTimes())

    def _failure(self, batch: Batch, r, error: str, kind: str, **fields) -> ImageResult:
        """The one shape of a failed request's result (``fields``: what the failure knows beyond it)."""
        return ImageResult(request_id=r.request_id, ok=False, replica_id=self.replica_id, batch_id=batch.batch_id,
                           batch_size=len(batch), seed=r.seed, error=error, error_type=kind, **fields)


class SharedEncodes:
    """Prompt encodes of concurrent calls, several in one text-encoder call: a call hands its prompts over and waits;
    when the encode stage's thread comes free it encodes every call's prompts that wait by then at once (the router
    sends calls as requests arrive, so under load each would otherwise run the encoder alone). A shared encode that
    fails is run again per call, so one call's prompts never fail another's."""

    def __init__(self, stages, engine):
        self.stages = stages
        self.engine = engine
        self._lock = threading.Lock()
        self._waiting: list[tuple[tuple, Future, int]] = []  # (prompts, answer, the call's work priority)

    def __call__(self, prompts, negative_prompts, guidance):
        """``(EncodedPrompts, seconds)`` for one call's prompts (``ZImageEngine.encode_stage``)."""
        done: Future = Future()
        with self._lock:
            self._waiting.append(((list(prompts), list(negative_prompts), list(guidance)), done,
                                  WORK_PRIORITY.get()))
        self.stages.submit("encode", self._drain)
        return done.result()

    def _drain(self) -> None:
        with self._lock:
            waiting, self._waiting = self._waiting, []
        if not waiting:
            return
        run_as(min(p for _, _, p in waiting))  # an interactive call's prompts never encode at a job's priority
        calls = [(args, done) for args, done, _ in waiting]
        if len(calls) > 1:
            try:
                enc, seconds = self.engine.encode_stage(*(sum((c[0][k] for c in calls), []) for k in range(3)))
            except ReplicaUnavailableError as e:  # the borrowed encoder is gone: no call's fault, none asks again
                for _, done in calls:
                    done.set_exception(e)
                return
            except Exception:  # noqa: BLE001 - one call's prompts may be at fault: each runs alone below
                log.warning("a shared encode of %d calls failed; encoding them one at a time", len(calls))
            else:
                from .engine import EncodedPrompts

                pos, neg = iter(enc.positive), iter(enc.negative)
                for (p, _, g), done in calls:
                    done.set_result((EncodedPrompts([next(pos) for _ in p], [next(neg) for x in g if x > 0]),
                                     seconds))
                return
        gone = None
        for args, done in calls:
            if gone is not None:  # the borrowed encoder went away: the rest fail with it, without waiting again
                done.set_exception(gone)
                continue
            try:
                done.set_result(self.engine.encode_stage(*args))
            except BaseException as e:  # noqa: BLE001 - the caller re-raises it
                done.set_exception(e)
                gone = e if isinstance(e, ReplicaUnavailableError) else None


class _OffLoopHook:
    """A call's per-step hook (progress, previews, the final non-finite check: ``screening.StepHook``), run off the
    loop's thread, in step order: the loop only makes the clean-latent estimates the hook will read (at preview
    steps and the last step) and marks its stream after them, so decoding a preview never holds up the other
    samples' steps. The estimates are read once that mark is reached (``ZImageEngine.reading``), not behind the
    steps launched since; each event carries the loop's counts of its own step."""

    def __init__(self, hook, stats=None):
        from concurrent.futures import ThreadPoolExecutor

        self.hook = hook
        self.stats = stats  # the loop's counters: each event carries those of its own step
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="step-hook")

    def __call__(self, step: int, total: int, denoised) -> None:
        wanted = step == total or step in getattr(self.hook, "_plan", {})
        estimates = list(denoised()) if wanted and denoised is not None else None
        ready = mark(estimates[0].device) if estimates else None
        st = self.stats
        stamp = (st.steps, st.running, st.last_joined) if st is not None else ()
        self.pool.submit(self._run, step, total, (lambda: estimates) if estimates is not None else None, stamp,
                         ready)

    def _run(self, step, total, denoised, stamp, ready) -> None:
        try:
            self.hook(step, total, denoised, stamp, ready)
        except Exception:  # noqa: BLE001 - a failed preview must not fail the image
            log.exception("step hook failed at step %d", step)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
