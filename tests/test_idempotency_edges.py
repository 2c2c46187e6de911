"""Idempotency-Key edges (orchestrator/idempotency.py, idempotency_store.py) and keyed images at a replica
(actors/intake.py): streamed calls, calls and replica calls that raise, and what the store may evict. Each test
states the documented promise it checks."""

import threading

import httpx
import pytest
from batch_fakes import TimedBackend, factory
from conftest import ServerThread, tiny_config

from orchestrator.idempotency import LocalIdempotency, keyed_answer
from orchestrator.idempotency_store import IdempotencyStore
from orchestrator.server import create_app


def serve(tmp_path, backend, **server):
    cfg = tiny_config(tmp_path, outputs={"directory": str(tmp_path / "outputs")},
                      batches={"directory": str(tmp_path / "batches")}, server=server,
                      deployment={"replicas": len(backend.nodes)})
    return ServerThread(create_app(cfg, deployment_factory=factory(backend)))


BODY = {"prompt": "a red fox", "size": "64x64", "n": 1, "seed": 5}


def post(s, body, key):
    return httpx.post(f"{s.url}/v1/images/generations", json=body, headers={"Idempotency-Key": key}, timeout=60)


# ---- streaming calls ------------------------------------------------------------------------------------------
def test_stream_key_reused_with_another_body_is_refused(tmp_path):
    """idempotency.py: 'the same key with another body is refused: 422', for a streamed call too: its key is kept
    through its stream and after it (not forgotten once the response object is returned)."""
    with serve(tmp_path, TimedBackend(1)) as s:
        s.wait_ready(30)
        first = post(s, {**BODY, "stream": True}, "stream-key")
        assert first.status_code == 200 and "[DONE]" in first.text
        other = post(s, {**BODY, "prompt": "a blue fox"}, "stream-key")  # another body, same key
        assert other.status_code == 422, (other.status_code, other.text[:200])


def test_stream_retry_with_same_key_and_body_does_not_generate_again_without_ray(tmp_path):
    """idempotency.py: 'A streaming call's images are deduplicated the same way' (without Ray: the retry waits
    for the first call, never generates twice): the finished stream is the key's answer, replayed to the retry."""
    backend = TimedBackend(1)
    with serve(tmp_path, backend) as s:
        s.wait_ready(30)
        body = {**BODY, "stream": True}
        assert post(s, body, "stream-retry").status_code == 200
        assert post(s, body, "stream-retry").status_code == 200
        assert len(backend.generated) == 1, backend.generated


# ---- a first attempt that raises ------------------------------------------------------------------------------
class _Cfg:
    ttl_s, max_entries, max_bytes, claim_lease_s = 3600, 100, 10**8, 900.0


def _request(headers=()):
    from starlette.requests import Request

    return Request({"type": "http", "method": "POST", "path": "/v1/images/generations", "query_string": b"",
                    "headers": [(k.lower().encode(), v.encode()) for k, v in headers]})


def _call(digest="fp-1"):
    from orchestrator.images_api import ImageCall
    from zimage_common.messages import ImageRequest

    return ImageCall([ImageRequest("q1", "p", 1, 64, 64, 2, 0.0)], body_digest=digest)


async def test_a_first_attempt_that_raises_does_not_poison_the_key():
    """idempotency.py: 'a call that failed is not recorded: a retry runs', also when ``answer`` raises (a render,
    admit or a bug, which the server's handler turns into a 500): the key is not left pending for ttl_s, where
    without Ray every retry would wait wait_s and get 409."""
    from fastapi.responses import Response

    store = LocalIdempotency(_Cfg())
    runs = []

    async def failing(call):
        runs.append(call)
        raise RuntimeError("render failed")

    async def ok(call):
        runs.append(call)
        return Response(b'{"created": 1, "data": []}', media_type="application/json")

    with pytest.raises(RuntimeError):
        await keyed_answer(_request(), _call(), "k1", store, failing, wait_s=0.2)
    retry = await keyed_answer(_request(), _call(), "k1", store, ok, wait_s=0.2)
    assert retry.status_code == 200 and len(runs) == 2, (retry.status_code, bytes(retry.body)[:200])



# ---- keyed images at a replica (actors/intake.py) --------------------------------------------------------------
def test_a_replica_whose_serving_raises_releases_its_claim_so_a_retry_elsewhere_runs():
    """intake.py: 'a failure releases the claim, so a retry may run it', also when the serving path raises (the
    actor call fails and the router retries the request on another replica): the retry runs there at once instead
    of being told WAIT until claim_lease_s (900 s by default)."""
    from test_intake import FakeServing, req

    from actors.intake import IntakeMixin, IntakeSpec
    from orchestrator.idempotency_store import RUN
    from zimage_common.messages import Batch

    class RaisingServing(FakeServing):
        def run_batch(self, batch):  # what ServingMixin.run_batch does when a stage thread or encode raises
            raise RuntimeError("stage thread died")

    class RaisingReplica(IntakeMixin, RaisingServing):
        def __init__(self, replica_id, store):
            RaisingServing.__init__(self, replica_id)
            self._intake_setup(IntakeSpec(), store)

    store = IdempotencyStore(ttl_s=3600, claim_lease_s=900, clock=lambda: 0.0)
    bad = RaisingReplica("r0", store)
    with pytest.raises(RuntimeError):
        bad.run_batch(Batch(1, (req(1, "png", key="call:0"),)))
    # the router's retry lands on r1 (its process alive, r0's too): it should run there now, not wait 900 s
    assert store.claim("call:0", ("r1", 2222))[0] == RUN


def test_a_replicas_own_retry_after_its_serving_raised_runs_instead_of_waiting_for_itself():
    """The same case from the replica that held the claim: a retry routed back to it runs, instead of waiting in
    ``_wait_for_claims`` (no time limit) for a claim of its own process that nothing works on."""
    from test_intake import FakeServing, req

    from actors.intake import IntakeMixin, IntakeSpec
    from zimage_common.messages import Batch

    class OnceRaisingServing(FakeServing):
        raised = False

        def run_batch(self, batch):
            if not self.raised:
                self.raised = True
                raise RuntimeError("stage thread died")
            return super().run_batch(batch)

    class R(IntakeMixin, OnceRaisingServing):
        def __init__(self, replica_id, store):
            OnceRaisingServing.__init__(self, replica_id)
            self._intake_setup(IntakeSpec(), store)

    store = IdempotencyStore()
    rep = R("r0", store)
    with pytest.raises(RuntimeError):
        rep.run_batch(Batch(1, (req(1, "png", key="call:0"),)))
    out = {}
    retry = Batch(2, (req(2, "png", key="call:0"),))
    t = threading.Thread(target=lambda: out.setdefault("retry", rep.run_batch(retry)), daemon=True)
    t.start()
    t.join(2.0)
    stuck = t.is_alive()
    if stuck:
        rep.cancel(["q2"])  # let the waiting thread go
        t.join(5)
    assert not stuck, "the retry on the same replica waited for a claim nobody is working on"
    assert out["retry"].results[0].ok and rep.generated == ["q2"]


# ---- bounds: what may be evicted ------------------------------------------------------------------------------
def test_an_image_being_made_is_not_evicted_by_other_images_filling_the_store():
    """idempotency.py: 'an image made or being made for the first call is handed over, never generated a second
    time': finished images filling max_bytes never push out a claim whose image is still being made (claims are
    taken before the replica's gate, so they can wait long), which would tell the retry's replica to run it."""
    from types import SimpleNamespace

    from orchestrator.idempotency_store import WAIT

    store = IdempotencyStore(ttl_s=3600, max_entries=10_000, max_bytes=1024**2, clock=lambda: 0.0)
    assert store.claim("slow:0", ("r0", 100))[0] == "run"  # r0 is making it (queued at its gate)
    for i in range(8):  # other keyed images finish meanwhile: 8 x ~200 kB > 1 MiB
        other = f"other{i}:0"
        store.claim(other, ("r1", 200))
        store.deposit(other, ("r1", 200), SimpleNamespace(encoded=SimpleNamespace(data=b"x" * 200_000)))
    assert store.claim("slow:0", ("r2", 300))[0] == WAIT  # r0's process is alive and its lease runs


async def test_an_answer_of_image_links_is_replayed_only_while_its_links_work():
    """``response_format: url``: the stored answer's links expire after outputs.url_ttl_s; a replay after that would
    hand out dead links, so the key's answer is kept no longer than they work (the store's own ttl_s otherwise)."""
    from fastapi.responses import Response

    from orchestrator.idempotency_store import DONE, NEW

    now = {"t": 0.0}
    store = LocalIdempotency(_Cfg(), IdempotencyStore(ttl_s=3600, clock=lambda: now["t"]))

    async def ok(call):
        return Response(b'{"created": 1, "data": [{"url": "http://x/v1/outputs/a.png?expires=60"}]}',
                        media_type="application/json")

    assert (await keyed_answer(_request(), _call("fp-url"), "links", store, ok, 0.2, links_ttl_s=60)).status_code == 200
    assert (await keyed_answer(_request(), _call("fp-b64"), "b64", store, ok, 0.2)).status_code == 200
    now["t"] = 59
    assert (await store.begin(":links", "fp-url"))[0] == DONE
    now["t"] = 61
    assert (await store.begin(":links", "fp-url"))[0] == NEW  # its links are dead: a retry runs again
    assert (await store.begin(":b64", "fp-b64"))[0] == DONE  # the store's own ttl_s
