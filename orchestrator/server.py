"""The HTTP service: OpenAI's Images API (``images_api.py``; edits: docs/conditioning.md), image links
(``outputs.py``), the Files and Batch APIs (``batch_api.py``), ``/v1/models``, ``/healthz``, ``/readyz`` (503 until
every replica has warmed up, or while no live replica answers), ``/metrics`` and the docs (``ops_endpoints.py``),
and graceful shutdown (SIGTERM: stop accepting, let the requests in flight finish, shut the deployment down, exit 0).
README.md lists the endpoints and status codes.

    zimage-orch serve clusters/local-cpu.yaml            # 127.0.0.1:8000 unless --host/--port say otherwise

Every error, 404 and 405 included, uses OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``; a 500
only for server faults, with no internal text (the cause goes to the log). Connection limits and the fault barrier:
``http_guard.py``; upload and decode admission: ``uploads.py``."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import hmac
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from placement.planner import PlacementError
from zimage_common.config import Config, load_config
from zimage_common.errors import InvalidRequestError, QueueFullError, ZImageError
from zimage_common.messages import FailureKind, failure

from .answers import EventStream, answer_json
from .frontdoor_metrics import frontdoor_name, labelled_registry
from .http_errors import error_response, from_exception
from .http_guard import BodyDeadline, FaultBarrier
from .idempotency import HEADER, body_digest, keyed_answer, parse_key
from .image_input import MAX_IMAGES, input_pixels
from .images_api import (
    json_edit_parts,
    parse_edit,
    parse_generation,
)
from .metrics import PrometheusObserver
from .ops_endpoints import add_ops_routes, start_metrics_listener, without_host_paths
from .outputs import include_job_routes, render
from .request_id import RequestIdMiddleware
from .requests import decimal, parse_lora_registration, shown
from .uploads import (
    BodyReservation,
    BodyTooLarge,
    ByteBudget,
    DecodeQueue,
    limited,
    parse_json,
    parse_multipart,
    read_body,
    stream_multipart,
)

__all__ = ["BodyTooLarge", "create_app", "parse_json", "parse_multipart", "read_body"]

log = logging.getLogger(__name__)


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
        finally:
            self.observer.http_response(status[0] if status else 500)


class Service:
    """State shared by the endpoints: the config, the deployment (started in the background), the metrics."""

    def __init__(self, config: Config, deployment_factory: Callable[..., Awaitable] | None = None):
        self.config = config
        self.observer = PrometheusObserver()
        self.name = frontdoor_name(config)  # the `frontdoor` label on every metric this process exports
        self.metrics_registry = labelled_registry(self.observer.registry, self.name)
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
            # What start-up made (the libraries, the deployment) lives as long as the process: out of the cyclic
            # collector's reach, a full collection walks only what requests and connections made, instead of
            # stalling the event loop for every object the process has (half a second under a connection flood).
            gc.collect()
            gc.freeze()
        except Exception as e:  # noqa: BLE001 - reported on /readyz and in the log, the process stays up
            self.start_error = f"{type(e).__name__}: {e}"
            # Our own errors carry their message (what does not fit; a replica's failure as its first line, its
            # traceback being in that replica's log); anything else keeps its traceback.
            if isinstance(e, (ZImageError, PlacementError)):
                log.error("deployment failed to start: %s", e)
            else:
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
                self.observer.replica_queues(await self.deployment.queue_lengths())
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

    def denied(self, request: Request) -> JSONResponse | None:
        """The 401 for a request without a valid bearer key (when keys are set), else None. Two Authorization
        headers are a 400 whether keys are set or not: which one counts would differ between a proxy, this check
        and the idempotency scope (``idempotency.scope``), which reads the first."""
        if (twice := repeated_header(request, "Authorization")) is not None:
            return twice
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not self.api_keys or (scheme.lower() == "bearer" and token and
                                 any(hmac.compare_digest(token.strip().encode(), k) for k in self.api_keys)):
            return None
        return error_response(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                              "invalid_request_error", code="invalid_api_key")

    def too_large(self, field: str, limit: int) -> JSONResponse:
        """The 413 for a body over ``limits.<field>``, counted as a rejected request."""
        self.observer.rejected(FailureKind.INVALID_REQUEST)
        return error_response(413, f"request body is larger than {limit} bytes (limits.{field})",
                              "invalid_request_error")


def repeated_header(request: Request, name: str) -> JSONResponse | None:
    """The 400 for a header that must come once and came more often (which one counts would differ between a
    proxy and this server), else None."""
    n = len(request.headers.getlist(name))
    if n < 2:
        return None
    return error_response(400, f"send one {name} header; this request has {n}", "invalid_request_error",
                          param=name, code="duplicate_header")


def _is_route(app: FastAPI, path: str) -> bool:
    """Whether some route of ``app`` serves ``path`` (with any method)."""
    from starlette.routing import Match

    scope = {"type": "http", "path": path, "method": "GET", "root_path": ""}
    return any(route.matches(scope)[0] != Match.NONE for route in app.router.routes)


def create_app(config: Config, deployment_factory=None) -> FastAPI:
    service = Service(config, deployment_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        srv = config.server
        metrics_server = None if srv.metrics_port is None else \
            start_metrics_listener(srv.metrics_host, srv.metrics_port, service.metrics_registry)
        app.state.metrics_server = metrics_server
        service.begin()
        app.state.jobs.begin()
        yield
        log.info("shutting down: draining in-flight requests")
        if metrics_server is not None:
            metrics_server.shutdown()
        await app.state.jobs.stop()
        await service.stop()

    # The docs routes are added by add_ops_routes, behind the key.
    # No redirect for a trailing slash: Starlette's 307 names an absolute URL built from the Host this process saw,
    # which behind a TLS proxy is the internal http:// address; a 404 that names the path to use is clearer.
    app = FastAPI(title="zimage-orchestrator", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.state.service = service
    include_job_routes(app, service)  # signed image links, files, batch jobs (outputs.py, batch_api.py)
    # Outermost last: request id > response counter > fault barrier > body deadline > the app (http_guard.py).
    app.add_middleware(BodyDeadline, idle_s=config.server.body_idle_timeout_s, total_s=config.server.body_timeout_s)
    app.add_middleware(FaultBarrier)
    app.add_middleware(ResponseCounter, observer=service.observer)
    app.add_middleware(RequestIdMiddleware)  # X-Request-ID on every response and log line (request_id.py)
    limits = config.limits

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        where, bare = shown(request.url.path, 80), request.url.path.rstrip("/") or "/"
        message, code = {
            404: (f"no such endpoint: {where}" + (f" (without the trailing slash: {shown(bare, 80)})"
                                                     if bare != request.url.path and _is_route(app, bare) else ""),
                  "not_found"),
            405: (f"method {request.method} is not allowed on {where}", "method_not_allowed"),
        }.get(exc.status_code, (str(exc.detail), None))
        return error_response(exc.status_code, message, "invalid_request_error", code=code,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        # FastAPI's own checks of path and query parameters (the request bodies are parsed by this server's code)
        errors = exc.errors()
        if not errors:
            return error_response(400, "invalid request", "invalid_request_error")
        first = errors[0]
        name = str(first.get("loc", ("", ""))[-1])
        where = {"query": "query parameter", "path": "path parameter", "header": "header"}.get(
            str(first.get("loc", ("",))[0]), "field")
        return error_response(400, f"{where} {shown(name, 40)}: {first.get('msg', 'invalid')}, got "
                                   f"{shown(first.get('input'))}", "invalid_request_error", param=name or None)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "the server failed to handle this request; the cause is in its log",
                              "server_error")

    def guard(request: Request, limit: int | None = None, limit_name: str = "max_body_bytes") -> JSONResponse | None:
        """Key and body-size checks for /v1 endpoints. (A function, not an HTTP middleware: Starlette's
        BaseHTTPMiddleware hides client disconnects from the endpoint, and we cancel work on those.)"""
        if (denied := service.denied(request)) is not None:
            return denied
        length = decimal(request.headers.get("content-length"), max_digits=4000)
        limit = limits.max_body_bytes if limit is None else limit
        if length is not None and length > limit:
            service.observer.rejected(FailureKind.INVALID_REQUEST)
            return error_response(413, f"request body is {length} bytes; the limit is {limit} "
                                       f"(limits.{limit_name})", "invalid_request_error")
        return None

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        dep = service.deployment
        if service.ready:
            live = {r.replica_id for r in dep.live()}
            silent = [rid for rid in getattr(dep, "not_answering", list)() if rid in live]
            answering = len(silent) < len(live)
            return JSONResponse({"status": "ready" if answering else "not_answering", "replicas": len(dep.replicas),
                                 "down": sorted(set(dep.replicas) - live), "not_answering": silent},
                                status_code=200 if answering else 503)
        status = "failed" if service.start_error else "recovering" if service.accepting else "starting"
        return JSONResponse({"status": status, "error": without_host_paths(service.start_error)}, status_code=503)

    for path, endpoint in (("/healthz", healthz), ("/readyz", readyz)):  # HEAD for load balancers' probes
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    add_ops_routes(app, service.metrics_registry, service.denied, config.server.docs)

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
    @app.get("/v1/loras")
    async def list_loras(request: Request):
        if (denied := guard(request)) is not None:
            return denied
        if not service.accepting:
            return not_ready(count=False)
        return {"object": "list", "data": await service.deployment.loras()}

    @app.post("/v1/loras")
    async def add_lora(request: Request):
        """``{"name", "path"}`` (or ``source`` / ``model_id`` / ``revision`` for a hub): loaded on every replica
        before the answer; 400 naming the field when the adapter cannot be used."""
        if (denied := guard(request)) is not None:
            return denied
        try:
            spec = parse_lora_registration(parse_json(await read_body(request, limits.max_body_bytes)))
        except BodyTooLarge:
            return service.too_large("max_body_bytes", limits.max_body_bytes)
        except InvalidRequestError as e:  # parse_lora_registration: only the documented keys, string values
            return from_exception(e)
        if not service.accepting:
            return not_ready(count=False)
        try:
            info = await service.deployment.register_lora(**spec)
        except ZImageError as e:
            return from_exception(e)
        return JSONResponse(info, status_code=201)

    @app.delete("/v1/loras/{name}")
    async def delete_lora(name: str, request: Request):
        if (denied := guard(request)) is not None:
            return denied
        if not service.accepting:
            return not_ready(count=False)
        try:
            found = await service.deployment.unregister_lora(name)
        except ZImageError as e:  # a configured adapter: 409
            return from_exception(e)
        if not found:
            return error_response(404, f"no LoRA adapter named {shown(name)} (GET /v1/loras lists them)",
                                  "invalid_request_error", param="name", code="not_found")
        return {"name": name, "deleted": True}

    # Input images (edits, control_image) are decoded off the event loop the router shares, admitted by their
    # pixels (limits.decode_pixel_budget); an edit's body is admitted by its bytes before it is read and holds them
    # until its images are decoded (limits.max_inflight_upload_bytes): uploads.py.
    decoder = DecodeQueue(limits.decode_pixel_budget, limits.max_concurrent_image_decodes)
    upload_budget = ByteBudget(limits.max_inflight_upload_bytes)
    app.state.decoder, app.state.upload_budget = decoder, upload_budget

    def refused(e: ZImageError):
        """A request refused while it is read or parsed: counted, and answered in the error envelope."""
        service.observer.rejected(e.kind)
        return from_exception(e)

    def off_loop(fn, *args):
        # the thread runs in this request's context: its X-Request-ID, for trace_id
        return asyncio.get_running_loop().run_in_executor(None, contextvars.copy_context().run, fn, *args)

    async def decode_images(images: list, fn, *args):
        """``fn(*args)`` off the loop, once the decode queue admits the pixels of ``images`` (from their headers)."""
        pixels = await off_loop(input_pixels, images, limits)
        async with decoder.slot(pixels, limits.decode_wait_s):
            return await off_loop(fn, *args)

    async def answer(request: Request, call, dep):
        """Admit a parsed generation or edit call and answer it: JSON, or an SSE stream; with an Idempotency-Key,
        a retry's recorded answer instead (idempotency.py)."""
        if (twice := repeated_header(request, HEADER)) is not None:
            service.observer.rejected(FailureKind.INVALID_REQUEST)
            return twice
        try:
            key = parse_key(request.headers.get(HEADER))
        except ValueError as e:
            return refused(InvalidRequestError(str(e), param=HEADER))
        store = getattr(dep, "idempotency", None)
        if key is not None and store is not None:
            return await keyed_answer(request, call, key, store, partial(admit_and_answer, request, dep=dep),
                                      config.router.request_timeout_s, service.observer.idempotent_call,
                                      config.outputs.url_ttl_s if call.response_format == "url" else None)
        return await admit_and_answer(request, call, dep)

    async def admit_and_answer(request: Request, call, dep):
        if call.user is not None or call.safety_identifier is not None:
            log.info("request %s: user=%s safety_identifier=%s", call.requests[0].request_id,
                     shown(call.user), shown(call.safety_identifier))
        if call.stream:
            stream = EventStream(call, partial(render, request, call))
            try:  # admission before the stream starts: a refusal is a plain HTTP status, for all n or none
                waiters = dep.admit(call.requests, on_progress=stream.listeners)
            except ZImageError as e:
                return from_exception(e)
            return StreamingResponse(stream.events(waiters), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            waiters = dep.admit(call.requests)
        except ZImageError as e:
            return from_exception(e)
        return await answer_json(request, call, waiters)

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        if (denied := guard(request)) is not None:
            return denied
        try:
            body = await read_body(request, limits.max_body_bytes)
        except BodyTooLarge:
            return service.too_large("max_body_bytes", limits.max_body_bytes)
        try:
            payload = parse_json(body)
        except InvalidRequestError as e:
            return refused(e)
        if not service.accepting:
            return not_ready()
        dep = service.deployment
        args = (payload, config, getattr(dep, "max_side", None), getattr(dep, "lora_names", None))
        try:
            if isinstance(payload, dict) and payload.get("control_image") is not None:  # an image to decode
                call = await decode_images([payload["control_image"]], parse_generation, *args)
            else:
                call = parse_generation(*args)
        except ZImageError as e:
            return refused(e)
        if HEADER in request.headers:
            call = replace(call, body_digest=body_digest("generations", payload))
        return await answer(request, call, dep)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        """OpenAI's image edits (multipart/form-data): img2img, and inpainting with a ``mask``
        (``images_api.parse_edit`` says what each field does, ``image_input.py`` the image rules)."""
        if (denied := guard(request, limits.max_upload_bytes, "max_upload_bytes")) is not None:
            return denied
        length = decimal(request.headers.get("content-length"), max_digits=4000)
        limit = length if length is not None else limits.max_upload_bytes  # guard() refused a larger one
        held = BodyReservation(upload_budget, length, limit, limits.upload_wait_s)
        try:
            await held.open()
            call = await edit_call(request, limit, held)
        except QueueFullError as e:
            return refused(e)
        finally:
            held.release()
        if isinstance(call, Response):
            return call
        return await answer(request, call, service.deployment)

    async def edit_call(request: Request, limit: int, held: BodyReservation):
        """An edit's body read (multipart: parsed as it streams) and its images decoded -> an ImageCall, or the
        response refusing it."""
        json_body = request.headers.get("content-type", "").lower().startswith("application/json")
        try:
            if json_body:  # the spec's JSON form: images as data: URLs (up to max_upload_bytes: parsed off the loop)
                payload = await off_loop(parse_json, await read_body(held.guard(request.stream()), limit))
                fields, files = await off_loop(json_edit_parts, payload)
                del payload
            else:
                fields, files = await stream_multipart(request.headers, limited(held.guard(request.stream()), limit),
                                                       limits.max_image_bytes, MAX_IMAGES + 2)
        except BodyTooLarge:
            return service.too_large("max_upload_bytes", limits.max_upload_bytes)
        except InvalidRequestError as e:
            return refused(e)
        if not service.accepting:
            return not_ready()
        dep = service.deployment
        images = [*files.get("image", ()), files.get("mask"), files.get("control_image"), fields.get("control_image")]
        parse = partial(parse_edit, typed=json_body, image_param="images" if json_body else "image",
                        known_loras=getattr(dep, "lora_names", None))
        try:  # decoding and resizing images is CPU work: off the event loop, admitted by pixels
            call = await decode_images(images, parse, fields, files, config, getattr(dep, "max_side", None))
        except ZImageError as e:
            return refused(e)
        if HEADER in request.headers:
            call = replace(call, body_digest=await off_loop(body_digest, "edits", fields, files))
        return call

    return app


# ---- CLI (arguments are declared in cli.py, so `zimage-orch --help` imports no web stack) -----------------
def cmd_serve(args) -> int:
    import uvicorn

    from zimage_common.logging_setup import API_KEYS_ENV, take_api_keys_from_env

    from .http_guard import uvicorn_config

    config = load_config(args.config, args.set)
    # The keys move from the environment into this process's config before Ray starts: a local Ray's workers (the
    # replicas) inherit this environment, and no replica needs them.
    env_set = API_KEYS_ENV in os.environ
    env_keys = take_api_keys_from_env()
    if env_set and not env_keys:  # an empty secret (a template or secret store that gave nothing) is no open door
        raise InvalidRequestError(f"{API_KEYS_ENV} is set but holds no key; give one or more comma-separated keys, "
                                  f"or unset it to serve without authentication", param=API_KEYS_ENV)
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port  # on the config too: the metrics label
    config = config.model_copy(update={"server": config.server.model_copy(
        update={"port": port, "api_keys": [*config.server.api_keys, *env_keys]})})
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the API is reachable beyond this machine%s", host,
                    "" if config.server.api_keys else " and has NO API key")
    from . import ray_backend
    from .cli_args import check_listen

    where = "/".join(flag if given else field for flag, field, given in (
        ("--host", "server.host", args.host is not None), ("--port", "server.port", args.port is not None)))
    check_listen(host, port, where)  # before Ray starts and models load
    if config.server.metrics_port:
        check_listen(config.server.metrics_host, config.server.metrics_port,
                     "server.metrics_host/server.metrics_port")
    # Ray installs a SIGTERM handler that exits at once; connect first so that uvicorn's graceful handler is
    # the one in force while serving, and make the handler uvicorn restores (and re-raises into) a no-op, so a
    # drained shutdown exits 0.
    ray_backend.connect(config.cluster)
    signal.signal(signal.SIGTERM, lambda *_: log.info("SIGTERM: drained, exiting"))
    app = create_app(config)
    uvicorn.Server(uvicorn_config(app, config.server, host, port, log_level="info", access_log=False,
                                  log_config=None,  # our format
                                  timeout_graceful_shutdown=int(config.server.drain_timeout_s))).run()
    return 0
