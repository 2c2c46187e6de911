"""``response_format: url`` over HTTP on fake replicas: a plain GET of the link returns the image (generations,
edits, streaming), an expired or tampered link is 403, a failed upload is a 502 in the envelope; and the same
against a real S3 protocol server (moto's standalone server, started here) with presigned URLs."""

import base64
import hashlib
import hmac
import io
import json
import time
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from batch_fakes import TimedBackend, factory
from conftest import ServerThread, tiny_config
from PIL import Image

from orchestrator.server import create_app
from orchestrator.storage import LocalStore, StorageError


def serve(tmp_path, **outputs):
    cfg = tiny_config(tmp_path, outputs={"directory": str(tmp_path / "outputs"), **outputs},
                      batches={"directory": str(tmp_path / "batches")})
    return ServerThread(create_app(cfg, deployment_factory=factory(TimedBackend(2))))


def png_size(data: bytes):
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return img.size


def test_url_round_trip_and_refused_links(tmp_path):
    with serve(tmp_path) as s:
        s.wait_ready(timeout_s=30)
        from openai import OpenAI

        client = OpenAI(base_url=f"{s.url}/v1", api_key="none")
        resp = client.images.generate(prompt="a fox", n=2, size="64x64", response_format="url",
                                      extra_body={"seed": 3})
        assert [d.b64_json for d in resp.data] == [None, None]
        urls = [d.url for d in resp.data]
        assert len(set(urls)) == 2 and all(u.startswith(f"{s.url}/v1/outputs/") for u in urls)
        got = httpx.get(urls[0])  # a plain GET, no API key
        assert got.status_code == 200 and got.headers["content-type"] == "image/png" and png_size(got.content) == (2, 2)

        jpeg = httpx.post(f"{s.url}/v1/images/generations", json={"prompt": "x", "size": "64x64",
                                                                    "response_format": "url", "output_format": "jpeg"})
        link = jpeg.json()["data"][0]["url"]
        assert urlparse(link).path.endswith(".jpeg") and httpx.get(link).headers["content-type"] == "image/jpeg"

        u = urlparse(urls[0])
        key = u.path.removeprefix("/v1/outputs/")
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        tampered = httpx.get(f"{s.url}{u.path}?expires={int(q['expires']) + 3600}&sig={q['sig']}")
        assert tampered.status_code == 403 and "signature" in tampered.json()["error"]["message"]
        secret = (tmp_path / "outputs" / ".signing-key").read_bytes().strip()
        past = int(time.time()) - 5  # signed with the server's own key, but expired
        sig = hmac.new(secret, f"{key}\n{past}".encode(), hashlib.sha256).hexdigest()
        expired = httpx.get(f"{s.url}{u.path}?expires={past}&sig={sig}")
        assert expired.status_code == 403 and "expired" in expired.json()["error"]["message"]
        assert httpx.get(f"{s.url}{u.path}").status_code == 403
        # expires that str.isdigit() takes and int() does not (a superscript, past Python's digit limit): 403s
        for bad in ("%C2%B2", "9" * 5000):
            r = httpx.get(f"{s.url}{u.path}?expires={bad}&sig={q['sig']}")
            assert r.status_code == 403 and "not signed" in r.json()["error"]["message"], r.text
        assert httpx.get(f"{s.url}/v1/outputs/.signing-key?expires=1&sig=x").status_code == 404
        assert httpx.get(f"{s.url}/v1/outputs/..%2F..%2Fetc%2Fpasswd.png?expires=1&sig=x").status_code in (403, 404)

        # streaming: the completed event carries the spec's b64_json, and the link as the extra field url
        with httpx.stream("POST", f"{s.url}/v1/images/generations", timeout=30,
                          json={"prompt": "x", "size": "64x64", "stream": True, "response_format": "url"}) as r:
            events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        done = [e for e in events if e["type"] == "image_generation.completed"]
        assert len(done) == 1 and png_size(base64.b64decode(done[0]["b64_json"])) == (2, 2)
        assert png_size(httpx.get(done[0]["url"]).content) == (2, 2)

        # edits (multipart), as the official client sends them
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="PNG")
        edit = client.images.edit(image=("in.png", buf.getvalue(), "image/png"), prompt="bluer", response_format="url")
        assert httpx.get(edit.data[0].url).status_code == 200


def test_a_failed_upload_is_a_502_and_b64_still_works(tmp_path, monkeypatch):
    def broken(self, key, data, content_type):
        raise StorageError("disk full (injected)")

    monkeypatch.setattr(LocalStore, "put", broken)
    with serve(tmp_path) as s:
        s.wait_ready(timeout_s=30)
        r = httpx.post(f"{s.url}/v1/images/generations", json={"prompt": "x", "size": "64x64",
                                                                 "response_format": "url"})
        err = r.json()["error"]
        assert r.status_code == 502 and err["code"] == "storage_unavailable" and "b64_json" in err["message"]
        assert "injected" not in err["message"]  # the store's own text goes to the log only
        ok = httpx.post(f"{s.url}/v1/images/generations", json={"prompt": "x", "size": "64x64"})
        assert ok.status_code == 200 and png_size(base64.b64decode(ok.json()["data"][0]["b64_json"])) == (2, 2)


def test_url_round_trip_through_s3_presigned_urls(tmp_path, moto_s3):
    with serve(tmp_path, backend="s3", url_ttl_s=600,
               s3={"bucket": "images", "prefix": "gen/", "endpoint_url": moto_s3, "region": "us-east-1",
                   "addressing_style": "path"}) as s:
        s.wait_ready(timeout_s=30)
        r = httpx.post(f"{s.url}/v1/images/generations", json={"prompt": "x", "size": "64x64", "n": 2,
                                                                 "response_format": "url"})
        assert r.status_code == 200, r.text
        for d in r.json()["data"]:
            u = urlparse(d["url"])
            q = parse_qs(u.query)
            assert u.path.startswith("/images/gen/") and q["X-Amz-Expires"] == ["600"] and "X-Amz-Signature" in q
            got = httpx.get(d["url"])
            assert got.status_code == 200 and png_size(got.content) == (2, 2)
        assert not (tmp_path / "outputs").exists()  # nothing written locally


def test_the_s3_bucket_check_lets_write_only_credentials_through():
    """``S3Store.check`` (run before a batch job generates anything): a 403 on HEAD passes (credentials may write
    without listing), a missing bucket does not."""
    boto3 = pytest.importorskip("boto3")
    from botocore.stub import Stubber

    from orchestrator.storage import S3Store

    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s")
    store = S3Store("images", client=client)
    with Stubber(client) as stub:
        stub.add_client_error("head_bucket", service_error_code="403", http_status_code=403)
        store.check()
        stub.add_client_error("head_bucket", service_error_code="404", http_status_code=404)
        with pytest.raises(StorageError, match="s3://images: .*404"):
            store.check()
