"""Idempotency-Key over HTTP on fake replicas that count what they generate (the store in the server's process): a
retry gets the recorded answer with nothing generated, a retry while the first runs waits for it, the same key with
another body is a 422 naming the header, failures are not recorded, keys are scoped per API key; edits too. Then the
edges: streamed calls, calls and replica calls that raise, what the store may evict, answers of image links. (The
pool-wide store, replicas claiming keyed images and a front door killed under load: test_frontdoors.py.)"""

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


BODY = {"prompt": "a red fox", "size": "64x64", "n": 2, "seed": 5}


def post(s, body=BODY, key="key-1", **headers):
    if key is not None:
        headers["Idempotency-Key"] = key
    return httpx.post(f"{s.url}/v1/images/generations", json=body, headers=headers, timeout=60)


def test_a_retry_with_the_same_key_gets_the_same_answer_and_generates_nothing(tmp_path):
    backend = TimedBackend(2)
    with serve(tmp_path, backend) as s:
        s.wait_ready(30)
        first = post(s)
        assert first.status_code == 200 and len(backend.generated) == 2
        again = post(s, body={"seed": 5, "n": 2, "size": "64x64", "prompt": "a red fox"})  # same body, reordered
        assert again.status_code == 200 and again.content == first.content
        assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
        assert len(backend.generated) == 2
        assert post(s, key=None).status_code == 200 and len(backend.generated) == 4  # no key: a new call


def test_the_same_key_with_another_body_is_refused_naming_the_header(tmp_path):
    with serve(tmp_path, TimedBackend(1)) as s:
        s.wait_ready(30)
        assert post(s).status_code == 200
        r = post(s, body={**BODY, "prompt": "a blue fox"})
        assert r.status_code == 422
        err = r.json()["error"]
        assert err["param"] == "Idempotency-Key" and err["code"] == "idempotency_key_reused"
        assert "different request" in err["message"] and "new Idempotency-Key" in err["message"]
        bad = post(s, key="has spaces in it")
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "Idempotency-Key"
        assert "visible ASCII" in bad.json()["error"]["message"]


def test_a_retry_while_the_first_call_runs_waits_for_it(tmp_path):
    backend = TimedBackend(1, base_s=0.6)
    with serve(tmp_path, backend) as s:
        s.wait_ready(30)
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("first", post(s)))
        t.start()
        while not backend.made["r0"].batches:  # the first call is running
            threading.Event().wait(0.02)
        second = post(s)
        t.join(30)
        assert out["first"].status_code == second.status_code == 200
        assert second.content == out["first"].content and len(backend.generated) == 2


def test_a_failed_call_is_not_recorded_so_its_retry_runs(tmp_path):
    backend = TimedBackend(1)
    with serve(tmp_path, backend) as s:
        s.wait_ready(30)
        backend.made["r0"].fail_prompts.add("doomed")
        body = {"prompt": "doomed", "size": "64x64", "seed": 1}
        assert post(s, body, key="k2").status_code == 500
        backend.made["r0"].fail_prompts.clear()
        ok = post(s, body, key="k2")
        assert ok.status_code == 200 and "idempotent-replayed" not in ok.headers
        assert backend.generated.count("doomed") == 2


def test_keys_belong_to_their_api_key(tmp_path):
    backend = TimedBackend(1)
    with serve(tmp_path, backend, api_keys=["sk-one", "sk-two"]) as s:
        r = httpx.get(f"{s.url}/readyz")
        while r.status_code != 200:
            r = httpx.get(f"{s.url}/readyz")
        one = post(s, Authorization="Bearer sk-one")
        two = post(s, Authorization="Bearer sk-two")
        assert one.status_code == two.status_code == 200 and "idempotent-replayed" not in two.headers
        assert len(backend.generated) == 4
        assert post(s, Authorization="Bearer sk-one").headers["idempotent-replayed"] == "true"
        for spelling in ("bearer sk-one", "Bearer  sk-one", "BEARER sk-one"):  # the same key, as the check reads it
            assert post(s, Authorization=spelling).headers["idempotent-replayed"] == "true", spelling
        assert len(backend.generated) == 4


def test_edits_are_keyed_by_their_fields_and_file_bytes(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    def png(value):
        buf = io.BytesIO()
        Image.fromarray(np.full((64, 64, 3), value, np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    backend = TimedBackend(1)
    with serve(tmp_path, backend) as s:
        s.wait_ready(30)

        def edit(image, key="edit-key"):
            return httpx.post(f"{s.url}/v1/images/edits", data={"prompt": "make it blue", "seed": "3"},
                              files={"image": ("a.png", image, "image/png")},
                              headers={"Idempotency-Key": key}, timeout=60)

        first = edit(png(10))
        assert first.status_code == 200, first.text
        again = edit(png(10))  # a new multipart boundary, the same fields and bytes
        assert again.content == first.content and again.headers["idempotent-replayed"] == "true"
        other = edit(png(11))
        assert other.status_code == 422 and other.json()["error"]["param"] == "Idempotency-Key"
        assert len(backend.generated) == 1


# ---- edges ---------------------------------------------------------------------------------------------------
ONE = {**BODY, "n": 1}


# ---- streaming calls ------------------------------------------------------------------------------------------
def test_stream_key_reused_with_another_body_is_refused(tmp_path):
    """idempotency.py: 'the same key with another body is refused: 422', for a streamed call too: its key is kept
    through its stream and after it (not forgotten once the response object is returned)."""
    with serve(tmp_path, TimedBackend(1)) as s:
        s.wait_ready(30)
        first = post(s, {**ONE, "stream": True}, "stream-key")
        assert first.status_code == 200 and "[DONE]" in first.text
        other = post(s, {**ONE, "prompt": "a blue fox"}, "stream-key")  # another body, same key
        assert other.status_code == 422, (other.status_code, other.text[:200])


def test_stream_retry_with_same_key_and_body_does_not_generate_again_without_ray(tmp_path):
    """idempotency.py: 'A streaming call's images are deduplicated the same way' (without Ray: the retry waits
    for the first call, never generates twice): the finished stream is the key's answer, replayed to the retry."""
    backend = TimedBackend(1)
    with serve(tmp_path, backend) as s:
        s.wait_ready(30)
        body = {**ONE, "stream": True}
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
