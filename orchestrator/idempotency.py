"""``Idempotency-Key`` on ``POST /v1/images/generations`` and ``/v1/images/edits`` (an extension header; the
request and response bodies are OpenAI's as published).

A call with a key is fingerprinted (its endpoint and body: the JSON fields, or the multipart fields and the files'
bytes). Then, through any front door of the deployment (they share the store, ``idempotency_store.py``):

- the first call with the key runs, and its successful answer is recorded;
- a retry with the same key and body gets the recorded answer again (header ``Idempotent-Replayed: true``), with
  nothing generated;
- a retry while the first is still running (or after the front door running it died) runs again, but its images
  carry keys derived from the call's key (``ImageRequest.result_key``): the replicas claim each in the store, so an
  image made or being made for the first call is handed over, never generated a second time
  (``actors/intake.py``). Where the replicas cannot claim (backends other than Ray), the retry waits for the
  first call instead;
- the same key with another body is refused: 422, ``param: "Idempotency-Key"``;
- a call that failed is not recorded: a retry runs (reusing any image that was made).

Keys are scoped by the caller's API key, so one client's key never reaches another's answer. A streaming call is
recorded once its stream has ended without an error event: a retry gets the same events again, previews included,
in one go; while it streams, a retry is treated as above (its images deduplicated, or it waits).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace

from fastapi import Request
from fastapi.responses import Response

from .http_errors import error_response
from .idempotency_store import DONE, MISMATCH, NEW, PENDING, IdempotencyStore, StoredResponse

log = logging.getLogger("orchestrator.server")

HEADER = "Idempotency-Key"
MAX_KEY_CHARS = 255
PENDING_POLL_S = 0.1


def parse_key(value: str | None) -> str | None:
    """The header's key, or None without one; a malformed key is a ValueError saying why."""
    if value is None:
        return None
    if not 1 <= len(value) <= MAX_KEY_CHARS or not all(0x21 <= ord(c) <= 0x7E for c in value):
        raise ValueError(f"{HEADER} must be 1 to {MAX_KEY_CHARS} visible ASCII characters (no spaces), e.g. a "
                         f"UUID; got {len(value)} character(s)")
    return value


def scope(authorization: str | None) -> str:
    """Which caller a key belongs to: a digest of its bearer key ('' without one). The key as the server's check
    reads it (the scheme in any case, spaces around the key ignored), so that every spelling the check accepts for
    one key is one caller: a retry with ``bearer`` for ``Bearer`` replays instead of generating again."""
    if not authorization:
        return ""
    scheme, _, token = authorization.strip().partition(" ")
    caller = token.strip() if scheme.lower() == "bearer" and token.strip() else authorization.strip()
    return hashlib.sha256(caller.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _canonical(obj, h) -> None:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        h.update(b"b%d:" % len(obj))
        h.update(bytes(obj))
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            _canonical(str(k), h)
            _canonical(obj[k], h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _canonical(v, h)
        h.update(b"]")
    else:
        text = json.dumps(obj, sort_keys=True, ensure_ascii=True, default=str)
        h.update(b"j%d:" % len(text))
        h.update(text.encode("ascii"))


def body_digest(endpoint: str, *parts) -> str:
    """The fingerprint of a call: its endpoint and its parsed body (JSON values, text fields, file bytes); the
    same whatever the key order, JSON spacing or multipart boundary."""
    h = hashlib.sha256(endpoint.encode() + b"\n")
    for p in parts:
        _canonical(p, h)
    return h.hexdigest()


def with_result_keys(call, store_key: str, fingerprint: str):
    """The call with each image keyed (``ImageRequest.result_key``): the i-th image of this key and body."""
    base = hashlib.sha256(f"{store_key}\n{fingerprint}".encode()).hexdigest()[:32]
    return replace(call, requests=[replace(r, result_key=f"{base}:{i}") for i, r in enumerate(call.requests)])


class LocalIdempotency:
    """The store in this process, for a deployment whose replicas cannot claim images (backends other than Ray):
    a call found pending waits for the first one's answer."""

    images_deduped = False

    def __init__(self, cfg, store: IdempotencyStore | None = None):
        self.store = store or IdempotencyStore(cfg.ttl_s, cfg.max_entries, cfg.max_bytes, cfg.claim_lease_s)

    async def begin(self, key: str, fingerprint: str):
        return self.store.begin(key, fingerprint)

    async def finish(self, key: str, fingerprint: str, response: StoredResponse, ttl_s: float | None = None) -> None:
        self.store.finish(key, fingerprint, response, ttl_s)

    async def abandon(self, key: str, fingerprint: str) -> None:
        self.store.abandon(key, fingerprint)

    async def stats(self) -> dict:
        return vars(self.store.snapshot())


def reused(key: str):
    shown = key if len(key) <= 64 else key[:61] + "..."
    return error_response(
        422, f"{HEADER} {shown!r} was first used with a different request (endpoint or body); a retry must send the "
             f"same request to get that call's answer, and a new request needs a new {HEADER}",
        "invalid_request_error", param=HEADER, code="idempotency_key_reused")


async def _recorded(body, store, store_key: str, fp: str, media_type: str | None, keep_s):
    """A streamed answer's events as they go out. Once the stream ends with no error event, the whole stream is the
    key's answer; a stream with an error, or whose client went away, is forgotten (a retry runs)."""
    chunks: list[bytes] = []
    ok = False
    try:
        async for chunk in body:
            chunks.append(chunk if isinstance(chunk, bytes) else str(chunk).encode())
            yield chunk
        ok = not any(c.startswith(b"event: error\n") for c in chunks)
    finally:
        if ok:
            try:
                await asyncio.shield(store.finish(store_key, fp, StoredResponse(
                    200, b"".join(chunks), media_type or "text/event-stream"), keep_s()))
            except Exception as e:  # noqa: BLE001 - the stream went out; only its replay is lost
                log.warning("%s: could not record a streamed answer (%s)", HEADER, e)
        else:
            await asyncio.shield(_forget(store, store_key, fp))


async def _forget(store, store_key: str, fp: str) -> None:
    try:
        await store.abandon(store_key, fp)
    except Exception as e:  # noqa: BLE001 - then the key stays pending until it expires
        log.warning("%s: could not forget a failed call (%s)", HEADER, e)


def replay(stored: StoredResponse) -> Response:
    return Response(stored.body, status_code=stored.status, media_type=stored.media_type,
                    headers={"Idempotent-Replayed": "true"})


async def keyed_answer(request: Request, call, key: str, store, answer: Callable[[object], Awaitable[Response]],
                       wait_s: float, on_outcome: Callable[[str], None] = lambda outcome: None,
                       links_ttl_s: float | None = None) -> Response:
    """Answer ``call`` (fingerprinted in ``call.body_digest``) under ``key``: replayed, refused, or run through
    ``answer(call)`` and recorded. ``wait_s``: how long a pending call is waited for where replicas cannot claim;
    ``on_outcome``: told new, replayed, pending or mismatch (the metrics); ``links_ttl_s``: how long the answer's
    image links work (``response_format: url``), counted from now: it is replayed no longer than they do."""
    started = asyncio.get_running_loop().time()

    def keep_s() -> float | None:
        return None if links_ttl_s is None else max(0.0, links_ttl_s - (asyncio.get_running_loop().time() - started))

    store_key = f"{scope(request.headers.get('authorization'))}:{key}"
    fp = call.body_digest
    try:
        state, stored = await store.begin(store_key, fp)
    except Exception as e:  # noqa: BLE001 - the store down must not take the API down: answer, unguarded
        log.warning("%s store unreachable (%s); answering without it", HEADER, e)
        return await answer(call)
    on_outcome({NEW: "new", PENDING: "pending", DONE: "replayed", MISMATCH: "mismatch"}[state])
    if state == MISMATCH:
        return reused(key)
    if state == DONE:
        log.info("%s %s: answer replayed", HEADER, key[:64])
        return replay(stored)
    if state == PENDING and not store.images_deduped:
        deadline = asyncio.get_running_loop().time() + wait_s
        while state == PENDING and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(PENDING_POLL_S)
            state, stored = await store.begin(store_key, fp)
        if state == DONE:
            return replay(stored)
        if state == PENDING:
            return error_response(409, f"a request with this {HEADER} is still running; retry shortly",
                                  "invalid_request_error", param=HEADER, code="idempotency_key_in_use",
                                  headers={"Retry-After": "1"})
    if state in (NEW, PENDING) and store.images_deduped:
        call = with_result_keys(call, store_key, fp)
    try:
        response = await answer(call)
    except BaseException:  # a failed call is not recorded: a retry runs (shielded: a cancel must not skip it)
        await asyncio.shield(_forget(store, store_key, fp))
        raise
    if call.stream and response.status_code == 200 and hasattr(response, "body_iterator"):
        response.body_iterator = _recorded(response.body_iterator, store, store_key, fp, response.media_type,
                                           keep_s)
        return response  # recorded or forgotten when its stream ends
    try:
        if not call.stream and response.status_code == 200:
            await store.finish(store_key, fp, StoredResponse(200, bytes(response.body), response.media_type), keep_s())
        else:
            await store.abandon(store_key, fp)
    except Exception as e:  # noqa: BLE001 - the answer is good; only its replay is lost
        log.warning("%s %s: could not record the answer (%s)", HEADER, key[:64], e)
    return response
