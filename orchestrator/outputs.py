"""``response_format: url``: images stored through ``storage.py`` and answered with links, and the route that serves
the local backend's signed links (``GET /v1/outputs/{key}``); ``file_response`` sends a stored file (a batch's input
or output) from a descriptor opened before the answer begins.

A link needs no API key: whoever holds it may fetch the image until it expires, as with OpenAI's and S3's links.
The signature is what guards it (403 on a tampered or expired link).
"""

from __future__ import annotations

import base64
import logging
import os
import re
import threading
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, StreamingResponse

from zimage_common.config import Config
from zimage_common.image_codec import image_bytes
from zimage_common.messages import ImageResult

from .batches import OutputFile
from .images_api import ImageCall
from .storage import CONTENT_TYPES, LocalStore, StorageError, new_key, run_blocking, store_for

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # a stored file's content is sent this many bytes at a time
RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")


class Outputs:
    """The deployment's object store, made on first use (a server that never answers ``url`` never touches the
    disk or the network for it)."""

    def __init__(self, config: Config, store=None):
        self.config = config
        self._store = store
        self._lock = threading.Lock()

    @property
    def store(self):
        with self._lock:
            if self._store is None:
                self._store = store_for(self.config.outputs)
            return self._store

    def _publish(self, image, call: ImageCall, base_url: str) -> str:
        data = image_bytes(image, call.output_format, call.output_compression)
        key = new_key(call.output_format)
        self.store.put(key, data, CONTENT_TYPES[call.output_format])
        return self.store.url(key, base_url)

    async def publish(self, image, call: ImageCall, base_url: str, request_id: str) -> str:
        """Store and link one image (pixels, or the bytes a replica encoded: ``ImageResult.picture``), in a worker
        thread: encoding and uploading both block."""
        try:
            return await run_blocking(self._publish, image, call, base_url)
        except StorageError as e:
            log.error("request %s: the image was generated but could not be stored: %s", request_id, e.message)
            raise


def storage_failed_body(e: StorageError) -> dict:
    """The error envelope for an upload that failed: says what happened and what to do, not the store's text."""
    return {"error": {"message": "the image was generated but could not be stored for a url response (the "
                                 "storage backend failed; the cause is in the server log); retry, or ask for "
                                 "response_format b64_json", "type": e.error_type, "param": None,
                      "code": "storage_unavailable"}}


class WholeFile(FileResponse):
    """The whole file whatever Range the request names (RFC 9110 lets a server ignore it; an image is small):
    Starlette answers a Range it cannot serve in plain text, outside the error envelope every other answer uses."""

    async def __call__(self, scope, receive, send):
        headers = [(k, v) for k, v in scope.get("headers", ()) if k not in (b"range", b"if-range")]
        await super().__call__({**scope, "headers": headers}, receive, send)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range a Range header asks of a file of ``size`` bytes, as (first, last), or None to send it
    whole: RFC 9110 lets a server ignore a Range it does not serve (several ranges, a malformed or unsatisfiable
    one), which keeps every answer in the envelope (Starlette's file response answers those in plain text)."""
    m = RANGE.fullmatch(header.strip()) if header else None
    if m is None or not (m[1] or m[2]):
        return None
    if m[1]:
        first, last = int(m[1]), min(int(m[2]), size - 1) if m[2] else size - 1
    else:  # the last N bytes
        first, last = max(0, size - int(m[2])), size - 1
    return (first, last) if first <= last else None


def file_response(f, filename: str, range_header: str | None) -> StreamingResponse:
    """A stored file's content from ``f``, a file already open: a DELETE (which unlinks it) during the download
    cannot cut it short or make it a 500. ``f`` is closed when the content is sent, or the client has gone."""
    size = os.fstat(f.fileno()).st_size
    span = byte_range(range_header, size)
    first, last = span or (0, size - 1)
    name = quote(filename)
    headers = {"content-length": str(last - first + 1), "accept-ranges": "bytes", "content-disposition":
               f"attachment; filename*=utf-8''{name}" if name != filename else f'attachment; filename="{filename}"'}
    if span is not None:
        headers["content-range"] = f"bytes {first}-{last}/{size}"

    async def chunks():
        try:
            await run_blocking(f.seek, first)
            left = last - first + 1
            while left > 0 and (data := await run_blocking(f.read, min(CHUNK, left))):
                left -= len(data)
                yield data
        finally:
            f.close()

    return StreamingResponse(chunks(), status_code=200 if span is None else 206, media_type="application/jsonl",
                             headers=headers)


class ServerSink(OutputFile):
    """A server job's images: answered as the line asked (``b64_json`` in the output, or ``url``: stored, with a
    link made from ``outputs.public_base_url`` or the address the job was submitted to)."""

    def __init__(self, outputs: Outputs, base_url: str, output: Path):
        super().__init__(output)
        self.outputs = outputs
        self.base_url = base_url

    async def store(self, line, call: ImageCall, results: list[ImageResult]) -> list[dict]:
        if call.response_format == "url":
            return [{"url": await self.outputs.publish(r.picture, call, self.base_url, r.request_id)}
                    for r in results]
        return [{"b64_json": await run_blocking(b64_text, r.picture, call)} for r in results]


def router(outputs: Outputs) -> APIRouter:
    api = APIRouter()

    # HEAD too: what curl -I, link checkers and caches send before (or instead of) a download; a route of its own,
    # left out of the API document (one route for both methods gives two operations one id)
    @api.get("/v1/outputs/{key:path}")
    @api.head("/v1/outputs/{key:path}", include_in_schema=False)
    async def fetch_output(key: str, request: Request, expires: str | None = None, sig: str | None = None):
        from .http_errors import error_response

        try:
            store = outputs.store
        except StorageError as e:
            log.error("serving %s: %s", key[:80], e.message)
            return error_response(503, "image storage is not available on this server; the cause is in its log",
                                  "service_unavailable", code="storage_unavailable")
        if not isinstance(store, LocalStore):
            return error_response(404, "this server stores images in S3; its links point there",
                                  "invalid_request_error", code="not_found")
        try:
            path = store.path(key)
        except ValueError:
            return error_response(404, "no such image", "invalid_request_error", code="not_found")
        if any(len(request.query_params.getlist(name)) > 1 for name in ("expires", "sig")):
            # which copy counts would differ between a cache or proxy and this check
            return error_response(403, "the link repeats expires or sig; use the link as it was given",
                                  "invalid_request_error", code="invalid_signature")
        problem = store.verify(key, expires, sig)
        if problem is not None:
            return error_response(403, problem, "invalid_request_error", code="invalid_signature")
        if not path.is_file():
            return error_response(404, "no such image (it was removed from the store)", "invalid_request_error",
                                  code="not_found")
        ext = key.rsplit(".", 1)[1]
        return WholeFile(path, media_type=CONTENT_TYPES[ext], headers={
            "Cache-Control": "private, max-age=60", "X-Content-Type-Options": "nosniff", "Accept-Ranges": "none"})

    return api


async def render(request: Request, call: ImageCall, result) -> str:
    """One image as the call asked for it: base64 text, or a link to it in the object store."""
    if call.response_format == "url":
        return await request.app.state.outputs.publish(result.picture, call, str(request.base_url),
                                                      result.request_id)
    return await run_blocking(b64_text, result.picture, call)


def b64_text(image, call: ImageCall) -> str:
    """``image`` (pixels, or an ``EncodedImage`` from the replica, forwarded as it is when it is in the call's
    format) as base64 text. In a worker thread: base64 and the JSON around it hold the GIL, but zlib and
    libjpeg/libwebp release it, so pixels that still need encoding encode in parallel off the loop."""
    return base64.b64encode(image_bytes(image, call.output_format, call.output_compression)).decode()


def include_job_routes(app, service) -> None:
    """Mount the routes of signed image links, files and batch jobs on the server's app, with their state."""
    from . import batch_api

    app.state.outputs = Outputs(service.config)
    app.include_router(router(app.state.outputs))
    app.state.jobs = batch_api.JobService(service, app.state.outputs)
    app.include_router(batch_api.router(app.state.jobs, app.state.outputs))
