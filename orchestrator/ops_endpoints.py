"""The operator's endpoints beside the API: ``/metrics``, the generated API docs, and a key-free metrics listener.
With API keys, ``/metrics`` and the docs need the key like ``/v1``; ``server.metrics_port`` serves ``GET /metrics``
alone without one on ``server.metrics_host`` (loopback by default). ``/healthz`` and ``/readyz`` stay open."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

_PATH = re.compile(r"(?:[A-Za-z]:)?(?:/[^/\s'\"]+){2,}/?")


def without_host_paths(text: str | None) -> str | None:
    """``text`` (a start-up error for /readyz) with absolute file paths cut to their last part: where the
    deployment keeps its files is no client's business."""
    if text is None:
        return None
    text = text[:2000]
    return _PATH.sub(lambda m: ".../" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


def add_ops_routes(app: FastAPI, registry, denied, docs: bool) -> None:
    """``denied(request)``: the 401 response for a request without a valid key, or None."""

    @app.get("/metrics")
    async def metrics(request: Request):
        if (refused := denied(request)) is not None:
            return refused
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    if not docs:
        return
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

    def keyed(page):
        async def endpoint(request: Request):
            refused = denied(request)
            return page() if refused is None else refused

        return endpoint

    for path, page in (
        ("/openapi.json", lambda: JSONResponse(app.openapi())),
        ("/docs", lambda: get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI")),
        ("/redoc", lambda: get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")),
    ):
        app.add_api_route(path, keyed(page), methods=["GET"], include_in_schema=False)


def start_metrics_listener(host: str, port: int, registry):
    """The key-free ``/metrics`` listener (a thread); returns the server, whose ``shutdown()`` stops it. It serves
    ``GET /metrics`` and nothing else (prometheus_client's own server answers the metrics at every path)."""
    import socket
    import threading
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import make_wsgi_app

    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO") != "/metrics" or environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"this listener serves GET /metrics only\n"]
        return metrics(environ, start_response)

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):  # a scrape every few seconds is not worth a log line
            pass

    server = make_server(host, port, app, Server, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, name="metrics-listener", daemon=True).start()
    log.info("metrics without a key on http://%s:%d/metrics (server.metrics_port)", host,
             server.server_address[1])
    return server
