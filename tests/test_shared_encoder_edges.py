"""Edges of the shared text-encoder path (deployment mode ``shared-encoder``): a borrowing replica (no text encoder
of its own) encodes through its host's ``encode``. In this process, with the tiny fp32 model on the CPU; where Ray
sits between the two replicas, ``RemoteEncoder`` runs over a stand-in for the actor call (a thread of the host's
with a context of its own, as a Ray actor's call has). Ray itself is never started."""

import contextvars
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import started_tiny_worker

from actors.worker import PipelineWorker, WarmupSpec
from zimage_common.config import ModelConfig
from zimage_common.cpu_priority import WORK_PRIORITY
from zimage_common.errors import ReplicaUnavailableError
from zimage_common.messages import BATCH_JOB, INTERACTIVE, Batch, ImageRequest


def _borrower(cache, encoder, replica_id="b1"):
    w = PipelineWorker(replica_id, ModelConfig(source="tiny", dtype="float32", cache_dir=cache),
                       device_map={"transformer": 0, "vae": 0}, warmup=WarmupSpec(((32, 32),), 1), torch_threads=1,
                       max_batch_tokens=1 << 20, max_batch_size=16, encoder=encoder)
    w.start()
    assert w.engine.text_encoder is None  # it really borrows
    return w


def _wait_for(cond, what, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.fixture(scope="module")
def host(tiny_cache):
    return started_tiny_worker(tiny_cache, "h0")


class _Switchable:
    """The borrower's encoder: the host's ``encode`` until ``lost`` is set, then a host that is gone (what
    ``RemoteEncoder`` raises once its wait for the host runs out: ``EncoderUnavailable``, a
    ``ReplicaUnavailableError``). Counts the asks."""

    def __init__(self, host):
        self.host = host
        self.lost = False
        self.asks: list[list[str]] = []
        self._lock = threading.Lock()

    def __call__(self, prompts, negative_prompts, guidance):
        with self._lock:
            self.asks.append(list(prompts))
        if self.lost:
            raise ReplicaUnavailableError("shared text encoder on h0 unavailable: the actor died")
        return self.host.encode(prompts, negative_prompts, guidance)


def test_lost_host_is_asked_once_per_shared_encode_not_again_for_every_waiting_call(host, tiny_cache):
    """A lost host is nothing one call's prompts did: SharedEncodes' per-call fallback exists so that a bad prompt
    never fails another call. Asking the lost host again per call makes each of them wait out ``RemoteEncoder``'s
    whole ``wait_s`` (60 s) again, one after another on the encode stage (with k calls batched the last would fail
    as replica_lost only after (k + 1) x 60 s, and the borrower's every other call, its screening on that stage too,
    would wait behind): every waiting call fails with the shared attempt's error at once."""
    enc = _Switchable(host)
    b = _borrower(tiny_cache, enc)
    ok = b.run_batch(Batch(1, (ImageRequest("warm", "a red fox", 1, 32, 32, 2, 0.0),)))
    assert ok.results[0].ok, ok.results[0].error
    enc.lost = True
    enc.asks.clear()

    release = threading.Event()
    b._stages.submit("encode", release.wait)  # the encode stage busy: the three calls' prompts wait together
    shared = b._encodes
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(shared, [f"prompt {i}"], [None], [0.0]) for i in range(3)]
        _wait_for(lambda: len(shared._waiting) == 3, "the three calls did not start waiting")
        release.set()
        errors = []
        for f in futures:
            with pytest.raises(ReplicaUnavailableError) as e:
                f.result(timeout=60)
            errors.append(e.value)
    assert len(enc.asks) == 1, f"the lost host was asked {len(enc.asks)} times for one shared encode: {enc.asks}"

    # and a call on the borrower comes back replica_lost (the router retries it elsewhere)
    out = b.run_batch(Batch(2, (ImageRequest("q", "a lighthouse", 2, 32, 32, 2, 0.0),)))
    assert out.results[0].error_type == "replica_lost"


class _FakeRayActor:
    """What ``RemoteEncoder`` holds: ``actor.encode.remote(...)`` runs the host's ``encode`` on a thread of the
    host's, in a context of its own (a Ray actor's call carries nothing of the caller's context variables); the
    ``ray.get`` stand-in waits for it."""

    def __init__(self, worker):
        self.worker = worker
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="fake-ray-actor")
        outer = self

        class _Method:
            def remote(self, *args):
                return outer._pool.submit(contextvars.Context().run, outer.worker.encode, *args)

        self.encode = _Method()


def test_a_borrowers_batch_job_encode_does_not_jump_the_hosts_interactive_work(host, tiny_cache, monkeypatch):
    """Stage queues run the most urgent work first: 'an interactive decode never queues behind a batch job's'
    (actors/stages.py, cpu_priority.py). A borrower's batch-job call encodes on the host through
    ``RemoteEncoder``, which must pass its priority: served at the actor thread's default, INTERACTIVE, the job's
    encode would run ahead of the host's own interactive call waiting on its encode stage (its screening), and at
    interactive CPU niceness."""
    import actors.screening as screening
    from orchestrator import ray_backend

    monkeypatch.setattr(ray_backend.ray, "get", lambda ref, *a, **k: ref.result())
    remote = ray_backend.RemoteEncoder(_FakeRayActor(host), "h0", wait_s=5.0)
    b = _borrower(tiny_cache, remote, "b2")

    order: list[str] = []
    real_stage = host.engine.encode_stage

    def encode_stage(prompts, negative_prompts, guidance):
        order.append("encode " + ",".join(prompts) + f" @priority {WORK_PRIORITY.get()}")
        return real_stage(prompts, negative_prompts, guidance)

    real_screen = screening.screen

    def screen(engine, batch):
        if engine is host.engine:
            order.append("host screen " + ",".join(r.request_id for r in batch.requests))
        return real_screen(engine, batch)

    monkeypatch.setattr(host.engine, "encode_stage", encode_stage)
    monkeypatch.setattr(screening, "screen", screen)

    release = threading.Event()
    host._stages.submit("encode", release.wait)
    _wait_for(lambda: host._stages._queues["encode"].qsize() == 0, "the host's encode stage did not take the blocker")
    job = ImageRequest("job1", "a batch job prompt", 5, 32, 32, 2, 0.0, priority=BATCH_JOB)
    mine = ImageRequest("int1", "an interactive prompt", 6, 32, 32, 2, 0.0, priority=INTERACTIVE)
    with ThreadPoolExecutor(2) as pool:
        job_call = pool.submit(b.run_batch, Batch(10, (job,)))
        # the borrower's job prompts reach the host's encode stage first...
        _wait_for(lambda: host._stages._queues["encode"].qsize() == 1, "the borrower's encode never reached the host")
        # ...then the host's own interactive call queues its screening there
        host_call = pool.submit(host.run_batch, Batch(11, (mine,)))
        _wait_for(lambda: host._stages._queues["encode"].qsize() == 2, "the host's call never queued its screening")
        release.set()
        assert job_call.result(timeout=60).results[0].ok
        assert host_call.result(timeout=60).results[0].ok
    first_job = next(i for i, e in enumerate(order) if "a batch job prompt" in e)
    assert order.index("host screen int1") < first_job, order
