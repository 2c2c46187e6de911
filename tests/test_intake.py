"""A replica's intake (actors/intake.py) over fake serving paths: encoding near the GPUs, keyed images made once
across replicas through a shared store, admission within the replica's budget under concurrent callers, cancels
while waiting. No Ray, no torch: the serving paths below stand in for ``ServingMixin``."""

import threading
import time

import numpy as np

from actors.admission import AdmissionLimits
from actors.intake import IntakeMixin, IntakeSpec
from orchestrator.idempotency_store import IdempotencyStore
from zimage_common.image_codec import EncodedImage, encode_image
from zimage_common.messages import Batch, BatchResult, FailureKind, ImageRequest, ImageResult, StageTimes, StepProgress


def pixels(seed, size=32):
    rng = np.random.default_rng(seed)
    return (rng.random((size, size, 3)) * 255).astype(np.uint8)


class FakeServing:
    """Stands in for ``ServingMixin``: each image is a function of its seed; counts what it generates."""

    def __init__(self, replica_id, delay_s=0.0):
        self.replica_id = replica_id
        self.delay_s = delay_s
        self.generated = []  # request ids, in the order their images were made
        self.fail = set()  # prompts whose request fails
        self.batches_run = self.images_run = 0
        self.cancelled = []

    def run_batch(self, batch):
        time.sleep(self.delay_s)
        results = []
        for r in batch.requests:
            if r.prompt in self.fail:
                results.append(self._failure(batch, r, "fake failure", FailureKind.REPLICA_ERROR))
                continue
            self.generated.append(r.request_id)
            results.append(ImageResult(r.request_id, True, self.replica_id, batch.batch_id, len(batch), r.seed,
                                       r.width, r.height, image=pixels(r.seed, r.width)))
        self.batches_run += 1
        self.images_run += len(batch)
        return BatchResult(batch.batch_id, self.replica_id, tuple(results), StageTimes(total_s=self.delay_s))

    def run_batch_stream(self, batch):
        yield StepProgress(batch.batch_id, 1, 2, previews=tuple(
            (r.request_id, 0, pixels(r.seed + 1000, r.width)) for r in batch.requests if r.partial_images))
        yield self.run_batch(batch)

    def cancel(self, request_ids):
        self.cancelled.extend(request_ids)
        return 0

    def _failure(self, batch, r, error, kind, **fields):
        return ImageResult(request_id=r.request_id, ok=False, replica_id=self.replica_id, batch_id=batch.batch_id,
                           batch_size=len(batch), seed=r.seed, error=error, error_type=kind, **fields)


class Replica(IntakeMixin, FakeServing):
    def __init__(self, replica_id="r0", store=None, limits=None, delay_s=0.0):
        FakeServing.__init__(self, replica_id, delay_s)
        self._intake_setup(IntakeSpec(limits or AdmissionLimits(), encode_threads=2), store)


def req(i, fmt=None, compression=None, key="", prompt="p", partial=0):
    return ImageRequest(f"q{i}", prompt, i, 32, 32, 2, 0.0, partial_images=partial, output_format=fmt,
                        output_compression=compression, result_key=key)


def test_results_come_back_encoded_as_their_requests_asked_byte_for_byte_as_the_front_door_would():
    rep = Replica()
    out = rep.run_batch(Batch(1, (req(1, "png"), req(2, "jpeg", 70), req(3, "webp"), req(4))))
    png, jpeg, webp, raw = out.results
    for r, fmt, q in ((png, "png", None), (jpeg, "jpeg", 70), (webp, "webp", None)):
        assert r.ok and r.image is None and isinstance(r.encoded, EncodedImage)
        assert r.encoded.data == encode_image(pixels(r.seed), fmt, q) and r.encoded.format == fmt
    assert raw.encoded is None and np.array_equal(raw.image, pixels(4))  # the Python API's path: pixels
    assert np.array_equal(png.pixels(), pixels(1)) and png.png == png.encoded.data
    assert rep.intake_stats()["encoder"]["images"] == 3


def test_previews_are_encoded_too_when_streaming():
    rep = Replica()
    items = list(rep.run_batch_stream(Batch(2, (req(1, "png", partial=1), req(2, partial=1)))))
    progress, result = items
    (rid1, _, p1), (rid2, _, p2) = progress.previews
    assert (rid1, rid2) == ("q1", "q2")
    assert isinstance(p1, EncodedImage) and p1.data == encode_image(pixels(1001), "png")
    assert isinstance(p2, np.ndarray)  # its request named no format
    assert isinstance(result, BatchResult) and result.results[0].encoded is not None


def test_a_keyed_image_is_made_once_across_replicas_and_handed_to_a_retry_under_its_request_id():
    store = IdempotencyStore()
    a, b = Replica("r0", store), Replica("r1", store)
    first = a.run_batch(Batch(1, (req(1, "png", key="k:0"), req(2, "png", key="k:1"))))
    retry = b.run_batch(Batch(7, (ImageRequest("again-0", "p", 1, 32, 32, 2, 0.0, output_format="png",
                                               result_key="k:0"), req(9, "png"))))
    assert a.generated == ["q1", "q2"] and b.generated == ["q9"]  # only the unkeyed request ran on b
    got = retry.results[0]
    assert got.ok and got.request_id == "again-0" and got.batch_id == 7 and got.replica_id == "r0"
    assert got.encoded.data == first.results[0].encoded.data
    assert b.intake_stats()["claims"] == {"run": 0, "done": 1, "wait": 0, "store_errors": 0}


def test_a_retry_arriving_while_another_replica_makes_the_image_waits_for_it():
    store = IdempotencyStore()
    slow, other = Replica("r0", store, delay_s=0.4), Replica("r1", store)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("first", slow.run_batch(Batch(1, (req(1, "png", key="k"),)))))
    t.start()
    time.sleep(0.1)
    retry = other.run_batch(Batch(2, (ImageRequest("r", "p", 1, 32, 32, 2, 0.0, output_format="png",
                                                   result_key="k"),)))
    t.join(5)
    assert slow.generated == ["q1"] and other.generated == []
    assert retry.results[0].encoded.data == out["first"].results[0].encoded.data
    assert other.intake_stats()["claims"]["wait"] == 1


def test_a_failed_keyed_image_releases_its_claim_so_a_retry_runs_it():
    store = IdempotencyStore()
    a, b = Replica("r0", store), Replica("r1", store)
    a.fail.add("bad")
    assert not a.run_batch(Batch(1, (req(1, key="k", prompt="bad"),))).results[0].ok
    assert b.run_batch(Batch(2, (req(1, key="k", prompt="bad2"),))).results[0].ok
    assert b.generated == ["q1"]


def test_with_the_store_unreachable_keyed_images_still_run():
    class Down:
        def claim(self, *a):
            raise ConnectionError("store down")

        deposit = release = claim

    rep = Replica("r0", Down())
    assert rep.run_batch(Batch(1, (req(1, key="k"),))).results[0].ok
    assert rep.intake_stats()["claims"]["store_errors"] == 2  # the claim, then the deposit


def test_callers_from_several_front_doors_are_held_to_the_replica_budget():
    rep = Replica(limits=AdmissionLimits(calls=1, tokens=10_000, samples=2), delay_s=0.02)
    results = []

    def door(d):
        for i in range(4):
            batch = Batch(d * 10 + i, (req(d * 100 + i), req(d * 100 + 50 + i)))
            results.append(rep.run_batch(batch))

    doors = [threading.Thread(target=door, args=(d,)) for d in range(3)]
    for t in doors:
        t.start()
    for t in doors:
        t.join(20)
    g = rep.intake_stats()["gate"]
    assert len(results) == 12 and all(r.ok for out in results for r in out.results)
    assert g["peak_calls"] == 1 and g["peak_samples"] == 2 and g["admitted_total"] == 12 and g["waited_total"] > 0
    assert rep.queue_len() == 0


def test_a_call_cancelled_while_it_waits_at_the_gate_is_answered_cancelled_without_running():
    rep = Replica(limits=AdmissionLimits(calls=1), delay_s=0.3)
    out = {}
    first = threading.Thread(target=lambda: out.setdefault("a", rep.run_batch(Batch(1, (req(1),)))))
    first.start()
    time.sleep(0.05)
    second = threading.Thread(target=lambda: out.setdefault("b", rep.run_batch(Batch(2, (req(2), req(3))))))
    second.start()
    time.sleep(0.05)
    assert rep.queue_len() == 3 and rep.queue_lens() == (3, 3)
    assert rep.cancel(["q2", "q3"]) == 2
    second.join(5)
    first.join(5)
    assert [r.error_type for r in out["b"].results] == [FailureKind.CANCELLED] * 2
    assert rep.generated == ["q1"] and rep.cancelled == []  # never reached the serving paths


def test_the_gate_books_interactive_and_job_calls_as_the_router_does():
    """A job's calls fill the gate; an interactive call still enters at once (it counts only interactive calls
    inside), even past a job call waiting ahead of it; the job's call enters once the job's room is back."""
    from actors.admission import AdmissionGate

    gate = AdmissionGate(AdmissionLimits(calls=2, tokens=100, samples=4))
    jobs = [gate.enter([f"j{i}"], 50, 2, job=True, timeout_s=1) for i in range(2)]
    entered = []
    waiting_job = threading.Thread(target=lambda: entered.append(gate.enter(["j2"], 50, 2, job=True)))
    waiting_job.start()
    time.sleep(0.05)
    assert entered == [] and gate.snapshot().waiting_calls == 1  # the job's room is full
    assert gate.queue_lens() == (0, 6)  # (interactive, all) samples waiting and inside: no interactive work
    live = [gate.enter([f"live{i}"], 50, 2, timeout_s=0.5) for i in range(2)]  # past the waiting job call
    assert all(t.admitted for t in live) and gate.snapshot().calls == 4
    assert gate.queue_lens() == (4, 10) and gate.queue_len() == 10
    assert not gate._fits(gate._queue[0])  # everything inside counts against the job's call
    for t in jobs + live:
        gate.leave(t)
    waiting_job.join(1)
    assert [t.request_ids for t in entered] == [("j2",)]
