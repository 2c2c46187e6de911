"""What a replica does with a call around serving it, so that any number of front doors can share it:

1. **Idempotent images.** A request with a ``result_key`` (a keyed HTTP call, ``orchestrator/idempotency.py``) is
   claimed in the pool's result store first: an image already made for that key comes back from the store without
   running; one another replica is making now is waited for; only an unclaimed one runs, and its result goes to the
   store once made (a failure releases the claim, so a retry may run it). So a client that retries through another
   front door, after the first one died with the call in flight, never has its image generated twice.
2. **Admission** (``admission.py``): the call enters the replica's gate before any of its work starts, so the
   replica's budget holds whatever number of routers send to it.
3. **Encoding** (``encoder_pool.py``): results and previews of requests that name an ``output_format`` are encoded
   here, off the GPU loop, after the call has left the gate.

``PipelineWorker`` puts this mixin before ``ServingMixin``: its ``run_batch`` / ``run_batch_stream`` / ``cancel``
wrap the serving paths' (``super()``), which stay as they are.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

from zimage_common.messages import Batch, BatchResult, FailureKind, ImageResult, StageTimes, StepProgress

from .admission import AdmissionGate, AdmissionLimits
from .encoder_pool import EncoderPool

log = logging.getLogger("actors.worker")

CLAIM_POLL_S = 0.1  # how often a call waiting for another replica's keyed image asks the store again


@dataclass(frozen=True)
class IntakeSpec:
    limits: AdmissionLimits = field(default_factory=AdmissionLimits)
    encode_threads: int = 2


class ResultStore(Protocol):
    """The pool's store of keyed images (``orchestrator/idempotency.py``; through Ray, ``ray_pool.RayResultStore``).
    ``claimant``: (replica id, process id) of the replica asking."""

    def claim(self, key: str, claimant: tuple[str, int]) -> tuple[str, ImageResult | None]:
        """("run", None): run it, it is yours; ("done", result): made already; ("wait", None): another is making
        it now, ask again."""

    def deposit(self, key: str, claimant: tuple[str, int], result: ImageResult) -> None: ...

    def release(self, key: str, claimant: tuple[str, int]) -> None: ...


class IntakeMixin:
    """``PipelineWorker``'s ``run_batch``, ``run_batch_stream``, ``cancel``, ``queue_len``, ``queue_lens`` and
    ``intake_stats``."""

    def _intake_setup(self, spec: IntakeSpec | None, results: ResultStore | None) -> None:
        spec = spec or IntakeSpec()
        self._gate = AdmissionGate(spec.limits)
        # its threads start with its first image (most test replicas never encode)
        self._encoder = EncoderPool(spec.encode_threads, name=f"encode-{self.replica_id}")
        self._results = results
        self._claim_waiting: set[str] = set()  # request ids waiting for another replica's keyed image
        self._claim_cancelled: set[str] = set()
        self._claim_lock = threading.Lock()
        self.claim_counts = {"run": 0, "done": 0, "wait": 0, "store_errors": 0}

    # ---- the Ray-facing calls ----------------------------------------------------------------------------
    def run_batch(self, batch: Batch) -> BatchResult:
        *_, out = self._intake(batch, stream=False)  # without streaming its only item is the result
        return out

    def run_batch_stream(self, batch: Batch):
        yield from self._intake(batch, stream=True)

    def cancel(self, request_ids: list[str]) -> int:
        found = self._gate.cancel(request_ids)
        with self._claim_lock:
            waiting = self._claim_waiting.intersection(request_ids)
            self._claim_cancelled |= waiting
        rest = [i for i in request_ids if i not in found and i not in waiting]
        return len(found) + len(waiting) + (super().cancel(rest) if rest else 0)

    def queue_len(self) -> int:
        """Samples waiting at this replica's gate and inside it (what routers compare between replicas)."""
        return self._gate.queue_len()

    def queue_lens(self) -> tuple[int, int]:
        """(interactive samples, all samples) waiting at this replica's gate and inside it: routers judge interactive
        work by the first, job work by the second (``actors/admission.py``)."""
        return self._gate.queue_lens()

    def intake_stats(self) -> dict:
        """The gate's counters (inside now, peaks, waits), the encoder pool's and the keyed images'."""
        with self._claim_lock:
            claims = dict(self.claim_counts)
        return {"replica_id": self.replica_id, "pid": os.getpid(), "limits": asdict(self._gate.limits),
                "gate": asdict(self._gate.snapshot()), "encoder": self._encoder.stats(), "claims": claims,
                "images_run": self.images_run, "batches_run": self.batches_run}

    # ---- one call -------------------------------------------------------------------------------------------
    def _intake(self, batch: Batch, stream: bool):
        """Yields the progress events of what runs here (stream only), then the call's ``BatchResult``."""
        results: dict[str, ImageResult] = {}
        times = StageTimes()
        run, waiting = self._by_claim(batch.requests, self._claim(batch.requests), batch, results)
        while True:
            if run:
                part = batch if len(run) == len(batch) else replace(batch, requests=tuple(run))
                try:
                    out = yield from self._admitted(part, stream)
                except BaseException:  # nothing of the part was made here: a retry, here or elsewhere, may run it
                    self._settle(part.requests, (), failed=True)
                    raise
                times = out.stage_times
                for r in out.results:
                    results[r.request_id] = r
                self._settle(part.requests, out.results)
                run = []
            if not waiting:
                break
            run, waiting = self._wait_for_claims(waiting, batch, results)
        yield BatchResult(batch.batch_id, self.replica_id, tuple(results[r.request_id] for r in batch.requests),
                          times)

    def _admitted(self, batch: Batch, stream: bool):
        """Serve ``batch`` once the gate admits it (yields its progress events when streaming); returns its
        result, encoded."""
        ticket = self._gate.enter([r.request_id for r in batch.requests], batch.tokens, len(batch), job=batch.is_job,
                                  request_tokens=[r.tokens for r in batch.requests])
        by_id = {r.request_id: r for r in batch.requests}
        dropped = [by_id[i] for i in ticket.cancelled]
        if ticket.withdrawn:
            return self._cancelled(batch, dropped, ())
        out = None
        try:
            live = batch if not dropped else replace(batch, requests=tuple(by_id[i] for i in ticket.live_ids))
            if stream:
                for item in super().run_batch_stream(live):
                    if isinstance(item, StepProgress):
                        yield self._encoder.encode_previews(item, by_id)
                    else:
                        out = item
            else:
                out = super().run_batch(live)
        finally:
            self._gate.leave(ticket)
        if out is None:
            return self._cancelled(batch, dropped, ())
        results = self._encoder.encode_results(out.results, by_id)
        if dropped:
            return self._cancelled(batch, dropped, results, out.stage_times)
        return replace(out, results=results)

    def _cancelled(self, batch: Batch, dropped, results, times: StageTimes | None = None) -> BatchResult:
        done = {r.request_id: r for r in results}
        for r in dropped:
            done[r.request_id] = self._failure(batch, r, "cancelled by the client", FailureKind.CANCELLED)
        if batch.requests and not any(r.request_id in done for r in batch.requests):
            done = {r.request_id: self._failure(batch, r, "cancelled by the client", FailureKind.CANCELLED)
                    for r in batch.requests}
        return BatchResult(batch.batch_id, self.replica_id, tuple(done[r.request_id] for r in batch.requests),
                           times or StageTimes())

    # ---- keyed images ---------------------------------------------------------------------------------------
    def _claimant(self) -> tuple[str, int]:
        return (str(self.replica_id), os.getpid())

    def _count(self, what: str) -> None:
        with self._claim_lock:
            self.claim_counts[what] += 1

    def _claim(self, requests, count: bool = True) -> dict[str, tuple[str, ImageResult | None]]:
        out: dict[str, tuple[str, ImageResult | None]] = {}
        if self._results is None:
            return out
        for r in requests:
            if not r.result_key:
                continue
            try:
                out[r.request_id] = self._results.claim(r.result_key, self._claimant())
            except Exception as e:  # noqa: BLE001 - the store down must not stop serving: run it, unguarded
                self._count("store_errors")
                log.warning("replica %s: result store unreachable for request %s (%s); running it unguarded",
                            self.replica_id, r.request_id, e)
                out[r.request_id] = ("run", None)
            if count or out[r.request_id][0] != "wait":
                self._count(out[r.request_id][0])
        return out

    def _settle(self, requests, results, failed: bool = False) -> None:
        """Keyed images made here go to the store; a failed one's claim is released (a retry may run it).
        ``failed``: the call raised, and each of ``requests`` releases its claim."""
        if self._results is None:
            return
        by_id = {r.request_id: r for r in results}
        for req in requests:
            r = by_id.get(req.request_id)
            if not req.result_key or (r is None and not failed):
                continue
            try:
                if r is not None and r.ok:
                    self._results.deposit(req.result_key, self._claimant(), r)
                else:
                    self._results.release(req.result_key, self._claimant())
            except Exception as e:  # noqa: BLE001 - the answer still goes back to the caller
                self._count("store_errors")
                log.warning("replica %s: could not record request %s in the result store: %s", self.replica_id,
                            req.request_id, e)

    def _wait_for_claims(self, waiting, batch: Batch, results: dict):
        """Ask the store again, every ``CLAIM_POLL_S``, about images another replica is making; returns (those to
        run here now, those still to wait for). A request cancelled meanwhile is answered cancelled."""
        ids = {r.request_id for r in waiting}
        with self._claim_lock:
            self._claim_waiting |= ids
        try:
            while True:
                time.sleep(CLAIM_POLL_S)
                with self._claim_lock:
                    gone = self._claim_cancelled.intersection(r.request_id for r in waiting)
                    self._claim_cancelled -= gone
                for r in waiting:
                    if r.request_id in gone:
                        results[r.request_id] = self._failure(batch, r, "cancelled by the client",
                                                              FailureKind.CANCELLED)
                waiting = [r for r in waiting if r.request_id not in gone]
                run, still = self._by_claim(waiting, self._claim(waiting, count=False), batch, results)
                if run or not still:
                    return run, still
                waiting = still
        finally:
            with self._claim_lock:
                self._claim_waiting -= ids

    def _by_claim(self, requests, claims, batch: Batch, results: dict) -> tuple[list, list]:
        """(the requests to run here, those another replica is making now); the ones made already go into
        ``results``. A request without a claim (no key, or no store) runs here."""
        run, wait = [], []
        for r in requests:
            state, made = claims.get(r.request_id, ("run", None))
            if state == "done":
                results[r.request_id] = self._from_store(made, r, batch)
            elif state == "run":
                run.append(r)
            else:
                wait.append(r)
        return run, wait

    def _from_store(self, made: ImageResult, request, batch: Batch) -> ImageResult:
        """A keyed image made before (maybe by another replica, for another request id) as this request's result."""
        return replace(made, request_id=request.request_id, batch_id=batch.batch_id, batch_size=len(batch))
