"""Edges of the replica's step loop and serving path: a call whose slowest sample is cancelled after the rest
finished, a cancel while the call waits for screening, the loop's log context, the gate's counts of cancelled
requests, the loop's waiting count once it idles."""

import logging
import threading
import time

import pytest
import torch
from conftest import started_tiny_worker

from tests.test_steploop import CountingLoop, Streamed
from zimage_common.messages import Batch, ImageRequest


@pytest.fixture(scope="module")
def worker(tiny_cache):
    return started_tiny_worker(tiny_cache, "rv")


# ---- Group reporting: the last step of a call's surviving samples ------------------------------------------------
def test_a_call_whose_slowest_sample_is_cancelled_after_the_rest_finished_still_reports_its_last_step():
    """A call's samples may run apart (the sample cap, the token budget, an out-of-memory shrink put the later ones
    back to wait). ``Group.report`` holds its progress at the slowest sample; when that one is cancelled after the
    others are done, no step of the call runs again: its last step (the event a streaming caller waits for, and
    ``StepHook``'s final non-finite check) must still be reported, or the surviving image is answered unchecked."""
    f = CountingLoop(max_samples=1)
    seen = []
    g = f.group("x", 1, 3, n=2, on_step=lambda step, total, denoised: seen.append((step, total)))
    f.loop.submit(g, start=False)
    f.run_until(lambda: g.samples[0].done)  # x0 ran its 3 steps alone; x1 waits for the cap
    assert f.steps == [["x0"]] * 3 and not g.samples[1].cancelled
    f.loop.cancel({"x1"})
    f.run_until(g.done.is_set)
    assert g.error is None and [s.cancelled for s in g.samples] == [False, True]
    assert seen and seen[-1] == (3, 3), f"the call's last step was never reported: {seen}"


def test_streamed_call_split_by_an_oom_shrink_then_half_cancelled_still_gets_its_final_event_and_check(worker):
    """The same through ``run_batch_stream``: two requests of one call (two clients' images batched together);
    their first shared step runs out of memory, so ``ob`` goes back to wait while ``oa`` runs alone; ``ob``'s client
    goes away during ``oa``'s last step. ``oa`` diverges (NaN) at its last step here: its stream must get its last
    step's event, and the final non-finite check must fail it alone with ``request_error`` (not answer it ``ok``)."""
    a = ImageRequest("oa", "a red fox", 1, 32, 32, 4, 0.0)
    b = ImageRequest("ob", "a blue jay", 2, 32, 32, 4, 0.0)
    loop = worker._step_loop()
    cancelled: list[int] = []

    def fault(names):
        if len(names) > 1:
            raise RuntimeError("CUDA out of memory (injected)")
        (sa,) = [s for s in loop._running if s.name == "oa"]
        if names == ["oa"] and sa.step == 3 and not cancelled:  # oa's last step, run alone while ob waits
            sa.latents = torch.full_like(sa.latents, float("nan"))  # it diverges
            cancelled.append(worker.cancel(["ob"]))

    loop.fault = fault
    try:
        run = Streamed(worker, Batch(1, (a, b)))
        out = run.join()
    finally:
        loop.fault = worker._loop_fault
        loop._oom_cap = None
    assert cancelled == [1] and out.results[1].error_type == "cancelled"
    assert [e.step for e in run.events][-1:] == [4], [e.step for e in run.events]
    assert out.results[0].error_type == "request_error", out.results[0]


# ---- cancels that the replica loses --------------------------------------------------------------------------------
def test_a_cancel_while_the_call_waits_for_screening_on_the_encode_stage_is_not_lost(worker):
    """A call past the admission gate is screened on the encode stage's thread, behind whatever that thread runs
    (other calls' encodes). A cancel then must still find it (its ids are in ``_encoding`` from the start of the
    call), or ``cancel`` answers 0 and the request runs all its steps for nobody."""
    release = threading.Event()
    started = threading.Event()

    def busy():  # another call's encode holding the stage
        started.set()
        assert release.wait(30)

    worker._stages.submit("encode", busy)
    assert started.wait(10)
    run = Streamed(worker, Batch(2, (ImageRequest("scr", "a harbour at dusk", 3, 32, 32, 6, 0.0),)))
    try:
        deadline = time.monotonic() + 10
        while worker._stages._queues["encode"].qsize() < 1:  # its screening is queued behind busy()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        found = worker.cancel(["scr"])
    finally:
        release.set()
    out = run.join()
    assert found == 1 and out.results[0].error_type == "cancelled", (found, out.results[0])


# ---- the loop thread's log context ---------------------------------------------------------------------------------
def test_the_step_loops_log_lines_do_not_carry_the_first_calls_request_ids(worker):
    """The loop is started on the denoise stage through ``StageThreads.submit``, which runs it in a copy of the first
    caller's context unless it is given one of its own: that call's ``logs_batch`` request ids would then stamp every
    later log line of the loop (a failed step, an out-of-memory shrink), not the call it is about."""
    from zimage_common.logging_setup import ContextFilter

    worker.run_batch(Batch(3, (ImageRequest("first-call", "warm", 4, 32, 32, 1, 0.0),)))  # the loop runs by now
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    h = Keep(level=logging.WARNING)
    h.addFilter(ContextFilter())
    steplog = logging.getLogger("actors.steploop")
    steplog.addHandler(h)
    loop = worker._step_loop()

    def fault(names):
        if "later-call" in names:
            raise RuntimeError("a model bug this input triggers")

    loop.fault = fault
    try:
        out = worker.run_batch(Batch(4, (ImageRequest("later-call", "boom", 5, 32, 32, 2, 0.0),)))
    finally:
        loop.fault = worker._loop_fault
        steplog.removeHandler(h)
    assert not out.results[0].ok
    failed = [r for r in records if "failed" in r.getMessage()]
    assert failed, [r.getMessage() for r in records]
    # about later-call (or about no call in particular), never stamped with another call's ids
    assert all(r.request_id in (None, "later-call") for r in failed), [(r.request_id, r.getMessage()) for r in failed]


# ---- the replica's admission gate ----------------------------------------------------------------------------------
def test_gate_counts_drop_the_requests_cancelled_while_their_call_waited():
    """The docstring: a call's cancelled requests leave it while it waits and "the others enter without the
    cancelled ones": ``queue_len`` (what routers compare) must not count a cancelled sample as waiting, nor, once the
    call enters, as inside."""
    from actors.admission import AdmissionGate, AdmissionLimits

    gate = AdmissionGate(AdmissionLimits(samples=1))
    first = gate.enter(["x"], 10, 1)
    entered = []
    t = threading.Thread(target=lambda: entered.append(gate.enter(["a", "b"], 20, 2)), daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while gate.snapshot().waiting_calls < 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert gate.cancel(["b"]) == {"b"}
    assert gate.queue_len() == 2, gate.queue_len()  # x inside, a waiting: b is gone
    gate.leave(first)
    t.join(10)
    assert entered and entered[0].live_ids == ("a",)
    assert gate.snapshot().samples == 1 and gate.snapshot().tokens == 10, gate.snapshot()


# ---- LoopStats -----------------------------------------------------------------------------------------------------
def test_loop_stats_waiting_is_zero_once_the_loop_idles_after_a_waiting_sample_was_cancelled():
    f = CountingLoop(max_samples=1)
    g = f.group("x", 1, 2, n=2)
    f.loop.submit(g, start=False)
    f.loop._guarded(wait=False)  # x0 steps, x1 waits
    assert f.loop.stats.waiting == 1
    f.loop._guarded(wait=False)  # x0's last step
    f.loop.cancel({"x1"})
    f.loop._guarded(wait=False)  # x1 leaves, the call is answered; nothing left: the loop idles
    assert g.done.is_set() and not f.loop._waiting and not f.loop._running
    assert f.loop.stats.waiting == 0, f.loop.stats


def test_a_streamed_call_that_raises_raises_its_own_error(worker, monkeypatch):
    """``run_batch_stream`` raises what serving raised, as ``run_batch`` does (it used to end in an IndexError that
    hid the cause)."""
    def broken(batch, emit=None):
        raise RuntimeError("the stage thread died")

    monkeypatch.setattr(worker, "_serve_call", broken)
    with pytest.raises(RuntimeError, match="the stage thread died"):
        list(worker.run_batch_stream(Batch(70, (ImageRequest("sx", "x", 1, 32, 32, 1, 0.0),))))
