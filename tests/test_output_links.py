"""``response_format: url`` links, their storage and the ops endpoints against hostile or broken input (fake
replicas, no Ray, no network: S3 through botocore's Stubber or a client that is never reached): forged, repeated and
odd signatures and keys, keys that would leave the directory, a signing key file that is not a secret, store
failures, Range requests, and the key-free metrics listener."""

import hashlib
import hmac
import json
import os
import stat
import time
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from batch_fakes import TimedBackend, factory
from conftest import ServerThread, tiny_config

from orchestrator.server import create_app
from orchestrator.storage import LocalStore, S3Store, StorageError, store_for
from zimage_common.jobs_config import OutputsConfig

GEN = "/v1/images/generations"
KEY = "links-key-0123456789"


def serve(tmp_path, outputs=None, **sections):
    cfg = tiny_config(tmp_path, outputs={"directory": str(tmp_path / "outputs"), **(outputs or {})},
                      batches={"directory": str(tmp_path / "batches")}, **sections)
    return ServerThread(create_app(cfg, deployment_factory=factory(TimedBackend(2))))


def link_of(s) -> tuple[str, str, dict]:
    r = httpx.post(f"{s.url}{GEN}", json={"prompt": "x", "size": "64x64", "response_format": "url"})
    assert r.status_code == 200, r.text
    link = r.json()["data"][0]["url"]
    u = urlparse(link)
    return link, u.path, {k: v[0] for k, v in parse_qs(u.query).items()}


def envelope(r: httpx.Response) -> dict:
    assert r.headers.get("content-type", "").startswith("application/json"), (r.status_code, r.headers, r.content)
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    return err


def sign(secret: bytes, key: str, expires: int) -> str:
    return hmac.new(secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("output_links")
    with serve(tmp) as s:
        s.wait_ready(timeout_s=30)
        s.tmp = tmp
        yield s


def test_a_non_ascii_sig_is_a_403_not_a_500(server):
    """``hmac.compare_digest`` raises TypeError on a str with non-ASCII characters, so a sig is compared as ASCII
    bytes: a non-ASCII one is a 403, never a 500."""
    _, path, q = link_of(server)
    r = httpx.get(f"{server.url}{path}?expires={q['expires']}&sig=%C3%A9")
    err = envelope(r)
    assert r.status_code == 403 and err["code"] == "invalid_signature", (r.status_code, err)


def test_an_empty_signing_key_file_is_never_the_hmac_key(tmp_path):
    """An empty ``.signing-key`` (a crash between creating and writing it, by an older server) would make HMAC
    public: anyone could sign a link for any key and any expiry. It is refused: url answers are a 502 and a link
    signed with the empty key is a 403 (the file is written whole under another name now, then linked in)."""
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / ".signing-key").write_bytes(b"")
    with serve(tmp_path) as s:
        s.wait_ready(timeout_s=30)
        r = httpx.post(f"{s.url}{GEN}", json={"prompt": "x", "size": "64x64", "response_format": "url"})
        assert r.status_code == 502 and envelope(r)["code"] == "storage_unavailable", r.text
        key = "20261207/" + "0" * 32 + ".png"
        (tmp_path / "outputs" / "20261207").mkdir()
        (tmp_path / "outputs" / key).write_bytes(b"\x89PNG")
        forever = int(time.time()) + 10 ** 9
        r = httpx.get(f"{s.url}/v1/outputs/{key}?expires={forever}&sig={sign(b'', key, forever)}")
        assert r.status_code == 503 and envelope(r)["code"] == "storage_unavailable", r.text


def test_the_secret_file_is_never_an_empty_key(tmp_path):
    """The same at the unit level: ``store_for`` must refuse (StorageError) or make a real key, never b''."""
    d = tmp_path / "outputs"
    d.mkdir()
    (d / ".signing-key").write_bytes(b"\n")
    try:
        store = store_for(OutputsConfig(directory=d))
    except StorageError:
        return
    assert len(store.secret) >= 16, store.secret


def test_a_range_the_file_cannot_serve_gets_the_whole_image_not_a_plain_text_error(server):
    """Every error is in OpenAI's envelope; Starlette's file response answered a malformed Range with a text/plain
    400 and an unsatisfiable one with an empty 416. Ranges are ignored now: the whole image."""
    link, _, _ = link_of(server)
    bad = []
    for rng in ("bytes=abc", "bytes=5-2", "items=0-1", "bytes=99999-"):
        r = httpx.get(link, headers={"Range": rng})
        if r.status_code not in (200, 206):
            try:
                envelope(r)
            except (AssertionError, ValueError, KeyError):
                bad.append((rng, r.status_code, r.headers.get("content-type"), r.content[:60]))
    assert not bad, bad


def test_head_on_a_link_gives_the_images_headers_without_its_bytes_and_checks_the_signature(server):
    """A link answered HEAD with a 405 (curl -I, link checkers and caches ask HEAD first)."""
    link, path, q = link_of(server)
    got = httpx.get(link)
    head = httpx.head(link)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"] == "image/png"
    assert int(head.headers["content-length"]) == len(got.content) > 0
    r = httpx.head(f"{server.url}{path}?expires={q['expires']}&sig={'0' * 64}")
    assert r.status_code == 403 and r.content == b""


def test_a_signed_dot_dot_key_stays_inside_the_directory(server):
    """A served key never names a path outside the directory, even signed with the server's own secret: no segment
    may start with a dot, the whole key must match, and the resolved path must lie inside."""
    store = LocalStore(server.tmp / "outputs", b"k" * 32, 3600)
    accepted = {}
    for key in ("20240101/../../secret.png", "a/../../../etc/x.png", "20240101/abc.png\n"):
        try:
            accepted[key] = str(store.path(key))
        except ValueError:
            pass
    assert not accepted, accepted


def test_a_signed_dot_dot_link_does_not_serve_a_file_outside(server):
    _, path, _ = link_of(server)  # makes today's directory
    day = path.removeprefix("/v1/outputs/").split("/")[0]
    outside = server.tmp / "outside.png"
    outside.write_bytes(b"NOT AN OUTPUT")
    secret = (server.tmp / "outputs" / ".signing-key").read_bytes().strip()
    key = f"{day}/../../outside.png"
    exp = int(time.time()) + 100
    r = httpx.get(f"{server.url}/v1/outputs/{day}/%2E%2E/%2E%2E/outside.png?expires={exp}&sig={sign(secret, key, exp)}")
    assert r.content != b"NOT AN OUTPUT", "a file outside outputs.directory was served"


def test_a_repeated_expires_or_sig_is_refused(server):
    """``?expires=1&expires=<valid>`` and ``?sig=x&sig=<valid>`` are refused: a cache or proxy in front that reads
    the first value would see a different link than the server checks (as with two Authorization headers)."""
    _, path, q = link_of(server)
    served = []
    for query in (f"expires=1&expires={q['expires']}&sig={q['sig']}",
                  f"expires={q['expires']}&sig=x&sig={q['sig']}",
                  f"expires={q['expires']}&sig={q['sig']}&sig={q['sig']}"):
        r = httpx.get(f"{server.url}{path}?{query}")
        if r.status_code == 200:
            served.append(query)
        else:
            envelope(r)
    assert not served, served


def test_an_s3_endpoint_without_a_scheme_is_a_502_not_a_500(tmp_path):
    """``outputs.s3.endpoint_url: "minio:9000"`` (no scheme) is refused by the config; boto3's ValueError for an
    endpoint it cannot use is a StorageError (the documented 502), never a 500."""
    pytest.importorskip("boto3")
    from zimage_common.config import ConfigError

    try:
        srv = serve(tmp_path, outputs={"backend": "s3", "s3": {"bucket": "images", "endpoint_url": "minio:9000"}})
    except ConfigError:
        return
    with srv as s:
        s.wait_ready(timeout_s=30)
        r = httpx.post(f"{s.url}{GEN}", json={"prompt": "x", "size": "64x64", "response_format": "url"})
        err = envelope(r)
        get = httpx.get(f"{s.url}/v1/outputs/20240101/{'a' * 32}.png?expires=1&sig=x")
        assert (r.status_code, err["code"], get.status_code) == (502, "storage_unavailable", 503), \
            (r.status_code, err, get.status_code, get.text)


class _FullDisk:
    """``os`` for storage.py, whose ``replace`` fails as a full disk would (the real ``put`` then raises its own
    StorageError)."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def replace(*a):
        raise OSError(28, "No space left on device")


def test_a_batch_line_that_cannot_be_stored_keeps_host_paths_from_the_client(tmp_path, monkeypatch):
    """A batch line whose images cannot be stored gets a fixed message in the file the client downloads, as the
    interactive path does; the store's own text (host paths, botocore's errors) goes to the log only."""
    from openai import OpenAI

    import orchestrator.storage as storage

    with serve(tmp_path) as s:
        s.wait_ready(timeout_s=30)
        monkeypatch.setattr(storage, "os", _FullDisk())
        client = OpenAI(base_url=f"{s.url}/v1", api_key="none")
        line = {"custom_id": "u", "method": "POST", "url": GEN,
                "body": {"prompt": "x", "size": "64x64", "response_format": "url"}}
        f = client.files.create(file=("j.jsonl", (json.dumps(line) + "\n").encode()), purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint=GEN, completion_window="24h")
        deadline = time.time() + 60
        while (b := client.batches.retrieve(b.id)).status not in ("completed", "failed"):
            assert time.time() < deadline, b
            time.sleep(0.05)
        text = "".join(client.files.content(x).text for x in (b.error_file_id, b.output_file_id) if x)
        assert "storage_unavailable" in text, text  # the line did fail on storage
        assert str(tmp_path) not in text, text


def test_a_streamed_url_whose_store_fails_otherwise_still_ends_in_an_error_event(tmp_path):
    """Any exception from storing a streamed image (not only StorageError) ends that image with an error event,
    never a stream that says ``[DONE]`` with neither a completed nor an error event."""
    out = tmp_path / "outputs"
    out.mkdir()
    (out / time.strftime("%Y%m%d", time.gmtime())).write_bytes(b"")
    with serve(tmp_path) as s:
        s.wait_ready(timeout_s=30)
        with httpx.stream("POST", f"{s.url}{GEN}", timeout=30,
                          json={"prompt": "x", "size": "64x64", "stream": True, "response_format": "url"}) as r:
            lines = [x for x in r.iter_lines() if x.startswith(("event:", "data:"))]
        assert any(x.startswith("event: error") for x in lines), lines


def test_a_rejected_signing_secret_is_not_echoed():
    """A signing_secret one character short is refused without its value in the message (printed at start-up)."""
    from zimage_common.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError) as e:
        config_from_dict({"outputs": {"signing_secret": "hunter2-my-secret"[:15]}})
    assert "hunter2" not in str(e.value), str(e.value)


def test_the_key_free_metrics_listener_serves_only_get_metrics(tmp_path):
    """The key-free listener serves GET /metrics only (prometheus_client's own handler answers every path)."""
    with serve(tmp_path, server={"api_keys": [KEY], "metrics_port": 0}) as s:
        s.wait_ready(timeout_s=30)
        port = s.server.config.app.state.metrics_server.server_address[1]
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
        for other in ("/", "/v1/images/generations", "/admin"):
            r = httpx.get(f"http://127.0.0.1:{port}{other}")
            assert r.status_code == 404, (other, r.status_code, r.text[:80])


# ---------------------------------------------------------------------------------------------------- held


def test_links_refused_in_the_envelope(server):
    link, path, q = link_of(server)
    assert httpx.get(link).status_code == 200
    key = path.removeprefix("/v1/outputs/")
    other = f"{key.split('/')[0]}/{'0' * 32}.png"
    cases = {
        "upper": f"{path}?expires={q['expires']}&sig={q['sig'].upper()}",
        "truncated": f"{path}?expires={q['expires']}&sig={q['sig'][:32]}",
        "empty sig": f"{path}?expires={q['expires']}&sig=",
        "no expires": f"{path}?sig={q['sig']}",
        "later": f"{path}?expires={int(q['expires']) + 1}&sig={q['sig']}",
        "negative": f"{path}?expires=-{q['expires']}&sig={q['sig']}",
        "float": f"{path}?expires={q['expires']}.0&sig={q['sig']}",
        "plus": f"{path}?expires=%2B{q['expires']}&sig={q['sig']}",
        "huge": f"{path}?expires={'9' * 30}&sig={q['sig']}",
        "other key": f"/v1/outputs/{other}?expires={q['expires']}&sig={q['sig']}",
        "other ext": f"{path[:-4]}.webp?expires={q['expires']}&sig={q['sig']}",
    }
    for name, url in cases.items():
        r = httpx.get(f"{server.url}{url}")
        assert r.status_code == 403 and envelope(r)["code"] == "invalid_signature", (name, r.status_code, r.text)
    for url in ("/v1/outputs/.signing-key", "/v1/outputs/a%00.png", "/v1/outputs/%E2%80%AE.png",
                "/v1/outputs/..%2F..%2Fetc%2Fpasswd.png", "/v1/outputs//etc/passwd.png", "/v1/outputs/%2Fetc/x.png",
                "/v1/outputs/" + "a/" * 2000 + "b.png", "/v1/outputs/a/.signing-key"):
        r = httpx.get(f"{server.url}{url}?expires={q['expires']}&sig={q['sig']}")
        assert r.status_code in (403, 404) and envelope(r), (url[:60], r.status_code)
    r = httpx.post(link)
    assert r.status_code == 405 and envelope(r)["code"] == "method_not_allowed"
    # an expired link signed with the server's own key
    secret = (server.tmp / "outputs" / ".signing-key").read_bytes().strip()
    past = int(time.time()) - 1
    r = httpx.get(f"{server.url}{path}?expires={past}&sig={sign(secret, key, past)}")
    assert r.status_code == 403 and "expired" in envelope(r)["message"]


def test_served_image_headers_and_ranges(server):
    link, _, _ = link_of(server)
    r = httpx.get(link)
    assert r.headers["content-type"] == "image/png" and r.headers["cache-control"] == "private, max-age=60"
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["accept-ranges"] == "none"
    whole = httpx.get(link, headers={"Range": "bytes=0-3"})  # ignored (RFC 9110 allows it): the whole image
    assert whole.status_code == 200 and whole.content == r.content


def test_the_signing_key_file_is_private_and_never_shown(server):
    mode = stat.S_IMODE(os.stat(server.tmp / "outputs" / ".signing-key").st_mode)
    assert mode == 0o600
    secret = (server.tmp / "outputs" / ".signing-key").read_bytes().strip().decode()
    link, path, q = link_of(server)
    for r in (httpx.get(f"{server.url}/readyz"), httpx.get(f"{server.url}{path}?expires=1&sig=x"),
              httpx.get(f"{server.url}/metrics")):
        assert secret not in r.text


def test_an_unusable_signing_key_path_is_a_503_and_a_502(tmp_path):
    (tmp_path / "outputs" / ".signing-key").mkdir(parents=True)  # read_bytes: IsADirectoryError
    with serve(tmp_path) as s:
        s.wait_ready(timeout_s=30)
        r = httpx.post(f"{s.url}{GEN}", json={"prompt": "x", "size": "64x64", "response_format": "url"})
        assert r.status_code == 502 and envelope(r)["code"] == "storage_unavailable"
        assert str(tmp_path) not in r.text
        g = httpx.get(f"{s.url}/v1/outputs/20240101/{'a' * 32}.png?expires=1&sig=x")
        assert g.status_code == 503 and envelope(g)["code"] == "storage_unavailable"


def test_a_write_failure_whose_tmp_cannot_be_unlinked_is_a_502_not_a_500(tmp_path):
    """A write that fails with ENOTDIR/EACCES (a file where the day's directory goes, a directory this user cannot
    search) fails its cleanup the same way; the answer is still the documented 502, not a 500."""
    out = tmp_path / "outputs"
    out.mkdir()
    (out / time.strftime("%Y%m%d", time.gmtime())).write_bytes(b"")
    with serve(tmp_path) as s:
        s.wait_ready(timeout_s=30)
        r = httpx.post(f"{s.url}{GEN}", json={"prompt": "x", "size": "64x64", "response_format": "url"})
        assert r.status_code == 502 and envelope(r)["code"] == "storage_unavailable" and str(tmp_path) not in r.text
    assert sorted(p.name for p in out.iterdir()) == [".signing-key", time.strftime("%Y%m%d", time.gmtime())]


def test_s3_errors_through_stubs(tmp_path):
    boto3 = pytest.importorskip("boto3")
    from botocore.config import Config as BotoConfig
    from botocore.stub import Stubber

    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s",
                          config=BotoConfig(signature_version="s3v4"))
    store = S3Store("images", "p/", 600, client=client)
    with Stubber(client) as stub:
        stub.add_client_error("put_object", service_error_code="AccessDenied", http_status_code=403)
        with pytest.raises(StorageError):
            store.put("a.png", b"x", "image/png")
    u = urlparse(store.url("20240101/a.png"))
    assert u.path.endswith("/p/20240101/a.png") and parse_qs(u.query)["X-Amz-Expires"] == ["600"]
    with serve(tmp_path) as s:
        s.wait_ready(timeout_s=30)
        s.server.config.app.state.outputs._store = store
        with Stubber(client) as stub:
            stub.add_client_error("put_object", service_error_code="SlowDown", http_status_code=503)
            r = httpx.post(f"{s.url}{GEN}", json={"prompt": "x", "size": "64x64", "response_format": "url"})
        err = envelope(r)
        assert r.status_code == 502 and err["code"] == "storage_unavailable" and "SlowDown" not in err["message"]
        g = httpx.get(f"{s.url}/v1/outputs/20240101/{'a' * 32}.png?expires=1&sig=x")
        assert g.status_code == 404 and envelope(g)["code"] == "not_found"


def test_ops_endpoints_need_the_key(tmp_path):
    with serve(tmp_path, server={"api_keys": [KEY], "docs": True}) as s:
        s.wait_ready(timeout_s=30)
        for p in ("/metrics", "/docs", "/redoc", "/openapi.json"):
            r = httpx.get(f"{s.url}{p}")
            assert r.status_code == 401 and envelope(r)["code"] == "invalid_api_key", p
            r = httpx.get(f"{s.url}{p}", headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401, p
            r = httpx.get(f"{s.url}{p}", headers=[("Authorization", f"Bearer {KEY}"), ("Authorization", "x")])
            assert r.status_code == 400, p
        for p in ("/docs/oauth2-redirect", "/METRICS"):
            assert httpx.get(f"{s.url}{p}").status_code == 404
        # trailing slash: a 404 naming the keyed path, no content
        r = httpx.get(f"{s.url}/metrics/")
        assert r.status_code == 404 and "zimage_" not in r.text
        # links stay key-free
        r = httpx.post(f"{s.url}{GEN}", headers={"Authorization": f"Bearer {KEY}"},
                       json={"prompt": "x", "size": "64x64", "response_format": "url"})
        assert httpx.get(r.json()["data"][0]["url"]).status_code == 200


def test_public_base_url_starts_the_links(tmp_path):
    with serve(tmp_path, outputs={"public_base_url": "https://img.example.com/zi/"}) as s:
        s.wait_ready(timeout_s=30)
        link, _, _ = link_of(s)
        assert link.startswith("https://img.example.com/zi/v1/outputs/")
