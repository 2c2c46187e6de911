"""The HTTP service: OpenAI Images API, health, readiness, Prometheus metrics, graceful shutdown.

    zimage-orch serve clusters/local-cpu.yaml            # 127.0.0.1:8000 unless --host/--port say otherwise

Endpoints:
- ``POST /v1/images/generations``: OpenAI's request and response shapes as published (``images_api.py`` says
  what each field does), plus ``seed``, ``num_inference_steps``, ``guidance_scale``, ``negative_prompt``.
  ``"stream": true`` answers with server-sent events: ``image_generation.partial_image`` (``partial_images``
  previews), ``image_generation.completed`` with each image, ``error`` on failure; per-step progress travels as
  SSE comment lines (``: image_generation.progress {...}``), which SSE clients, the official one included, skip.
- ``POST /v1/images/edits``: OpenAI's edits (multipart, or JSON with data: URLs): img2img, inpainting with a
  ``mask``, plus ``strength`` and the generation extensions (docs/conditioning.md); stream events ``image_edit.*``.
- ``response_format: url``, signed links at ``GET /v1/outputs/{key}`` (``outputs.py``); OpenAI's Files and Batch APIs
  for batch jobs (``batch_api.py``).
- ``GET /v1/models``, ``GET|HEAD /healthz`` (alive), ``GET|HEAD /readyz`` (503 until every replica has warmed
  up), ``GET /metrics`` (Prometheus text). ``/docs``, ``/redoc``, ``/openapi.json`` only with ``server.docs``.
Every error, 404 and 405 included, uses OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``:
400 invalid input (naming the field), 401 bad or missing key, 413 body too large (checked while reading), 429
queue full (with ``Retry-After``, before a stream starts, for all ``n`` images or none), 503 not ready, 504
timeout, 507 a single image larger than GPU memory; 500 only for server faults, with no internal text (the
cause goes to the log; ``zimage_http_responses_total{status}`` counts them).
SIGTERM stops accepting connections, lets the requests in flight finish, then shuts the deployment down and exits 0.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from .config import Config, load_config
from .errors import InvalidRequestError, QueueFullError, ZImageError
from .images_api import (
    ImageCall,
    completed_event,
    images_response,
    parse_edit,
    parse_generation,
    parse_json_edit,
    partial_image_event,
)
from .messages import FailureKind, ImageRequest, ImageResult, StepProgress, failure
from .metrics import PrometheusObserver
from .outputs import b64_text, include_job_routes, render, storage_failed_body
from .request_id import RequestIdMiddleware
from .requests import parse_lora_registration, shown
from .storage import StorageError

log = logging.getLogger(__name__)

# How failed results map onto HTTP statuses and OpenAI error types.


class _JSON(JSONResponse):
    """JSON with every non-ASCII character escaped: whatever a caller sent (lone surrogates included) and we
    echo in a message can always be encoded, so an error response never turns into a 500 itself."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return _JSON(error_body(message, type_, param, code), status_code=status, headers=headers)


def _from_exception(e: ZImageError) -> JSONResponse:
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


def _result_error(r: ImageResult) -> tuple[int, dict]:
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


def _from_result(r: ImageResult) -> JSONResponse:
    status, body = _result_error(r)
    return _JSON(body, status_code=status, headers={"Retry-After": "1"} if status == 503 else None)


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, read chunk by chunk and abandoned at ``limit`` bytes: a chunked body (no
    Content-Length) is never held whole past the limit."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge()
    return bytes(body)


def _no_constant(name: str):
    raise InvalidRequestError(f"request body is not valid JSON: {name} is not a JSON value")


def parse_json(body: bytes):
    """Decode a request body, every failure a 400: syntax, encoding, nesting too deep for the decoder, numbers
    with more digits than Python converts, NaN/Infinity (not JSON)."""
    if not body.strip():
        raise InvalidRequestError("request body is empty; send a JSON object")
    try:
        return json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidRequestError("request body is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})")\
            from None
    except UnicodeDecodeError:
        raise InvalidRequestError("request body is not valid JSON: it is not UTF-8 text") from None
    except ValueError as e:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        if "digits" in str(e):
            raise InvalidRequestError("request body is not valid JSON here: a number has too many digits") from None
        raise InvalidRequestError("request body is not valid JSON") from None


class ResponseCounter:
    """ASGI middleware counting responses by status (``zimage_http_responses_total``), 5xx included. A pure
    ASGI wrapper, not Starlette's BaseHTTPMiddleware, which would hide client disconnects from the endpoints."""

    def __init__(self, app, observer: PrometheusObserver):
        self.app = app
        self.observer = observer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status: list[int] = []

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except BaseException:
            self.observer.http_response(status[0] if status else 500)
            raise
        self.observer.http_response(status[0] if status else 500)


class Service:
    """State shared by the endpoints: the config, the deployment (started in the background), the metrics."""

    def __init__(self, config: Config, deployment_factory: Callable[..., Awaitable] | None = None):
        self.config = config
        self.observer = PrometheusObserver()
        self.deployment = None
        self.start_error: str | None = None
        self._factory = deployment_factory
        self._start_task: asyncio.Task | None = None
        self._health_task: asyncio.Task | None = None
        keys = list(config.server.api_keys)
        keys += [k.strip() for k in os.environ.get("ZIMAGE_API_KEYS", "").split(",") if k.strip()]
        self.api_keys = [k.encode() for k in keys]

    async def start(self) -> None:
        from .deployment import Deployment

        factory = self._factory or Deployment.start
        try:
            self.deployment = await factory(self.config, observer=self.observer)
            self.observer.bind(self.deployment.router)
            self._health_task = asyncio.get_running_loop().create_task(self._poll_health())
            log.info("deployment ready: %d replica(s)", len(self.deployment.replicas))
        except Exception as e:  # noqa: BLE001 - reported on /readyz and in the log, the process stays up
            self.start_error = f"{type(e).__name__}: {e}"
            log.exception("deployment failed to start")

    def begin(self) -> None:
        self._start_task = asyncio.get_running_loop().create_task(self.start())

    async def stop(self) -> None:
        if self._health_task:
            self._health_task.cancel()
        if self._start_task and not self._start_task.done():
            self._start_task.cancel()
        if self.deployment is not None:
            await self.deployment.shutdown(drain_timeout_s=self.config.server.drain_timeout_s)

    async def _poll_health(self) -> None:
        while True:
            try:
                for rid, h in (await self.deployment.replica_health()).items():
                    self.observer.replica_state(rid, not isinstance(h, str), None if isinstance(h, str) else h)
            except Exception:  # noqa: BLE001
                log.debug("health poll failed", exc_info=True)
            await asyncio.sleep(5)

    @property
    def accepting(self) -> bool:
        """Started, with replicas: requests are queued even while every replica is restarting."""
        return self.deployment is not None and self.deployment.ready and bool(self.deployment.members())

    @property
    def ready(self) -> bool:
        """For /readyz (load balancers): at least one replica is serving right now."""
        return self.accepting and bool(self.deployment.live())

    def authorized(self, request: Request) -> bool:
        if not self.api_keys:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        return any(hmac.compare_digest(token.strip().encode(), k) for k in self.api_keys)


def create_app(config: Config, deployment_factory=None) -> FastAPI:
    service = Service(config, deployment_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.begin()
        app.state.jobs.begin()
        yield
        log.info("shutting down: draining in-flight requests")
        await app.state.jobs.stop()
        await service.stop()

    docs = config.server.docs
    app = FastAPI(title="zimage-orchestrator", version="0.1.0", lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.service = service
    include_job_routes(app, service)  # signed image links, files, batch jobs (outputs.py, batch_api.py)
    app.add_middleware(ResponseCounter, observer=service.observer)
    app.add_middleware(RequestIdMiddleware)  # X-Request-ID on every response and log line (request_id.py)
    limits = config.limits

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        where = shown(request.url.path, 80)
        message, code = {
            404: (f"no such endpoint: {where}", "not_found"),
            405: (f"method {request.method} is not allowed on {where}", "method_not_allowed"),
        }.get(exc.status_code, (str(exc.detail), None))
        return error_response(exc.status_code, message, "invalid_request_error", code=code,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(400, "invalid request", "invalid_request_error")

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "the server failed to handle this request; the cause is in its log",
                              "server_error")

    def guard(request: Request, limit: int | None = None, limit_name: str = "max_body_bytes") -> JSONResponse | None:
        """Key and body-size checks for /v1 endpoints. (A function, not an HTTP middleware: Starlette's
        BaseHTTPMiddleware hides client disconnects from the endpoint, and we cancel work on those.)"""
        if not service.authorized(request):
            return error_response(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                  "invalid_request_error", code="invalid_api_key")
        length = request.headers.get("content-length")
        limit = limits.max_body_bytes if limit is None else limit
        if length is not None and length.isdigit() and int(length) > limit:
            return error_response(413, f"request body is {int(length)} bytes; the limit is {limit} "
                                       f"(limits.{limit_name})", "invalid_request_error")
        return None

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        dep = service.deployment
        if service.ready:
            down = sorted(set(dep.replicas) - {r.replica_id for r in dep.live()})
            return {"status": "ready", "replicas": len(dep.replicas), "down": down}
        status = "failed" if service.start_error else "recovering" if service.accepting else "starting"
        return JSONResponse({"status": status, "error": service.start_error}, status_code=503)

    for path, endpoint in (("/healthz", healthz), ("/readyz", readyz)):  # HEAD for load balancers' probes
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(service.observer.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        if (denied := guard(request)) is not None:
            return denied
        return {"object": "list", "data": [{"id": config.server.served_model_name, "object": "model",
                                             "created": 0, "owned_by": "zimage-orchestrator"}]}

    def not_ready(count: bool = True):
        msg = "the deployment failed to start; see /readyz and the server log" if service.start_error else \
            "the deployment is starting; retry shortly"
        if count:  # an image request turned away (the metrics count those)
            service.observer.rejected(FailureKind.NOT_READY)
        f = failure(FailureKind.NOT_READY)
        return error_response(f.http_status, msg, f.openai_type, headers={"Retry-After": "5"})

    # ---- per-request LoRA adapters (an extension: OpenAI's API has none) ----------------------------------------
    def _lora_deployment() -> tuple[object | None, JSONResponse | None]:
        if not service.accepting:
            return None, not_ready(count=False)
        return service.deployment, None

    @app.get("/v1/loras")
    async def list_loras(request: Request):
        if (denied := guard(request)) is not None:
            return denied
        dep, err = _lora_deployment()
        if err is not None:
            return err
        return {"object": "list", "data": await dep.loras()}

    @app.post("/v1/loras")
    async def add_lora(request: Request):
        """``{"name", "path"}`` (or ``source`` / ``model_id`` / ``revision`` for a hub): loaded on every replica
        before the answer; 400 naming the field when the adapter cannot be used."""
        if (denied := guard(request)) is not None:
            return denied
        try:
            payload = parse_json(await read_body(request, limits.max_body_bytes))
        except BodyTooLarge:
            return error_response(413, f"request body is larger than {limits.max_body_bytes} bytes",
                                  "invalid_request_error")
        except InvalidRequestError as e:
            return _from_exception(e)
        try:
            spec = parse_lora_registration(payload)  # only the documented keys, string values
        except InvalidRequestError as e:
            return _from_exception(e)
        dep, err = _lora_deployment()
        if err is not None:
            return err
        try:
            info = await dep.register_lora(**spec)
        except ZImageError as e:
            return _from_exception(e)
        return JSONResponse(info, status_code=201)

    @app.delete("/v1/loras/{name}")
    async def delete_lora(name: str, request: Request):
        if (denied := guard(request)) is not None:
            return denied
        dep, err = _lora_deployment()
        if err is not None:
            return err
        try:
            found = await dep.unregister_lora(name)
        except ZImageError as e:  # a configured adapter: 409
            return _from_exception(e)
        if not found:
            return error_response(404, f"no LoRA adapter named {shown(name)} (GET /v1/loras lists them)",
                                  "invalid_request_error", param="name", code="not_found")
        return {"name": name, "deleted": True}

    # Input images (edits, control_image) are decoded off the event loop the router shares, and only
    # limits.max_concurrent_image_decodes requests at a time: a burst of uploads waits its turn instead of holding
    # every decode in memory at once (image_input.py decodes a request's images one by one).
    decode_slots = asyncio.Semaphore(limits.max_concurrent_image_decodes)

    def refused(e: ZImageError):
        """A request refused while it is read or parsed: counted, and answered in the error envelope."""
        service.observer.rejected(e.kind)
        return _from_exception(e)

    async def decode_images(fn, *args):
        async with decode_slots:  # the thread runs in this request's context: its X-Request-ID, for trace_id
            return await asyncio.get_running_loop().run_in_executor(None, contextvars.copy_context().run, fn, *args)

    async def read_image_request(request: Request, field: str):
        """The body of a generations or edits request, or a 413 (counted as a rejection) past ``limits.<field>``."""
        limit = getattr(limits, field)
        try:
            return await read_body(request, limit), None
        except BodyTooLarge:
            service.observer.rejected(FailureKind.INVALID_REQUEST)
            return None, error_response(413, f"request body is larger than {limit} bytes (limits.{field})",
                                        "invalid_request_error")

    async def answer(request: Request, call, dep):
        """Admit a parsed generation or edit call and answer it: JSON, or an SSE stream."""
        if call.user is not None or call.safety_identifier is not None:
            log.info("request %s: user=%s safety_identifier=%s", call.requests[0].request_id,
                     shown(call.user), shown(call.safety_identifier))
        if call.stream:
            stream = _Stream(call, partial(render, request, call))
            try:  # admission before the stream starts: a refusal is a plain HTTP status, for all n or none
                waiters = dep.admit(call.requests, on_progress=stream.listeners)
            except ZImageError as e:
                return _from_exception(e)
            return StreamingResponse(stream.events(waiters), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            waiters = dep.admit(call.requests)
        except ZImageError as e:
            return _from_exception(e)
        return await _generate(request, call, waiters)

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        if (denied := guard(request)) is not None:
            return denied
        body, too_large = await read_image_request(request, "max_body_bytes")
        if too_large is not None:
            return too_large
        try:
            payload = parse_json(body)
        except InvalidRequestError as e:
            return refused(e)
        if not service.accepting:
            return not_ready()
        dep = service.deployment
        try:
            if isinstance(payload, dict) and payload.get("control_image") is not None:  # an image to decode
                call = await decode_images(parse_generation, payload, config, getattr(dep, "max_side", None),
                                           getattr(dep, "lora_names", None))
            else:
                call = parse_generation(payload, config, getattr(dep, "max_side", None),
                                        getattr(dep, "lora_names", None))
        except ZImageError as e:
            return refused(e)
        return await answer(request, call, dep)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        """OpenAI's image edits (multipart/form-data): img2img, and inpainting with a ``mask``
        (``images_api.parse_edit`` says what each field does, ``image_input.py`` the image rules)."""
        if (denied := guard(request, limits.max_upload_bytes, "max_upload_bytes")) is not None:
            return denied
        body, too_large = await read_image_request(request, "max_upload_bytes")
        if too_large is not None:
            return too_large
        json_body = request.headers.get("content-type", "").lower().startswith("application/json")
        try:
            if json_body:  # the spec's JSON form: images as data: URLs (up to max_upload_bytes: parsed off the loop)
                payload = await decode_images(parse_json, body)
            else:
                fields, files = await parse_multipart(request.headers, body)
        except InvalidRequestError as e:
            return refused(e)
        if not service.accepting:
            return not_ready()
        dep = service.deployment
        try:  # decoding and resizing images is CPU work: off the event loop, a bounded number at a time
            if json_body:
                call = await decode_images(parse_json_edit, payload, config, getattr(dep, "max_side", None),
                                           getattr(dep, "lora_names", None))
            else:
                call = await decode_images(partial(parse_edit, known_loras=getattr(dep, "lora_names", None)),
                                           fields, files, config, getattr(dep, "max_side", None))
        except ZImageError as e:
            return refused(e)
        return await answer(request, call, dep)

    return app


class _InMemoryParser(MultiPartParser):
    spool_max_size = 1 << 40  # the body is in memory already (within limits): no round trip through a disk file


async def parse_multipart(headers, body: bytes) -> tuple[dict, dict]:
    """An edit's multipart body -> (text fields, ``{"image": [bytes, ...], "mask": bytes | None}``, plus
    ``control_image`` when sent). ``image`` and ``image[]`` (the official client's name for an array) both collect
    into ``image``. Up to 16 images, a mask and a control image: ``MAX_IMAGES + 2`` files."""
    from .image_input import MAX_IMAGES

    ctype = headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise InvalidRequestError("send the edit as multipart/form-data with the image file(s) in `image`, or as "
                                  "application/json with `images` as data: URLs", param="image")

    async def chunks():
        yield body

    try:
        form = await _InMemoryParser(headers, chunks(), max_files=MAX_IMAGES + 2, max_fields=64,
                                     max_part_size=1024 * 1024).parse()
    except MultiPartException as e:
        raise InvalidRequestError(f"the multipart body cannot be read: {e.message}") from None
    fields: dict = {}
    files: dict = {"image": [], "mask": None}
    try:
        for name, value in form.multi_items():
            key = "image" if name == "image[]" else name
            if isinstance(value, str):
                if key in fields:
                    raise InvalidRequestError(f"{shown(key, 40)} is sent more than once", param=key)
                fields[key] = value
            elif key == "image":
                files["image"].append(await value.read())
            elif key == "mask":
                if files["mask"] is not None:
                    raise InvalidRequestError("mask is sent more than once; send one mask", param="mask")
                files["mask"] = await value.read()
            else:
                files[key] = await value.read()
    finally:
        await form.close()
    return fields, files


async def _generate(request: Request, call: ImageCall, waiters: list[Awaitable[ImageResult]]) -> Response:
    work = asyncio.ensure_future(asyncio.gather(*waiters, return_exceptions=True))
    # A client that goes away has its queued requests cancelled rather than computed.
    while not work.done():
        done, _ = await asyncio.wait({work}, timeout=0.25)
        if not done and await request.is_disconnected():
            work.cancel()
            log.info("client disconnected; cancelled %d request(s)", len(call.requests))
            return Response(status_code=499)
    outcomes = work.result()
    for o in outcomes:
        if isinstance(o, ZImageError):
            return _from_exception(o)
        if isinstance(o, BaseException):
            log.error("unexpected error: %r", o)
            return error_response(500, "the server failed to handle this request; the cause is in its log",
                                  "server_error")
        if not o.ok:
            return _from_result(o)
    loop = asyncio.get_running_loop()
    try:
        b64 = await asyncio.gather(*(render(request, call, o) for o in outcomes))
    except StorageError as e:
        return _JSON(storage_failed_body(e), status_code=e.http_status)
    # The body (megabytes of base64 per image) is serialized off the event loop too: the router's dispatch loop
    # shares this loop, and a batch's worth of responses rendered on it would delay the next dispatch.
    body = await loop.run_in_executor(None, _JSON(None).render, images_response(call, outcomes, b64,
                                                                               int(time.time())))
    return Response(body, media_type="application/json")


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=True)}\n\n".encode()


def _sse_comment(data: dict) -> bytes:
    """Progress as an SSE comment line: SSE clients skip comments (the official openai client turns every
    ``data:`` event into an image event, and an event without data into a JSON error), so it reaches only the
    clients that look for it."""
    return f": image_generation.progress {json.dumps(data)}\n\n".encode()


class _Stream:
    """One streaming call: per-request progress listeners feed a queue that ``events`` turns into SSE bytes."""

    def __init__(self, call: ImageCall, render: Callable[[ImageResult], Awaitable[str]]):
        self.call = call
        self.render = render
        self.queue: asyncio.Queue = asyncio.Queue()
        self.listeners = [self._listener(i, r) for i, r in enumerate(call.requests)]

    def _listener(self, index: int, req: ImageRequest) -> Callable[[StepProgress], None]:
        def on_progress(ev: StepProgress) -> None:
            # The router hands every request of a batch every event: keep this request's previews only.
            self.queue.put_nowait(_sse_comment({"index": index, "step": ev.step, "total_steps": ev.total_steps}))
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
                b64 = await self.render(r)
            except StorageError as e:
                self.queue.put_nowait(_sse("error", {**storage_failed_body(e), "index": index}))
                return
            self.queue.put_nowait(_sse("image_generation.completed",
                                       completed_event(self.call, index, r, b64, int(time.time()))))
        else:
            _, body = _result_error(r)
            self.queue.put_nowait(_sse("error", {**body, "index": index}))

    async def events(self, waiters: list[Awaitable[ImageResult]]):
        tasks = [asyncio.ensure_future(self._one(i, w)) for i, w in enumerate(waiters)]
        waiter = asyncio.ensure_future(asyncio.gather(*tasks))
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
                    item = _sse("image_generation.partial_image",
                                partial_image_event(self.call, index, req, k, b64, int(time.time())))
                yield item
            yield b"data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()  # the client went away: drop what has not run


# ---- CLI (arguments are declared in cli.py, so `zimage-orch --help` imports no web stack) -----------------
def cmd_serve(args) -> int:
    import uvicorn

    config = load_config(args.config, args.set)
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the API is reachable beyond this machine%s", host,
                    "" if config.server.api_keys or os.environ.get("ZIMAGE_API_KEYS") else " and has NO API key")
    from . import ray_backend

    # Ray installs a SIGTERM handler that exits at once; connect first so that uvicorn's graceful handler is
    # the one in force while serving, and make the handler uvicorn restores (and re-raises into) a no-op, so a
    # drained shutdown exits 0.
    ray_backend.connect(config.cluster)
    signal.signal(signal.SIGTERM, lambda *_: log.info("SIGTERM: drained, exiting"))
    app = create_app(config)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, log_config=None,  # our format
                timeout_graceful_shutdown=int(config.server.drain_timeout_s))
    return 0

