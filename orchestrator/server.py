"""The HTTP service: OpenAI Images API, health, readiness, Prometheus metrics, graceful shutdown.

    zimage-orch serve clusters/local-cpu.yaml            # 127.0.0.1:8000 unless --host/--port say otherwise

Endpoints:
- ``POST /v1/images/generations``: OpenAI's request and response shapes (``model``, ``prompt``, ``n``, ``size``,
  ``response_format`` = ``b64_json``, ``user``), plus ``seed``, ``num_inference_steps``, ``guidance_scale``,
  ``negative_prompt``. ``"stream": true`` answers with server-sent events: ``image_generation.progress`` after
  every denoising step, ``image_generation.completed`` with each image, ``error`` on failure.
- ``GET /v1/models``, ``GET /healthz`` (alive), ``GET /readyz`` (503 until every replica has warmed up),
  ``GET /metrics`` (Prometheus text).
Errors use OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``: 400 invalid input (naming the
field), 401 bad or missing key, 413 body too large, 429 queue full (with ``Retry-After``), 503 not ready, 504 timeout.
SIGTERM stops accepting connections, lets the requests in flight finish, then shuts the deployment down and exits 0.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .config import Config, load_config
from .errors import InvalidRequestError, QueueFullError, ZImageError
from .logging_setup import current_request_id
from .messages import ImageRequest, ImageResult, StepProgress
from .metrics import PrometheusObserver
from .request_id import RequestIdMiddleware
from .requests import build_requests, parse_size

log = logging.getLogger(__name__)

# Fields of OpenAI's images API that a client may send and that we accept (some only with their default).
_ACCEPTED = {"model", "prompt", "n", "size", "response_format", "user", "seed", "num_inference_steps",
             "guidance_scale", "negative_prompt", "stream", "quality", "style", "output_format", "background",
             "moderation", "output_compression", "partial_images"}

# How failed results map onto HTTP statuses and OpenAI error types.
_RESULT_STATUS = {
    "timeout": (504, "timeout"),
    "cancelled": (499, "cancelled"),
    "not_ready": (503, "service_unavailable"),
    "replica_lost": (503, "service_unavailable"),
    "out_of_memory": (507, "insufficient_memory"),
}


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _from_exception(e: ZImageError) -> JSONResponse:
    headers = None
    if isinstance(e, QueueFullError):
        headers = {"Retry-After": str(max(1, int(round(e.retry_after_s))))}
    return error_response(e.http_status, e.message, e.error_type, e.param, headers=headers)


def _from_result(r: ImageResult) -> JSONResponse:
    status, type_ = _RESULT_STATUS.get(r.error_type or "", (500, "server_error"))
    headers = {"Retry-After": "1"} if status == 503 else None
    return error_response(status, r.error or "generation failed", type_, code=r.error_type, headers=headers)


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
        yield
        log.info("shutting down: draining in-flight requests")
        await service.stop()

    app = FastAPI(title="zimage-orchestrator", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(RequestIdMiddleware)  # X-Request-ID on every response and log line (request_id.py)
    limits = config.limits

    def guard(request: Request) -> JSONResponse | None:
        """Key and body-size checks for /v1 endpoints. (A function, not an HTTP middleware: Starlette's
        BaseHTTPMiddleware hides client disconnects from the endpoint, and we cancel work on those.)"""
        if not service.authorized(request):
            return error_response(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                  "invalid_request_error", code="invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            return error_response(413, f"request body is {length} bytes; the limit is {limits.max_body_bytes} "
                                       f"(limits.max_body_bytes)", "invalid_request_error")
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

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(service.observer.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        if (denied := guard(request)) is not None:
            return denied
        return {"object": "list", "data": [{"id": config.server.served_model_name, "object": "model",
                                             "created": 0, "owned_by": "zimage-orchestrator"}]}

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        if (denied := guard(request)) is not None:
            return denied
        body = await request.body()
        if len(body) > limits.max_body_bytes:
            return error_response(413, f"request body is larger than {limits.max_body_bytes} bytes "
                                       f"(limits.max_body_bytes)", "invalid_request_error")
        try:
            payload = json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error_response(400, f"request body is not valid JSON: {e}", "invalid_request_error")
        if not service.accepting:
            msg = f"the deployment failed to start: {service.start_error}" if service.start_error else \
                "the deployment is starting; retry shortly"
            return error_response(503, msg, "service_unavailable", headers={"Retry-After": "5"})
        try:
            requests, stream = _parse(payload, config)
        except ZImageError as e:
            service.observer.rejected(e.error_type)
            return _from_exception(e)
        if stream:
            return StreamingResponse(_stream(service, requests), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _generate(service, request, requests)

    return app


def _parse(payload, config: Config) -> tuple[list[ImageRequest], bool]:
    if not isinstance(payload, dict):
        raise InvalidRequestError("request body must be a JSON object")
    unknown = sorted(set(payload) - _ACCEPTED)
    if unknown:
        raise InvalidRequestError(f"unknown field(s) {unknown}; accepted: {sorted(_ACCEPTED)}", param=unknown[0])
    if "prompt" not in payload:
        raise InvalidRequestError("prompt is required", param="prompt")
    model = payload.get("model")
    if model is not None and model != config.server.served_model_name:
        raise InvalidRequestError(f"model {model!r} is not served here; use {config.server.served_model_name!r}",
                                  param="model")
    fmt = payload.get("response_format") or "b64_json"
    if fmt != "b64_json":
        raise InvalidRequestError(f"response_format {fmt!r} is not supported; use 'b64_json'",
                                  param="response_format")
    out_fmt = payload.get("output_format")
    if out_fmt not in (None, "png"):
        raise InvalidRequestError(f"output_format {out_fmt!r} is not supported; use 'png'", param="output_format")
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequestError("stream must be true or false", param="stream")
    width, height = parse_size(payload.get("size"), config.defaults)
    requests = build_requests(
        payload["prompt"], defaults=config.defaults, limits=config.limits, n=payload.get("n", 1),
        width=width, height=height, num_inference_steps=payload.get("num_inference_steps"),
        guidance_scale=payload.get("guidance_scale"), seed=payload.get("seed"),
        negative_prompt=payload.get("negative_prompt"), trace_id=current_request_id(),
    )
    return requests, stream


async def _generate(service: Service, request: Request, requests: list[ImageRequest]) -> Response:
    dep = service.deployment
    work = asyncio.ensure_future(asyncio.gather(*(dep.submit(r) for r in requests), return_exceptions=True))
    # A client that goes away has its queued requests cancelled rather than computed.
    while not work.done():
        done, _ = await asyncio.wait({work}, timeout=0.25)
        if not done and await request.is_disconnected():
            work.cancel()
            log.info("client disconnected; cancelled %d request(s)", len(requests))
            return Response(status_code=499)
    outcomes = work.result()
    for o in outcomes:
        if isinstance(o, ZImageError):
            return _from_exception(o)
        if isinstance(o, BaseException):
            log.error("unexpected error: %r", o)
            return error_response(500, f"{type(o).__name__}: {o}", "server_error")
        if not o.ok:
            return _from_result(o)
    b64 = await asyncio.gather(*(_b64_png(o) for o in outcomes))
    return JSONResponse({
        "created": int(time.time()),
        "data": [{"b64_json": b, "revised_prompt": None, "seed": o.seed} for b, o in zip(b64, outcomes)],
        "usage": {"images": len(outcomes)},
    })


async def _b64_png(result: ImageResult) -> str:
    """PNG-encode in a worker thread: zlib releases the GIL, so images encode in parallel off the event loop."""
    png = await asyncio.get_running_loop().run_in_executor(None, lambda: result.png)
    return base64.b64encode(png).decode()


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def _stream(service: Service, requests: list[ImageRequest]):
    events: asyncio.Queue = asyncio.Queue()

    async def one(index: int, req: ImageRequest) -> None:
        def progress(ev: StepProgress) -> None:
            events.put_nowait(_sse("image_generation.progress", {
                "type": "image_generation.progress", "index": index, "step": ev.step,
                "total_steps": ev.total_steps}))

        try:
            r = await service.deployment.submit(req, on_progress=progress)
        except ZImageError as e:
            events.put_nowait(_sse("error", {"error": {"message": e.message, "type": e.error_type,
                                                       "param": e.param, "code": None}}))
            return
        if r.ok:
            events.put_nowait(_sse("image_generation.completed", {
                "type": "image_generation.completed", "index": index, "b64_json": await _b64_png(r),
                "created_at": int(time.time()), "size": f"{r.width}x{r.height}", "output_format": "png",
                "seed": r.seed}))
        else:
            status, type_ = _RESULT_STATUS.get(r.error_type or "", (500, "server_error"))
            events.put_nowait(_sse("error", {"index": index, "error": {"message": r.error, "type": type_,
                                                                       "param": None, "code": r.error_type}}))

    tasks = [asyncio.ensure_future(one(i, r)) for i, r in enumerate(requests)]
    waiter = asyncio.ensure_future(asyncio.gather(*tasks))
    try:
        while not (waiter.done() and events.empty()):
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
            else:
                getter.cancel()
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

