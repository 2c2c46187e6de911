"""Connection, body and upload limits of the HTTP service (orchestrator/http_guard.py, orchestrator/uploads.py),
auth on the operator's endpoints, and the input errors of the second hardening round, on loopback with a
deployment that never runs anything: no Ray, no model."""

import asyncio
import io
import json
import logging
import socket
import threading
import time

import httpx
import pytest
from fakes import IdleDeployment
from PIL import Image

from zimage_common.config import config_from_dict

KEY = "sk-limits"


class _Ready(IdleDeployment):
    """Up; admission answers every request at once with a fixed failure (the tests here are about what happens
    before admission)."""

    def __init__(self):
        self.admitted = []
        self.silent = []

    def not_answering(self):
        return self.silent

    def admit(self, requests, on_progress=None):
        from zimage_common.errors import QueueFullError

        self.admitted.append(requests)
        raise QueueFullError("admitted, then refused by the test", retry_after_s=1)


class Server:
    """The app under the project's own uvicorn settings (http_guard.uvicorn_config), in a thread."""

    def __init__(self, cfg):
        import uvicorn

        from orchestrator.http_guard import uvicorn_config
        from orchestrator.server import create_app

        self.dep = _Ready()

        async def up(config, observer=None):
            return self.dep

        self.app = create_app(cfg, deployment_factory=up)
        self.config = uvicorn_config(self.app, cfg.server, "127.0.0.1", 0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 10
        while httpx.get(f"{self.url}/readyz").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def sock(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port))
        s.settimeout(5)
        return s


def cfg(**sections):
    return config_from_dict({"model": {"source": "tiny"}, **sections})


def closed_by_server(s: socket.socket, within_s: float) -> bool:
    s.settimeout(within_s)
    try:
        return s.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def http_count(url: str, status: int, headers=None) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", headers=headers).text
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            if s.name == "zimage_http_responses_total" and s.labels.get("status") == str(status):
                return s.value
    return 0.0


def test_slow_headers_are_cut_off_and_idle_connections_make_room_for_new_ones():
    with Server(cfg(server={"header_timeout_s": 0.5, "max_connections": 16})) as s:
        slow = s.sock()
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the headers never end
        assert closed_by_server(slow, 2.0)
        # A flood at the cap: each new connection closes the oldest one without a request in progress, so a
        # probe that sends its request at once is answered.
        flood = [s.sock() for _ in range(40)]
        for c in flood:
            c.sendall(b"GET /healthz HTTP/1.1\r\n")
        t0 = time.perf_counter()
        assert httpx.get(f"{s.url}/healthz", timeout=5).status_code == 200
        assert time.perf_counter() - t0 < 1.0
        assert closed_by_server(flood[0], 1.0)
        assert len(s.config.connection_guard.open) <= 16
        assert s.config.connection_guard.counts["evicted"] >= 24
        for c in flood:
            c.close()


def test_a_trickled_body_gets_408_in_the_envelope_and_a_client_gone_mid_body_is_a_499(caplog):
    with Server(cfg(server={"body_idle_timeout_s": 0.5})) as s:
        c = s.sock()
        c.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\nX-Request-ID: slow-body-1\r\n\r\n{\"prompt\"")
        data = b""
        while b"}}" not in data:
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), head
        err = json.loads(body)["error"]
        assert err["code"] == "request_timeout" and "server.body_idle_timeout_s" in err["message"]
        assert err["request_id"] == "slow-body-1"
        c.close()

        before = http_count(s.url, 499)
        with caplog.at_level(logging.INFO):
            for path in ("/v1/images/generations", "/v1/images/edits"):
                c = s.sock()
                c.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          f"Content-Length: 100000\r\n\r\n".encode() + b"{" * 1000)
                time.sleep(0.1)
                c.close()
            deadline = time.time() + 5
            while http_count(s.url, 499) < before + 2:
                assert time.time() < deadline, "the disconnects were not counted as 499"
                time.sleep(0.05)
        gone = [r for r in caplog.records if "client disconnected" in r.getMessage()]
        assert len(gone) == 2 and all(r.levelno == logging.INFO for r in gone)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert http_count(s.url, 500) == 0


def test_a_body_that_cannot_finish_in_time_is_cut_off_early_and_frees_its_upload_reservation():
    """A trickle of a byte every 0.2 s under a large declared length never pauses for body_idle_timeout_s, so only
    body_timeout_s ended it, and an edit holds its declared bytes of the upload budget all that while. The pace
    rule ends it once it falls behind by more than the idle timeout's share; a body at pace is untouched."""
    with Server(cfg(server={"body_idle_timeout_s": 0.5, "body_timeout_s": 20})) as s:
        c = s.sock()
        c.sendall(b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
                  b"Content-Length: 1000000\r\nX-Request-ID: trickle-1\r\n\r\n--zz\r\nContent-Disposition: form-data; "
                  b"name=\"image\"; filename=\"a.png\"\r\n\r\n-")
        t0, data = time.monotonic(), b""
        c.settimeout(0.2)
        while b"}}" not in data and time.monotonic() - t0 < 10:
            try:
                data += c.recv(65536)
            except TimeoutError:
                c.sendall(b"-")  # a byte every 0.2 s: never idle for 0.5 s
        took = time.monotonic() - t0
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), data
        err = json.loads(body)["error"]
        assert "too slowly" in err["message"] and "server.body_timeout_s" in err["message"], err
        assert took < 3, took  # not the 20 s of body_timeout_s
        c.close()
        deadline = time.time() + 5
        while s.app.state.upload_budget.used:
            assert time.time() < deadline, "the reservation was not returned"
            time.sleep(0.05)
        # a body at pace: half of it, a pause under the idle timeout, the rest
        headers, full = multipart([("prompt", b"x", None), ("image", png(), "a.png")])
        c = s.sock()
        c.sendall(f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: {headers['content-type']}\r\n"
                  f"Content-Length: {len(full)}\r\nConnection: close\r\n\r\n".encode() + full[:len(full) // 2])
        time.sleep(0.4)
        c.sendall(full[len(full) // 2:])
        c.settimeout(10)
        reply = b""
        while chunk := c.recv(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 429") and b"refused by the test" in reply, reply[:300]
        c.close()


def test_docs_and_metrics_need_the_key_and_a_separate_listener_serves_metrics_without_one():
    with Server(cfg(server={"api_keys": [KEY], "docs": True, "metrics_port": 0})) as s:
        auth = {"Authorization": f"Bearer {KEY}"}
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
            r = httpx.get(f"{s.url}{path}")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
            assert httpx.get(f"{s.url}{path}", headers=auth).status_code == 200, path
        assert "/v1/images/generations" in httpx.get(f"{s.url}/openapi.json", headers=auth).json()["paths"]
        assert httpx.get(f"{s.url}/healthz").status_code == 200  # probes stay open
        port = s.app.state.metrics_server.server_address[1]
        r = httpx.get(f"http://127.0.0.1:{port}/metrics")
        assert r.status_code == 200 and "zimage_http_responses_total" in r.text


def multipart(parts: list[tuple[str, bytes, str | None]], boundary="b0undary"):
    out = b""
    for name, value, filename in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + value + b"\r\n"
    return {"content-type": f"multipart/form-data; boundary={boundary}"}, out + f"--{boundary}--\r\n".encode()


def png(w=32, h=32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_input_errors_of_the_second_round():
    with Server(cfg()) as s:
        # RFC 7578: a file part's filename is optional.
        headers, body = multipart([("prompt", b"x", None), ("image", png(), None), ("n", b"1.0", None)])
        r = httpx.post(f"{s.url}/v1/images/edits", content=body, headers=headers)
        assert r.status_code == 429 and "refused by the test" in r.text, r.text  # parsed, decoded, admitted
        assert s.dep.admitted[-1][0].image.shape == (32, 32, 3)
        # A multipart loras field nested past the JSON decoder's depth.
        headers, body = multipart([("prompt", b"x", None), ("image", png(), "a.png"), ("loras", b"[" * 200_000, None)])
        r = httpx.post(f"{s.url}/v1/images/edits", content=body, headers={**headers, "X-Request-ID": "deep-1"})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "loras" and "nested too deeply" in err["message"]
        assert err["request_id"] == "deep-1"
        # JSON Schema integers take 1.0.
        r = httpx.post(f"{s.url}/v1/images/generations", json={"prompt": "x", "n": 1.0, "seed": 3.0})
        assert r.status_code == 429, r.text
        assert [q.seed for q in s.dep.admitted[-1]] == [3]
        r = httpx.post(f"{s.url}/v1/images/generations", json={"prompt": "x", "n": 1.5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_an_oversized_part_is_refused_while_it_streams():
    from orchestrator.uploads import stream_multipart
    from zimage_common.errors import InvalidRequestError

    headers, body = multipart([("prompt", b"x", None), ("image", b"\x89PNG" + b"\0" * 5_000_000, "a.png")])
    sent = []

    async def chunks():
        for i in range(0, len(body), 65536):
            sent.append(i)
            yield body[i:i + 65536]

    with pytest.raises(InvalidRequestError) as e:
        asyncio.run(stream_multipart(headers, chunks(), max_image_bytes=1_000_000, max_files=18))
    assert e.value.http_status == 413 and e.value.param == "image" and "limits.max_image_bytes" in e.value.message
    assert len(sent) * 65536 < 1_200_000  # stopped at the limit, not after the body
    with Server(cfg(limits={"max_image_bytes": 1_000_000})) as s:
        r = httpx.post(f"{s.url}/v1/images/edits", content=body, headers=headers)
        assert r.status_code == 413 and r.json()["error"]["param"] == "image"
        assert s.app.state.upload_budget.used == 0  # the reservation was returned


def test_multipart_bodies_cut_off_or_in_an_unusable_charset_are_400s():
    """python-multipart's finalize does not check that the closing boundary arrived: a body cut inside its second
    image parsed as the first image alone (an edit silently one image short). And a charset whose codec refuses
    text (Python's "undefined", "idna" on some names) raised from the decode: a 500. Both are 400s now, for edits
    and for file uploads."""
    from orchestrator.uploads import parse_multipart
    from zimage_common.errors import InvalidRequestError

    headers, body = multipart([("prompt", b"x", None), ("image", png(), "a.png"), ("image", png(), "b.png")])
    fields, files = asyncio.run(parse_multipart(headers, body))
    assert len(files["image"]) == 2
    for cut in (body[: len(body) - 200], body[: body.rindex(b"--b0undary--")], b""):
        with pytest.raises(InvalidRequestError, match="closing boundary"):
            asyncio.run(parse_multipart(headers, cut))
    asyncio.run(parse_multipart(headers, body + b"an epilogue, which RFC 2046 allows"))
    for charset in ("undefined", "idna"):
        bad = {"content-type": headers["content-type"] + f"; charset={charset}"}
        with pytest.raises(InvalidRequestError, match="charset"):
            asyncio.run(parse_multipart(bad, multipart([("\u00e9\u00e9".encode("latin-1") * 40 + b".", b"x",
                                                         None)])[1]))
    unknown = {"content-type": headers["content-type"] + "; charset=no-such-codec"}  # read as latin-1
    assert asyncio.run(parse_multipart(unknown, body))[0] == {"prompt": "x"}
    with Server(cfg()) as s:
        r = httpx.post(f"{s.url}/v1/images/edits", content=body[: len(body) - 200], headers=headers)
        assert r.status_code == 400 and "closing boundary" in r.json()["error"]["message"], r.text
        r = httpx.post(f"{s.url}/v1/images/edits", content=body,
                       headers={"content-type": headers["content-type"] + "; charset=undefined"})
        assert r.status_code == 400 and "charset" in r.json()["error"]["message"], r.text
        fh, fbody = multipart([("purpose", b"batch", None), ("file", b'{"custom_id": "a"}\n', "in.jsonl")])
        for h, b in ((fh, fbody[: len(fbody) - 30]), ({"content-type": fh["content-type"] + "; charset=undefined"},
                                                       fbody)):
            r = httpx.post(f"{s.url}/v1/files", content=b, headers=h)
            assert r.status_code == 400 and ("closing boundary" in r.text or "charset" in r.text), r.text


def test_uploads_wait_for_room_in_flight_then_get_429():
    from orchestrator.uploads import ByteBudget

    async def run():
        budget = ByteBudget(100)
        assert await budget.acquire(60, 1)
        assert await budget.acquire(40, 1)
        order = []

        async def later(n, name):
            if await budget.acquire(n, 1):
                order.append(name)

        waiters = [asyncio.ensure_future(later(50, "a")), asyncio.ensure_future(later(10, "b"))]
        await asyncio.sleep(0.01)
        assert order == [] and budget.waiting == 2
        budget.release(60)  # room for both: served in arrival order
        await asyncio.gather(*waiters)
        assert order == ["a", "b"]
        t0 = time.perf_counter()
        assert not await budget.acquire(90, 0.2)  # 100 in use: gives up after its wait
        assert 0.15 < time.perf_counter() - t0 < 1 and budget.waiting == 0
        assert await budget.acquire(10_000, 0) is False  # larger than the budget: waits for all of it

    asyncio.run(run())


def test_decode_queue_is_weighed_by_pixels_and_small_requests_pass_a_large_one_boundedly():
    from orchestrator.uploads import DecodeQueue

    async def run():
        q = DecodeQueue(pixel_budget=100, max_concurrent=10)
        assert await q.acquire(70, 1)  # a large decode runs
        got = []

        async def want(n, name):
            if await q.acquire(n, 1):
                got.append(name)

        big = asyncio.ensure_future(want(70, "big2"))
        await asyncio.sleep(0.01)
        smalls = [asyncio.ensure_future(want(10, f"s{i}")) for i in range(5)]
        await asyncio.sleep(0.01)
        # The second large one waits; small ones pass it while they fit.
        assert got == ["s0", "s1", "s2"] and q.used == 100 and q.waiting == 3
        q.release(70)
        await asyncio.sleep(0.01)
        assert got[3:] == ["big2"]  # then the head first, though s3 and s4 came before this release
        for _ in range(3):
            q.release(10)
        await asyncio.gather(big, *smalls)
        assert got[4:] == ["s3", "s4"]
        for _ in range(2):
            q.release(10)
        q.release(70)
        assert q.used == 0 and q.running == 0

        # Passing is bounded: small requests that keep coming pass a waiting large one for one budget's worth
        # of pixels, then queue behind it.
        assert await q.acquire(70, 1)
        waiting_big = asyncio.ensure_future(q.acquire(70, 5))
        await asyncio.sleep(0.01)
        passed = 0
        while await q.acquire(10, 0.05):
            passed += 1
            q.release(10)
        assert passed == 10
        q.release(70)
        assert await waiting_big

    asyncio.run(run())


def test_small_edits_do_not_wait_behind_huge_images(monkeypatch):
    """Two edits of 40-megapixel images and small ones: the small ones are decoded beside the huge ones."""
    big = io.BytesIO()
    Image.new("RGB", (8000, 5000)).save(big, format="PNG")
    big = big.getvalue()
    with Server(cfg(limits={"decode_pixel_budget": 48_000_000})) as s:
        async def burst():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                def edit(data):
                    h, b = multipart([("prompt", b"x", None), ("image", data, "a.png"), ("size", b"64x64", None)])
                    return c.post("/v1/images/edits", content=b, headers=h)

                async def timed(data):
                    await asyncio.sleep(0.2)
                    t0 = time.perf_counter()
                    r = await edit(data)
                    return r, time.perf_counter() - t0

                t0 = time.perf_counter()
                bigs = [asyncio.ensure_future(edit(big)) for _ in range(3)]
                small = await asyncio.gather(*(timed(png()) for _ in range(4)))
                await asyncio.gather(*bigs)
                return small, time.perf_counter() - t0

        small, total = asyncio.run(burst())
    assert all(r.status_code == 429 and "refused by the test" in r.text for r, _ in small)
    assert max(t for _, t in small) < total / 2, (small, total)


def test_readyz_says_when_the_live_replicas_stopped_answering():
    with Server(cfg()) as s:
        assert httpx.get(f"{s.url}/readyz").json()["not_answering"] == []
        s.dep.silent = ["r0"]
        r = httpx.get(f"{s.url}/readyz")
        assert r.status_code == 503 and r.json()["status"] == "not_answering" and r.json()["not_answering"] == ["r0"]


def test_rate_limited_log():
    from orchestrator.http_guard import RateLimitFilter

    now = [0.0]
    f = RateLimitFilter(per_s=2, clock=lambda: now[0])

    def rec(msg):
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)

    passed = sum(f.filter(rec("socket.accept() out of system resource")) for _ in range(10_000))
    assert passed == 1
    now[0] = 1.0
    r = rec("socket.accept() out of system resource")
    assert f.filter(r) and "9999 more like this dropped" in r.msg
    assert f.filter(rec("another message"))


def test_api_keys_leave_the_environment_and_host_paths_leave_messages():
    from orchestrator.deployment_loras import shown_path
    from orchestrator.ops_endpoints import without_host_paths
    from zimage_common.config import LoraSpec
    from zimage_common.logging_setup import take_api_keys_from_env

    env = {"ZIMAGE_API_KEYS": "sk-a, sk-b", "OTHER": "1"}
    assert take_api_keys_from_env(env) == ["sk-a", "sk-b"] and env == {"OTHER": "1"}
    assert without_host_paths("FileNotFoundError: no model at /data/models/Tongyi/snap/model_index.json") == \
        "FileNotFoundError: no model at .../model_index.json"
    assert shown_path(LoraSpec(name="a", path="/srv/loras/x/y.safetensors"), "/srv/loras") == "x/y.safetensors"
    assert shown_path(LoraSpec(name="a", path="/home/op/secret/y.safetensors"), "/srv/loras") == "y.safetensors"
    assert shown_path(LoraSpec(name="a", path="sub/y.safetensors"), "/srv/loras") == "sub/y.safetensors"


def test_integral_numbers_in_a_json_edit_count_like_integers():
    from orchestrator.images_api import parse_json_edit

    url = "data:image/png;base64," + __import__("base64").b64encode(png()).decode()
    call = parse_json_edit({"prompt": "x", "images": [{"image_url": url}], "n": 2.0, "seed": 4.0}, cfg())
    assert [r.seed for r in call.requests] == [4, 5] and len({id(r.image) for r in call.requests}) == 1


def test_an_unread_body_trickled_after_the_response_does_not_hold_the_connection():
    with Server(cfg(server={"header_timeout_s": 0.5})) as s:
        c = s.sock()
        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        assert c.recv(65536).startswith(b"HTTP/1.1 200")
        t0 = time.perf_counter()
        closed = False
        while time.perf_counter() - t0 < 3 and not closed:
            try:
                c.sendall(b"1\r\na\r\n")  # the body goes on, a byte at a time
                closed = closed_by_server(c, 0.2)
            except OSError:
                closed = True
        assert closed and time.perf_counter() - t0 < 2


def test_serve_takes_the_keys_out_of_the_environment_before_ray_starts(monkeypatch):
    """Replicas of a local Ray inherit the environment of the process that starts it: the keys are gone from it
    by then, and the server still requires them."""
    import argparse
    import os

    import uvicorn

    from orchestrator import ray_backend, server

    seen = {}
    monkeypatch.setenv("ZIMAGE_API_KEYS", "sk-env-1,sk-env-2")
    monkeypatch.setattr(ray_backend, "connect", lambda cluster: seen.update(env=os.environ.get("ZIMAGE_API_KEYS")))

    def run(self):
        seen["keys"] = self.config.app.state.service.api_keys
        seen["guard"] = self.config.connection_guard

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setattr(server.signal, "signal", lambda *a: None)
    args = argparse.Namespace(config=None, set=["model.source=tiny"], host=None, port=0)
    assert server.cmd_serve(args) == 0
    assert seen["env"] is None and "ZIMAGE_API_KEYS" not in os.environ
    assert seen["keys"] == [b"sk-env-1", b"sk-env-2"]
    assert seen["guard"].cap <= seen["guard"].fd_limit - 512


def test_a_client_that_goes_away_while_its_images_wait_has_them_cancelled():
    """The server learns of the disconnect from the connection itself (no polling per waiting call): the waiting
    images are cancelled and the call counts as a 499."""
    with Server(cfg()) as s:
        waiters = []

        def admit(requests, on_progress=None):
            loop = asyncio.get_running_loop()
            waiters.extend(loop.create_future() for _ in requests)
            return waiters[-len(requests):]

        s.dep.admit = admit
        before = http_count(s.url, 499)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{s.url}/v1/images/generations", json={"prompt": "gone", "size": "64x64", "n": 2},
                       timeout=0.5)
        deadline = time.time() + 5
        while http_count(s.url, 499) < before + 1:
            assert time.time() < deadline, "the disconnect was not noticed"
            time.sleep(0.05)
        assert len(waiters) == 2 and all(w.cancelled() for w in waiters)


def test_a_chunked_body_reserves_as_it_arrives_and_gives_everything_back():
    from orchestrator.uploads import BodyReservation, ByteBudget
    from zimage_common.errors import QueueFullError

    first = BodyReservation.CHUNKED_FIRST

    async def chunks(sizes):
        for n in sizes:
            yield b"x" * n

    async def run():
        budget = ByteBudget(8 * first)
        body = BodyReservation(budget, None, 8 * first, wait_s=0.2)
        await body.open()
        assert budget.used == first  # a chunked body starts with CHUNKED_FIRST, not its limit
        seen = 0
        async for chunk in body.guard(chunks([first // 2, first // 2, 1, first, 3 * first])):
            seen += len(chunk)
            assert seen <= body.held <= max(2 * seen, first), (seen, body.held)  # ahead of the data, never 2x past
        assert body.held == budget.used == 8 * first  # capped at its limit
        body.release()
        assert budget.used == 0 and budget.running == 0

        declared = BodyReservation(budget, 3 * first, 3 * first, wait_s=0.2)
        await declared.open()
        assert budget.used == 3 * first  # a declared length is reserved whole, before reading
        async for _ in declared.guard(chunks([3 * first])):
            pass
        assert budget.used == 3 * first

        # growth that finds no room within wait_s is the upload 429, mid-stream; what it held is given back
        grower = BodyReservation(budget, None, 8 * first, wait_s=0.2)
        await grower.open()
        with pytest.raises(QueueFullError, match="limits.max_inflight_upload_bytes"):
            async for _ in grower.guard(chunks([first, first, 4 * first])):
                pass
        grower.release()
        declared.release()
        assert budget.used == 0 and budget.running == 0

    asyncio.run(run())


def test_trickled_chunked_edits_no_longer_hold_the_upload_budget():
    """Four clients trickling chunked edit bodies used to reserve limits.max_upload_bytes each: the whole budget,
    and every other edit waited out upload_wait_s for a 429. Now each holds what it has sent, rounded up."""
    mib = 1 << 20
    limits = {"max_inflight_upload_bytes": 16 * mib, "max_upload_bytes": 4 * mib, "upload_wait_s": 1}
    with Server(cfg(limits=limits, server={"body_idle_timeout_s": 30})) as s:
        headers, full = multipart([("prompt", b"x", None), ("image", png(), "a.png")])
        slow = []
        for _ in range(4):
            c = s.sock()
            c.sendall(f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: {headers['content-type']}\r\n"
                      f"Transfer-Encoding: chunked\r\n\r\n".encode() + b"10\r\n" + full[:16] + b"\r\n")
            slow.append(c)
        deadline = time.time() + 5
        while s.app.state.upload_budget.running < 4:
            assert time.time() < deadline, "the chunked bodies did not start"
            time.sleep(0.05)
        assert s.app.state.upload_budget.used == 4 * mib  # 1 MiB each, not 4 x 4 MiB
        r = httpx.post(f"{s.url}/v1/images/edits", files={"image": ("a.png", png(), "image/png")},
                       data={"prompt": "a fox"}, timeout=10)
        assert r.status_code == 429 and "refused by the test" in r.json()["error"]["message"], r.text  # admitted
        for c in slow:
            c.close()
        deadline = time.time() + 5
        while s.app.state.upload_budget.used:
            assert time.time() < deadline, "the reservations were not returned"
            time.sleep(0.05)


def test_repeated_authorization_or_idempotency_key_headers_are_400s_naming_the_header():
    with Server(cfg(server={"api_keys": [KEY]})) as s:
        body = {"prompt": "a fox"}
        twice = [("Authorization", f"Bearer {KEY}"), ("Authorization", "Bearer someone-else")]
        r = httpx.post(f"{s.url}/v1/images/generations", json=body, headers=twice)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "Authorization" and err["code"] == "duplicate_header"
        assert "send one Authorization header" in err["message"] and "has 2" in err["message"]
        r = httpx.post(f"{s.url}/v1/images/generations", json=body,
                       headers=[("Authorization", f"Bearer {KEY}"), ("Idempotency-Key", "k1"),
                                ("Idempotency-Key", "k2")])
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "Idempotency-Key" and err["code"] == "duplicate_header", r.text
        assert "send one Idempotency-Key header" in err["message"]
        # one of each still passes both checks (the test deployment then refuses at admission)
        r = httpx.post(f"{s.url}/v1/images/generations", json=body,
                       headers={"Authorization": f"Bearer {KEY}", "Idempotency-Key": "k1"})
        assert r.status_code == 429 and "refused by the test" in r.text


@pytest.mark.parametrize("value", ["", " , ,"])
def test_serve_refuses_an_api_keys_variable_that_is_set_but_holds_no_key(monkeypatch, value):
    """``ZIMAGE_API_KEYS`` set but empty (a template or secret store that gave nothing) would serve with no
    authentication; serve refuses before Ray starts, naming the variable and the fix."""
    import argparse
    import os

    from orchestrator import ray_backend, server
    from zimage_common.errors import InvalidRequestError

    monkeypatch.setenv("ZIMAGE_API_KEYS", value)
    monkeypatch.setattr(ray_backend, "connect", lambda cluster: pytest.fail("Ray started"))
    args = argparse.Namespace(config=None, set=["model.source=tiny"], host=None, port=0)
    with pytest.raises(InvalidRequestError, match="ZIMAGE_API_KEYS is set but holds no key.*unset it") as e:
        server.cmd_serve(args)
    assert e.value.param == "ZIMAGE_API_KEYS" and "ZIMAGE_API_KEYS" not in os.environ


def _until_closed(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_bytes_that_are_not_http_get_the_envelope_and_a_bad_chunk_after_an_early_answer_just_closes(caplog):
    """uvicorn answers what h11 cannot parse in plain text ("Invalid HTTP request received."): here it is the error
    envelope like every other answer. A chunked body over the limit is answered 413 as soon as it passes it; a
    malformed chunk after that made uvicorn send a second response on the answered connection, which h11 refused
    from inside the protocol callback (an asyncio ERROR with a traceback): the connection is now closed."""
    with Server(cfg(limits={"max_body_bytes": 1024})) as s:
        for head in (b"Content-Length: abc\r\n", b"Bad Header: y\r\nContent-Length: 0\r\n",
                     b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"):
            c = s.sock()
            c.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
            status, _, body = _until_closed(c).partition(b"\r\n\r\n")
            assert status.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in status.lower(), status
            err = json.loads(body)["error"]
            assert err["type"] == "invalid_request_error" and err["code"] == "invalid_http_request", err
            assert "not valid HTTP/1.1" in err["message"]
            assert f"x-request-id: {err['request_id']}".encode() in status.lower()  # as on every response
            c.close()
        c = s.sock()
        c.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n800\r\n" + b"a" * 0x800 + b"\r\n")
        first = c.recv(65536)
        while b"}}" not in first:  # the 413's whole body
            first += c.recv(65536)
        assert first.startswith(b"HTTP/1.1 413"), first[:200]
        c.sendall(b"zz\r\n")  # not a chunk size
        assert _until_closed(c) == b""  # closed, with no second response
        c.close()
        assert httpx.get(f"{s.url}/readyz").status_code == 200
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
