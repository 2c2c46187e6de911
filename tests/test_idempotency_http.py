"""Idempotency-Key over HTTP on fake replicas that count what they generate (the store in the server's process):
a retry gets the recorded answer with nothing generated, a retry while the first runs waits for it, the same key
with another body is a 422 naming the header, failures are not recorded, keys are scoped per API key; edits too.
(The pool-wide store, replicas claiming keyed images and a front door killed under load: test_frontdoors.py.)"""

import threading

import httpx
from batch_fakes import TimedBackend, factory
from conftest import ServerThread, tiny_config

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
