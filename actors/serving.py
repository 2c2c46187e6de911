"""A replica's serving paths: ``run_batch`` and ``run_batch_stream``, each request screened on its own, then the
batch's encode -> denoise -> decode as a whole batch (holding the devices from its denoise on), with stage
pipelining, or through the step loop (``actors/step_bridge.py``). Every outcome comes back as data: a failure
becomes one failed ``ImageResult`` per request it touched (``_failure``), and the replica stays up."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import replace

from zimage_common.errors import ReplicaUnavailableError
from zimage_common.logging_setup import logs_batch
from zimage_common.messages import Batch, BatchResult, FailureKind, ImageResult, StageTimes

# The replica's log lines keep one logger name whichever part of it writes them: operators filter on it
# (docs/observability.md).
log = logging.getLogger("actors.worker")


class ServingMixin:
    """``PipelineWorker``'s ``run_batch``, ``run_batch_stream`` and ``encode`` (another replica's prompts)."""

    def run_batch(self, batch: Batch) -> BatchResult:
        return self._serve(batch)

    def run_batch_stream(self, batch: Batch):
        """Like ``run_batch``, but first yields a ``StepProgress`` after every denoising step (Ray streams each
        item to the router as it is produced), with the preview images of requests that asked for
        ``partial_images``, then the ``BatchResult``."""
        events: queue.Queue = queue.Queue()
        out: list[BatchResult] = []

        def work() -> None:
            try:
                out.append(self._serve(batch, events.put))
            finally:
                events.put(None)

        t = threading.Thread(target=work, name=f"batch-{batch.batch_id}", daemon=True)
        t.start()
        while (event := events.get()) is not None:
            yield event
        t.join()
        yield out[0]

    @logs_batch  # every log line about the batch carries its requests' ids
    def _serve(self, batch: Batch, emit=None) -> BatchResult:
        """Isolation around ``_run``: each request is screened on its own first (``actors/screening.py``), so a
        prompt the tokenizer cannot encode or a size the model cannot place fails alone (``invalid_request``)
        while the rest run as one batch; a sample whose latents end non-finite fails alone (``request_error``).
        Results carry the token counts the HTTP layer reports as ``usage``."""
        from .screening import StepHook, screen

        if not self._ready or self.engine is None:
            return self._run(batch)
        # the tokenizer is not thread-safe: on the encode stage's thread, never beside another call's encode
        checked = self._stages.run("encode", screen, self.engine, batch)
        if batch.joinable and emit is not None:
            emit = self._with_loop_stats(emit)
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
        if not self._ready:
            return self._failed(batch, "replica is not started", FailureKind.NOT_READY)
        from .engine import Sample

        samples = [Sample(r.prompt, r.seed, r.width, r.height, r.guidance_scale, r.negative_prompt, r.loras,
                          image=r.image, mask=r.mask, strength=r.strength,  # edits (actors/conditioning.py)
                          num_inference_steps=r.num_inference_steps,
                          control_image=r.control_image, control_scale=r.control_scale)  # [controlnet]
                   for r in batch.requests]
        steps = batch.key.num_inference_steps
        try:
            if getattr(batch, "joinable", False):
                # Step-level batching: encode here, join the replica's step loop, decode here when done.
                if self._fault is not None:
                    self._fault(batch)
                images, times = self._run_joined(batch, samples, on_step)
            elif self.pipeline_stages:
                # Stage pipelining: batch k+1 encodes while batch k denoises and batch k-1 decodes.
                if self._fault is not None:
                    self._fault(batch)
                images, times = self.engine.generate(samples, steps, on_step, stage_run=self._stages.run)
            else:
                gaps: dict = {}
                with self._holding_from_denoise(batch, gaps) as stage_run:
                    images, times = self.engine.generate(samples, steps, on_step, stage_run=stage_run)
                times = replace(times, **{k: round(v, 6) for k, v in gaps.items()})
        except Exception as e:  # noqa: BLE001 - every failure becomes data for the router
            kind = FailureKind.OUT_OF_MEMORY if _is_oom(e) else FailureKind.REPLICA_ERROR
            if isinstance(e, ReplicaUnavailableError):
                kind = FailureKind.REPLICA_LOST  # the shared encoder's replica is gone: the router retries elsewhere
            if type(e).__name__ == "CancelledSample":
                log.info("replica %s: batch %d cancelled: %s", self.replica_id, batch.batch_id, e)
                return self._failed(batch, "cancelled by the client", FailureKind.CANCELLED)
            log.exception("replica %s: batch %d (%d images, %s) failed", self.replica_id, batch.batch_id, len(batch),
                          batch.key)
            if kind == FailureKind.OUT_OF_MEMORY:
                _free_cuda_cache()
            return self._failed(batch, f"{type(e).__name__}: {e}", kind)
        self.batches_run += 1
        self.images_run += len(batch)
        results = tuple(
            ImageResult(
                request_id=r.request_id, ok=True, replica_id=self.replica_id, batch_id=batch.batch_id,
                batch_size=len(batch), seed=r.seed, width=r.width, height=r.height, image=img,
                stage_times=times,
            ) if img is not None else  # only a joined call's request whose caller went away (step-level batching)
            self._failure(batch, r, "cancelled by the client", FailureKind.CANCELLED)
            for r, img in zip(batch.requests, images)
        )
        return BatchResult(batch.batch_id, self.replica_id, results, times)

    @contextlib.contextmanager
    def _holding_from_denoise(self, batch: Batch, gaps: dict):
        """Whole-batch calls without stage pipelining: one batch at a time on the devices from its denoise stage to
        its end, but its encode (and its input images' VAE encode) before that, beside the previous batch's
        denoise, so a batch's encode is off the critical path (0.06 s for four short prompts at 1024^2 on an H100,
        0.11-0.14 s for prompts of up to 160 words; docs/benchmarks-history.md). Fills ``gaps`` with how long the
        devices stood idle before this batch took them, and why (``StageTimes.idle_encoding_s``, ``idle_starved_s``,
        ``device_wait_s``)."""
        arrived = time.perf_counter()
        held = contextlib.ExitStack()

        def run(stage, fn, *args, **kwargs):
            if stage == "denoise" and not gaps:  # the first denoise stage takes the devices
                ready = time.perf_counter()
                held.enter_context(self._device_lock)
                took = time.perf_counter()
                held.callback(self._devices_released)  # runs before the lock's release (last in, first out)
                gaps.update(device_wait_s=took - ready, **_idle_before(self._released_at, arrived, ready, took))
                if self._fault is not None:
                    self._fault(batch)
            return self._stages.run(stage, fn, *args, **kwargs)

        with held:
            yield run

    def _devices_released(self) -> None:
        self._released_at = time.perf_counter()

    def _preview_decode(self, latents):
        """A preview's decode (``screening.StepHook``), on the decode stage's thread: from inside a denoise step
        the estimates are on the denoise stage's stream, so that stream is finished first."""
        if self._stages.on("denoise"):
            from .engine import _sync

            _sync(self.engine.devices["transformer"])
        return self._stages.run("decode", self.engine.decode, latents)

    def encode(self, prompts: list[str], negative_prompts: list[str | None], guidance: float):
        """Serve another replica's encode (component replication): embeddings come back on the CPU."""
        from actors.engine import EncodedPrompts

        if not self._ready:
            raise RuntimeError(f"replica {self.replica_id} (shared text encoder) is not started")
        def encode():
            enc = self.engine.encode(prompts, negative_prompts, guidance)
            self.encodes_served += 1  # (on the encode thread alone: no count is lost)
            return EncodedPrompts([t.cpu() for t in enc.positive], [t.cpu() for t in enc.negative])

        return self._stages.run("encode", encode)

    def _failed(self, batch: Batch, reason: str, kind: str) -> BatchResult:
        """The whole batch failed: every request with the same reason."""
        results = tuple(self._failure(batch, r, reason, kind) for r in batch.requests)
        return BatchResult(batch.batch_id, self.replica_id, results, StageTimes())

    def _failure(self, batch: Batch, r, error: str, kind: str, **fields) -> ImageResult:
        """The one shape of a failed request's result (``fields``: what the failure knows beyond it)."""
        return ImageResult(request_id=r.request_id, ok=False, replica_id=self.replica_id, batch_id=batch.batch_id,
                           batch_size=len(batch), seed=r.seed, error=error, error_type=kind, **fields)


def _is_oom(e: Exception) -> bool:
    try:
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    return "out of memory" in str(e).lower()


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _idle_before(released: float | None, arrived: float, ready: float, took: float) -> dict[str, float]:
    """How long the devices stood idle before a batch took them at ``took`` (they were let go at ``released``), split
    by cause: before the batch ``arrived`` at the replica (starved), and from then until its encode was ``ready``
    (encoding). A batch that found the devices busy (``released`` after it was ready) was behind none of it."""
    if released is None or released >= took:
        return {"idle_encoding_s": 0.0, "idle_starved_s": 0.0}
    starved = max(0.0, min(arrived, took) - released)
    encoding = max(0.0, min(ready, took) - max(released, arrived))
    return {"idle_encoding_s": encoding, "idle_starved_s": starved}
