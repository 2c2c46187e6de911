"""X-Request-ID: taken from the client (when acceptable) or generated, returned on every response, put into OpenAI
error envelopes, and carried by every log line about the request: the server's, the router's and the replica's
(a real Ray actor, whose log file is read back). Also the JSON log format."""

import io
import json
import logging
import re
import time
from pathlib import Path

import httpx
import pytest
from conftest import ServerThread, tiny_config

from orchestrator.request_id import MAX_LEN, RequestIdMiddleware, valid_request_id
from zimage_common.logging_setup import (
    JsonFormatter,
    batch_request_ids,
    make_handler,
    request_context,
)

GENERATED = re.compile(r"^req_[0-9a-f]{32}$")


# ---- the middleware alone (no Ray) ------------------------------------------------------------------------------
def _app():
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI()
    app.add_middleware(RequestIdMiddleware)

    @app.get("/ok")
    async def ok():
        from zimage_common.logging_setup import current_request_id

        logging.getLogger("orchestrator.test").info("handling")
        return {"seen": current_request_id()}

    @app.get("/bad")
    async def bad():
        return JSONResponse({"error": {"message": "nope", "type": "invalid_request_error", "param": "x",
                                       "code": None}}, status_code=400)

    @app.get("/text-error")
    async def text_error():
        return PlainTextResponse("plain", status_code=500)

    @app.get("/stream")
    async def stream():
        async def gen():
            yield b"data: 1\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


async def _raw_chunked_error(scope, receive, send):
    """An error body sent in two chunks: the middleware must reassemble it before adding the id."""
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"58")]})
    await send({"type": "http.response.body", "body": b'{"error": {"message": "busy", ', "more_body": True})
    await send({"type": "http.response.body", "body": b'"type": "x", "param": null, "code": null}}'})


async def _get(app, path, headers=None):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return await c.get(path, headers=headers or {})


async def test_client_id_is_kept_and_seen_by_the_handler():
    r = await _get(_app(), "/ok", {"X-Request-ID": "abc-123_x.y:z/1+2=3@4"})
    assert r.headers["x-request-id"] == "abc-123_x.y:z/1+2=3@4"
    assert r.json() == {"seen": "abc-123_x.y:z/1+2=3@4"}


@pytest.mark.parametrize("bad", ["", "has space", "quote\"d", "x" * (MAX_LEN + 1), "tab\tx", "new\nline"])
async def test_unacceptable_client_id_is_replaced(bad):
    assert not valid_request_id(bad)
    r = await _get(_app(), "/ok", {"X-Request-ID": bad} if "\n" not in bad else {})
    rid = r.headers["x-request-id"]
    assert GENERATED.match(rid) and r.json() == {"seen": rid}


async def test_non_ascii_id_is_replaced():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent = []

    async def send(m):
        sent.append(m)

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"x-request-id", "é".encode())]}
    await RequestIdMiddleware(app)(scope, None, send)
    assert GENERATED.match(dict(sent[0]["headers"])[b"x-request-id"].decode())


async def test_longest_acceptable_id_is_kept():
    rid = "a" * MAX_LEN
    assert (await _get(_app(), "/ok", {"X-Request-ID": rid})).headers["x-request-id"] == rid


async def test_generated_when_absent_and_unique():
    a, b = (await _get(_app(), "/ok")).headers["x-request-id"], (await _get(_app(), "/ok")).headers["x-request-id"]
    assert GENERATED.match(a) and GENERATED.match(b) and a != b


async def test_error_envelope_gets_the_id_and_keeps_its_shape():
    r = await _get(_app(), "/bad", {"X-Request-ID": "err-1"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "err-1"
    assert r.json() == {"error": {"message": "nope", "type": "invalid_request_error", "param": "x", "code": None,
                                  "request_id": "err-1"}}
    assert int(r.headers["content-length"]) == len(r.content)


async def test_chunked_error_body_is_reassembled():
    r = await _get(RequestIdMiddleware(_raw_chunked_error), "/", {"X-Request-ID": "chunky"})
    assert r.status_code == 503 and r.json()["error"] == {"message": "busy", "type": "x", "param": None,
                                                          "code": None, "request_id": "chunky"}
    assert int(r.headers["content-length"]) == len(r.content)


async def test_other_responses_pass_through_with_the_header():
    r = await _get(_app(), "/text-error", {"X-Request-ID": "t-1"})
    assert r.status_code == 500 and r.text == "plain" and r.headers["x-request-id"] == "t-1"
    r = await _get(_app(), "/missing", {"X-Request-ID": "t-2"})  # the framework's own 404: body untouched
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"} and r.headers["x-request-id"] == "t-2"
    r = await _get(_app(), "/stream", {"X-Request-ID": "t-3"})
    assert r.headers["x-request-id"] == "t-3" and r.text.endswith("data: [DONE]\n\n")


async def test_handler_and_access_lines_carry_the_id():
    buf = io.StringIO()
    h = make_handler("text", buf)
    root = logging.getLogger()
    old = root.level
    root.addHandler(h)
    root.setLevel(logging.INFO)
    try:
        await _get(_app(), "/ok", {"X-Request-ID": "log-me"})
    finally:
        root.removeHandler(h)
        root.setLevel(old)
    lines = buf.getvalue().splitlines()
    assert any("orchestrator.test [request_id=log-me]: handling" in ln for ln in lines), lines
    assert any("orchestrator.access [request_id=log-me]: GET /ok 200" in ln for ln in lines), lines


# ---- formats -------------------------------------------------------------------------------------------------------
def test_json_lines():
    buf = io.StringIO()
    logger = logging.getLogger("zimage.test.json")
    h = make_handler("json", buf)
    logger.addHandler(h)
    logger.propagate = False
    try:
        with request_context(["a", "b", "a"]):
            logger.warning("two %s", "args")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(h)
    first, second = (json.loads(line) for line in buf.getvalue().splitlines())
    assert first["message"] == "two args" and first["request_id"] == "a,b" and first["level"] == "WARNING"
    assert first["logger"] == "zimage.test.json" and re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", first["ts"])
    assert "request_id" not in second and "ValueError: boom" in second["exc_info"]
    assert isinstance(JsonFormatter().format(logging.makeLogRecord({"msg": "x"})), str)


def test_batch_ids_prefer_the_http_id():
    from zimage_common.messages import Batch, ImageRequest

    reqs = (ImageRequest("i1", "p", 1, 64, 64, 2, 0.0, trace_id="http-1"),
            ImageRequest("i2", "p", 2, 64, 64, 2, 0.0, trace_id="http-1"),
            ImageRequest("i3", "p", 3, 64, 64, 2, 0.0))
    assert batch_request_ids(Batch(0, reqs)) == ["http-1", "i3"]


def test_cli_log_format_switch(tmp_path):
    """`zimage-orch --log-format json` (or ZIMAGE_LOG_FORMAT=json): every line the command logs is JSON."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "ZIMAGE_LOG_FORMAT": "json"}
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("router: {max_batch_size: 0}\n")
    code = ("import logging, sys; from orchestrator import cli; "
            "cli.cmd_validate = lambda a: (logging.getLogger('orchestrator.x').warning('hello'), 0)[1]; "
            "sys.exit(cli.main(['validate', sys.argv[1]]))")
    out = subprocess.run([sys.executable, "-c", code, str(cfg)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(ln) for ln in out.stderr.splitlines() if ln.strip()]
    assert [ln["message"] for ln in lines] == ["hello"] and lines[0]["logger"] == "orchestrator.x"


# ---- across HTTP, router and a replica actor ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(ray_cluster, tiny_cache):
    from orchestrator.server import create_app

    # one replica: these tests follow a request id through HTTP, the router and a replica, not across replicas
    cfg = tiny_config(tiny_cache, deployment={"replicas": 1},
                      router={"max_batch_size": 2, "max_wait_ms": 20, "request_timeout_s": 60},
                      limits={"max_n": 4, "max_pixels": 256 * 256})
    app = create_app(cfg)
    buf = io.StringIO()
    handler = make_handler("text", buf)
    root, router_log = logging.getLogger(), logging.getLogger("orchestrator.router")
    levels = (root.level, router_log.level)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    router_log.setLevel(logging.DEBUG)  # its per-batch dispatch line is DEBUG
    try:
        with ServerThread(app) as s:
            s.wait_ready()
            s.log = buf
            yield s
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        router_log.setLevel(levels[1])


def _replica_log_files(server) -> list[Path]:
    """The stderr files of the deployment's replica actors (Ray writes worker-<id>-<job>-<pid>.err)."""
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    out = []
    for replica in server.service.deployment.replicas.values():
        pid = ray.get(replica.actor.pid.remote())
        out += sorted(logs.glob(f"worker-*-{pid}.err"))
    assert out, f"no replica log files in {logs}"
    return out


def _wait_for_line(paths, *fragments, timeout=20.0) -> str:
    deadline = time.time() + timeout
    while True:
        for p in paths:
            for line in p.read_text(errors="replace").splitlines():
                if all(f in line for f in fragments):
                    return line
        assert time.time() < deadline, f"no line with {fragments} in {[str(p) for p in paths]}"
        time.sleep(0.2)


def test_success_id_in_header_access_and_router_lines(server):
    r = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "a fox", "size": "64x64", "n": 2},
                   headers={"X-Request-ID": "it-ok-1"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "it-ok-1"
    text = server.log.getvalue()
    assert re.search(r"orchestrator\.router \[request_id=it-ok-1\]: batch \d+: \d images, \d+ tokens", text), \
        text[-3000:]
    # the access line is written once the response has gone out: give it a moment
    deadline = time.time() + 5
    while "orchestrator.access [request_id=it-ok-1]: POST /v1/images/generations 200" not in text:
        assert time.time() < deadline, text[-3000:]
        time.sleep(0.05)
        text = server.log.getvalue()


def test_replica_failure_id_in_body_header_and_replica_log(server):
    import ray

    replicas = list(server.service.deployment.replicas.values())
    for rep in replicas:
        ray.get(rep.actor.inject_fault.remote("raise", message="injected for request ids"))
    try:
        r = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "a fox", "size": "64x64"},
                       headers={"X-Request-ID": "it-fail-7"}, timeout=60)
    finally:
        for rep in replicas:
            ray.get(rep.actor.inject_fault.remote(None))
    assert r.status_code == 500 and r.headers["x-request-id"] == "it-fail-7"
    err = r.json()["error"]
    # no internal text in the response: the cause goes to the server's log, under the same id
    assert err["request_id"] == "it-fail-7" and "injected for request ids" not in err["message"]
    assert re.search(r"\[request_id=it-fail-7\].*injected for request ids", server.log.getvalue())
    assert set(err) == {"message", "type", "param", "code", "request_id"}
    line = _wait_for_line(_replica_log_files(server), "request_id=it-fail-7", "failed")
    assert re.search(r"actors\.worker \[replica=r\d request_id=it-fail-7\]: replica r\d: batch \d+", line), line


def test_openai_client_reads_the_id_from_errors(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="z-image-turbo", prompt="x", size="100x64",
                               extra_headers={"X-Request-ID": "oa-err-3"})
    assert e.value.request_id == "oa-err-3" and e.value.body["param"] == "size"
    resp = client.images.with_raw_response.generate(model="z-image-turbo", prompt="x", size="64x64",
                                                    extra_headers={"X-Request-ID": "oa-ok-4"})
    assert resp.headers["x-request-id"] == "oa-ok-4" and len(resp.parse().data) == 1


def test_streamed_response_has_the_header(server):
    with httpx.stream("POST", f"{server.url}/v1/images/generations", timeout=60,
                      json={"prompt": "a fox", "size": "64x64", "stream": True, "num_inference_steps": 2}) as r:
        body = b"".join(r.iter_bytes())
    assert r.status_code == 200 and GENERATED.match(r.headers["x-request-id"]) and body.endswith(b"[DONE]\n\n")


def test_adopted_library_logger_writes_through_ours():
    """JSON mode routes Ray's own logger (which has a handler of its own) through ours: every line is JSON."""
    from zimage_common.logging_setup import adopt_logger

    own, ours = io.StringIO(), io.StringIO()
    lib = logging.getLogger("zimage.test.library")
    lib.addHandler(logging.StreamHandler(own))
    lib.propagate = False
    parent = logging.getLogger("zimage.test")
    h = make_handler("json", ours)
    parent.addHandler(h)
    try:
        adopt_logger("zimage.test.library")
        lib.warning("from the library")
    finally:
        parent.removeHandler(h)
    assert own.getvalue() == "" and json.loads(ours.getvalue())["message"] == "from the library"
