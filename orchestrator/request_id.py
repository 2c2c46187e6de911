"""``X-Request-ID`` for the HTTP service, as a pure ASGI middleware (``BaseHTTPMiddleware`` would hide client
disconnects from the endpoints, which cancel work on them). For every request the id is the client's
``X-Request-ID`` when it is 1-128 characters of ``A-Z a-z 0-9 . _ : / + = @ -`` (nothing else is ever written into
a log line), else a new ``req_<32 hex>``; it is the ``x-request-id`` header of every response (where OpenAI's
clients read it), ``error.request_id`` in error envelopes, and on every log line about the request, the router's
and the replica's included (``ImageRequest.trace_id``). One access line per response, at DEBUG for probes and
scrapes."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from zimage_common.logging_setup import request_context

log = logging.getLogger("orchestrator.access")

HEADER = "x-request-id"
MAX_LEN = 128
_VALID = re.compile(rf"^[A-Za-z0-9._:/+=@-]{{1,{MAX_LEN}}}$")
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def valid_request_id(value: str | None) -> bool:
    return bool(value) and bool(_VALID.match(value))


def request_id_from_headers(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's id when it is acceptable, else a new one."""
    for k, v in headers:
        if k.lower() == HEADER.encode():
            try:
                value = v.decode("ascii")
            except UnicodeDecodeError:
                break
            if valid_request_id(value):
                return value
            break
    return new_request_id()


class RequestIdMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_from_headers(scope.get("headers") or [])
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.perf_counter()
        status = {"code": 0}
        held: dict = {}  # an error response's start message, held until its body can get the id

        async def send_with_id(message):
            kind = message["type"]
            if kind == "http.response.start":
                status["code"] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER.encode()]
                headers.append((HEADER.encode(), rid.encode()))
                message = {**message, "headers": headers}
                if message["status"] >= 400 and _is_json(headers):
                    held["start"], held["body"] = message, b""
                    return
            elif kind == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body", False):
                    return
                body = _with_request_id(held["body"], rid)
                start = held.pop("start")
                start["headers"] = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                start["headers"].append((b"content-length", str(len(body)).encode()))
                await send(start)
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            await send(message)

        try:
            with request_context(rid):
                await self.app(scope, receive, send_with_id)
        finally:
            with request_context(rid):
                level = logging.DEBUG if scope.get("path") in QUIET_PATHS else logging.INFO
                log.log(level, "%s %s %s %.3fs", scope.get("method"), scope.get("path"), status["code"] or "-",
                        time.perf_counter() - t0)


def _is_json(headers) -> bool:
    for k, v in headers:
        if k.lower() == b"content-type":
            return v.split(b";")[0].strip().lower() == b"application/json"
    return False


def _with_request_id(body: bytes, rid: str) -> bytes:
    """``{"error": {...}}`` -> the same with ``error.request_id``; any other body unchanged."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        doc["error"].setdefault("request_id", rid)
        return json.dumps(doc).encode()
    return body
