"""How the HTTP service answers an admitted call: one JSON body (images encoded off the event loop), or server-sent
events (previews, completions, errors, then ``[DONE]``)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response

from zimage_common.errors import ZImageError
from zimage_common.messages import ImageRequest, ImageResult, StepProgress

from .http_errors import AsciiJSON, error_body, error_response, from_exception, from_result, result_error
from .images_api import ImageCall, completed_event, images_response, partial_image_event
from .outputs import b64_text, render, storage_failed_body
from .storage import StorageError, run_blocking

log = logging.getLogger("orchestrator.server")


async def _disconnect(request: Request) -> None:
    """Returns when the client goes away. The body has been read, so the server's next message is the disconnect:
    waiting for it costs nothing until it comes (no polling per waiting request)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _retrieved(future: asyncio.Future) -> None:
    """A done callback that reads a future's outcome. A gather whose children were cancelled (its client went away)
    ends with a CancelledError set as its exception, which asyncio logs as an ERROR with a traceback ("exception was
    never retrieved") once the future is collected unless something reads it; any other exception is a fault, logged
    here."""
    if future.cancelled():
        return
    e = future.exception()
    if e is not None and not isinstance(e, asyncio.CancelledError):
        log.error("answering a call failed", exc_info=e)


async def answer_json(request: Request, call: ImageCall, waiters: list[Awaitable[ImageResult]]) -> Response:
    work = asyncio.ensure_future(asyncio.gather(*waiters, return_exceptions=True))
    # A client that goes away has its queued requests cancelled rather than computed.
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if gone.done() and gone.exception() is not None:  # the connection cannot tell: wait for the work alone
            log.debug("disconnect watch ended: %r", gone.exception())
            await asyncio.wait({work})
    finally:
        if not gone.done():
            gone.cancel()
    if not work.done():
        work.add_done_callback(_retrieved)
        work.cancel()
        log.info("client disconnected; cancelled %d request(s)", len(call.requests))
        return Response(status_code=499)
    outcomes = work.result()
    for o in outcomes:
        if isinstance(o, ZImageError):
            return from_exception(o)
        if isinstance(o, BaseException):
            log.error("unexpected error: %r", o)
            return error_response(500, "the server failed to handle this request; the cause is in its log",
                                  "server_error")
        if not o.ok:
            return from_result(o)
    loop = asyncio.get_running_loop()
    try:
        b64 = await asyncio.gather(*(render(request, call, o) for o in outcomes))
    except StorageError as e:
        return AsciiJSON(storage_failed_body(e), status_code=e.http_status)
    # The body (megabytes of base64 per image) is serialized off the event loop too: the router's dispatch loop
    # shares this loop, and a batch's worth of responses rendered on it would delay the next dispatch.
    body = await loop.run_in_executor(None, AsciiJSON(None).render, images_response(call, outcomes, b64,
                                                                               int(time.time())))
    return Response(body, media_type="application/json")


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=True)}\n\n".encode()


def _sse_comment(event_type: str, data: dict) -> bytes:
    """Progress as an SSE comment line: SSE clients skip comments (the official openai client turns every
    ``data:`` event into an image event, and an event without data into a JSON error), so it reaches only the
    clients that look for it."""
    return f": {event_type}.progress {json.dumps(data)}\n\n".encode()


class EventStream:
    """One streaming call: per-request progress listeners feed a queue that ``events`` turns into SSE bytes."""

    def __init__(self, call: ImageCall, render: Callable[[ImageResult], Awaitable[str]]):
        self.call = call
        self.render = render  # an image -> its URL in the store, for response_format url (outputs.py)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.listeners = [self._listener(i, r) for i, r in enumerate(call.requests)]

    def _listener(self, index: int, req: ImageRequest) -> Callable[[StepProgress], None]:
        def on_progress(ev: StepProgress) -> None:
            # The router hands every request of a batch every event: keep this request's previews only.
            self.queue.put_nowait(_sse_comment(self.call.event_type, {"index": index, "step": ev.step,
                                                                      "total_steps": ev.total_steps}))
            for request_id, k, image in ev.previews:
                if request_id == req.request_id:
                    self.queue.put_nowait((index, req, k, image))

        return on_progress

    async def _one(self, index: int, waiter: Awaitable[ImageResult]) -> None:
        try:
            r = await waiter
        except ZImageError as e:
            self.queue.put_nowait(_sse("error", error_body(e.message, e.error_type, e.param)))
            return
        if r.ok:
            try:
                url = await self.render(r) if self.call.response_format == "url" else None
                b64 = await run_blocking(b64_text, r.picture, self.call)
            except StorageError as e:
                self.queue.put_nowait(_sse("error", {**storage_failed_body(e), "index": index}))
                return
            except Exception:  # noqa: BLE001 - a stream must end each image with an event, whatever failed
                log.exception("request %s: rendering its image failed", r.request_id)
                self.queue.put_nowait(_sse("error", {**error_body(
                    "the image was generated but could not be encoded or stored; the cause is in the server log",
                    "server_error", None), "index": index}))
                return
            # The event line names what data.type says (image_edit.* for edits): clients dispatch on either.
            self.queue.put_nowait(_sse(f"{self.call.event_type}.completed",
                                       completed_event(self.call, index, r, b64, int(time.time()), url)))
        else:
            _, body = result_error(r)
            self.queue.put_nowait(_sse("error", {**body, "index": index}))

    async def events(self, waiters: list[Awaitable[ImageResult]]):
        tasks = [asyncio.ensure_future(self._one(i, w)) for i, w in enumerate(waiters)]
        waiter = asyncio.ensure_future(asyncio.gather(*tasks))
        waiter.add_done_callback(_retrieved)
        getter = None
        try:
            while not (waiter.done() and self.queue.empty()):
                getter = asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    continue
                item = getter.result()
                if isinstance(item, tuple):  # a preview: encoded here, in order, before its image's completion
                    index, req, k, image = item
                    b64 = await asyncio.get_running_loop().run_in_executor(None, b64_text, image, self.call)
                    item = _sse(f"{self.call.event_type}.partial_image",
                                partial_image_event(self.call, index, req, k, b64, int(time.time())))
                yield item
            yield b"data: [DONE]\n\n"
        finally:
            if getter is not None:
                getter.cancel()  # else a read of the queue stays pending, and is reported when it is collected
            for t in tasks:
                t.cancel()  # the client went away: drop what has not run
