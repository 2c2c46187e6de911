"""actors/stages.py: one long-lived thread per stage (pure logic, no model)."""

import contextvars
import threading

import pytest

from actors.stages import STAGES, StageThreads, run_here


@pytest.fixture
def stages():
    s = StageThreads("t")
    yield s
    s.close()


def test_each_stage_runs_on_its_own_thread_whoever_calls(stages):
    names = {stage: stages.run(stage, lambda: threading.current_thread().name) for stage in STAGES}
    assert names == {"encode": "encode-t", "denoise": "denoise-t", "decode": "decode-t"}
    others = []
    threads = [threading.Thread(target=lambda: others.append(stages.run("decode", threading.get_ident)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(others)) == 1 and others[0] != threading.get_ident()  # one decode thread for every caller


def test_a_stage_calling_its_own_stage_runs_in_place_and_may_call_another(stages):
    def denoise():
        assert stages.on("denoise") and not stages.on("decode")
        inner = stages.run("denoise", threading.current_thread)  # re-entrant: no deadlock
        preview = stages.run("decode", lambda: threading.current_thread().name)  # a preview from inside a step
        return inner.name, preview

    assert stages.run("denoise", denoise) == ("denoise-t", "decode-t")


def test_errors_reach_the_caller_with_their_type_and_the_thread_goes_on(stages):
    class Oom(RuntimeError):
        pass

    def fail():
        raise Oom("CUDA out of memory")

    with pytest.raises(Oom, match="out of memory"):
        stages.run("denoise", fail)
    assert stages.run("denoise", lambda x, y=0: x + y, 2, y=3) == 5


def test_the_callers_context_goes_with_the_call(stages):
    var = contextvars.ContextVar("request_id", default=None)
    var.set("req_1")
    assert stages.run("encode", var.get) == "req_1"


def test_run_here_runs_on_the_calling_thread():
    assert run_here("decode", threading.get_ident) == threading.get_ident()


def test_a_failed_calls_arguments_are_freed_with_its_error(stages):
    """The out-of-memory handling frees the CUDA cache right after the error: what the failed call held must be
    gone by then, not kept by a reference cycle until the garbage collector runs."""
    import gc
    import weakref

    class Big:
        pass

    def fail(arg):
        raise RuntimeError("CUDA out of memory")

    gc.disable()
    try:
        arg = Big()
        ref = weakref.ref(arg)
        try:
            stages.run("denoise", fail, arg)
        except RuntimeError:
            pass
        del arg
        assert ref() is None
    finally:
        gc.enable()


def test_submit_queues_on_the_stage_thread_and_returns_at_once(stages):
    """Work the caller does not wait for (the worker's attention plans beside its speed options): ``submit`` returns
    before the call runs, the call runs on the stage's thread, and a later ``run`` on that stage queues behind it."""
    gate, order = threading.Event(), []

    def slow():
        gate.wait(5)
        order.append(("slow", threading.current_thread().name))
        return 7

    fut = stages.submit("denoise", slow)
    assert not fut.done()  # returned while the call waits on the gate
    gate.set()
    stages.run("denoise", lambda: order.append(("next", threading.current_thread().name)))
    assert fut.result(timeout=5) == 7 and order == [("slow", "denoise-t"), ("next", "denoise-t")]
