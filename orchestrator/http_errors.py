"""Error answers of the HTTP service: OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}`` for
exceptions and failed results. Server-side failures are described without internal text (the cause goes to the
log, with the request id)."""

from __future__ import annotations

import json
import logging

from fastapi.responses import JSONResponse

from zimage_common.errors import QueueFullError, ZImageError
from zimage_common.messages import ImageResult, failure

log = logging.getLogger("orchestrator.server")


class AsciiJSON(JSONResponse):
    """JSON with every non-ASCII character escaped: whatever a caller sent (lone surrogates included) and we
    echo in a message can always be encoded, so an error response never turns into a 500 itself."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return AsciiJSON(error_body(message, type_, param, code), status_code=status, headers=headers)


def from_exception(e: ZImageError) -> JSONResponse:
    headers = None
    if isinstance(e, QueueFullError):
        headers = {"Retry-After": str(max(1, int(round(e.retry_after_s))))}
    elif e.http_status == 503:
        headers = {"Retry-After": "1"}
    if e.http_status >= 500 and e.http_status not in (503, 504):
        log.error("request failed: %s: %s", type(e).__name__, e.message)
        return error_response(e.http_status, "the server failed to handle this request; the cause is in its log",
                              "server_error")
    return error_response(e.http_status, e.message, e.error_type, e.param, headers=headers)


def result_error(r: ImageResult) -> tuple[int, dict]:
    """Status and envelope for a failed result. Server-side failures are described without internal text (the
    replica's exception goes to this process's log with the request id)."""
    f = failure(r.error_type)
    status, type_ = f.http_status, f.openai_type
    if status == 400:
        return status, error_body(r.error or "invalid request", type_, r.param, r.error_type)
    if status >= 500:
        log.error("request %s failed (%s) on replica %s: %s", r.request_id, r.error_type, r.replica_id or "-",
                  r.error)
    if status == 504:
        message = r.error or "the request timed out"
    elif status == 503:
        message = "no replica could run this request (a replica was lost or is restarting); retry shortly"
    elif status == 507:
        message = (f"out of GPU memory for a single {r.width}x{r.height} image; use a smaller size or a placement "
                   f"with more memory per replica")
    elif status == 499:
        message = "cancelled: the client went away"
    else:
        message = f"the server failed to generate this image (request {r.request_id}); the cause is in its log"
    return status, error_body(message, type_, None, r.error_type)


def from_result(r: ImageResult) -> JSONResponse:
    status, body = result_error(r)
    return AsciiJSON(body, status_code=status, headers={"Retry-After": "1"} if status == 503 else None)
