"""Connection and body limits for the HTTP service, which uvicorn lacks (it has no timeout for a request's headers or
body, and its ``limit_concurrency`` answers 503 to every request past the cap, health probes included, while the
connections that caused it stay open). What each limit does and its field: docs/hardening.md.

- ``GuardedH11Protocol`` (uvicorn's h11 protocol, subclassed): the header deadline, and the cap on open connections
  (``server.max_connections``, and the descriptor limit less ``server.fd_reserve``): past it a new connection closes
  the oldest one with no request in progress, so a probe is answered under a flood of slow clients. Bytes that are
  not HTTP/1.1 get a 400 in the error envelope (uvicorn's is plain text).
- ``BodyDeadline`` (ASGI): the body's idle and total deadlines (a 408 through ``FaultBarrier``).
- ``FaultBarrier`` (ASGI, inside the request-id middleware): a client gone mid-body is a 499 (counted), any other
  exception one ERROR with its traceback and a 500 in the envelope; nothing propagates to uvicorn, which would log
  it again.
- ``raise_fd_limit`` raises the soft descriptor limit to the hard one; ``RateLimitFilter`` keeps loggers that repeat
  one message per event (asyncio's accept errors) to a few lines a second."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:  # a container may forbid it: keep the soft limit, and say so
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, target, e)
    return soft


def open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: the connection cap alone applies
        return None


class ConnectionGuard:
    """The open connections of one server, oldest first, and the limits they are held to."""

    def __init__(self, max_connections: int, header_timeout_s: float, fd_limit: int | None = None,
                 fd_reserve: int = 512):
        if fd_limit is None:
            import resource

            fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fd_limit, self.fd_reserve = fd_limit, fd_reserve
        self.cap = max(1, min(max_connections, fd_limit - fd_reserve))
        self.header_timeout_s = header_timeout_s
        self.open: dict[GuardedH11Protocol, None] = {}  # insertion order: the oldest first
        self.counts = {"shed": 0, "evicted": 0, "header_timeouts": 0}
        self._fd_checked, self._fds_low = 0.0, False
        self._reported, self._last_report = dict(self.counts), 0.0

    def fds_low(self) -> bool:
        """Whether the open descriptors are within fd_reserve of the limit. Counting them reads a directory as
        long as the table, so it is done at most twice a second."""
        now = time.monotonic()
        if now - self._fd_checked >= 0.5:
            self._fd_checked = now
            n = open_fds()
            self._fds_low = n is not None and n >= self.fd_limit - self.fd_reserve
        return self._fds_low

    def admit(self, conn: GuardedH11Protocol) -> bool:
        """Register a new connection, first closing the oldest idle one if the server is at its cap or short of
        descriptors. False: nothing could be closed, the caller closes ``conn``."""
        if len(self.open) >= self.cap or self.fds_low():
            # A connection that never completed a request (a slow client) goes before an idle keep-alive one.
            victim = next((c for c in self.open if c.idle and not c.served), None) \
                or next((c for c in self.open if c.idle), None)
            if victim is None:
                self.note("shed")
                return False
            self.forget(victim)
            victim.transport.close()
            self.note("evicted")
        self.open[conn] = None
        return True

    def forget(self, conn: GuardedH11Protocol) -> None:
        self.open.pop(conn, None)

    def note(self, what: str) -> None:
        """Count an event; a summary goes to the log at most every 10 s, however many there were."""
        self.counts[what] += 1
        now = time.monotonic()
        if now - self._last_report >= 10.0:
            delta = {k: v - self._reported[k] for k, v in self.counts.items() if v != self._reported[k]}
            self._reported, self._last_report = dict(self.counts), now
            log.warning("connection limits: %s in the last interval (%d open, cap %d; server.max_connections, "
                        "server.header_timeout_s, server.fd_reserve)",
                        ", ".join(f"{v} {k}" for k, v in delta.items()), len(self.open), self.cap)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and the guard's connection cap (module docstring)."""

    guard: ConnectionGuard  # set on the per-server subclass ``protocol_class`` makes

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self.served = False
        if not self.guard.admit(self):
            transport.abort()
            return
        self._watch_headers()

    def connection_lost(self, exc) -> None:
        self.guard.forget(self)
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_headers()

    def on_response_complete(self) -> None:
        self.served = True
        super().on_response_complete()
        self._watch_headers()

    @property
    def idle(self) -> bool:
        """No request in progress: waiting for a request's headers (however many bytes of them came), idle
        between requests, or answered while the rest of its unread body still comes in."""
        answered = self.cycle is None or self.cycle.response_complete
        return answered and self.conn.their_state in (h11.IDLE, h11.SEND_BODY)

    def _stalling(self) -> bool:
        """Waiting for a request's headers, or for the rest of a body nobody reads any more (its response sent:
        uvicorn reads and drops it, and each piece would restart the keep-alive timer)."""
        if self.transport.is_closing():
            return False
        if self.conn.their_state is h11.IDLE:
            return self.timeout_keep_alive_task is None  # a keep-alive wait (no byte yet) is uvicorn's to time
        return self.conn.their_state is h11.SEND_BODY and self.cycle is not None and self.cycle.response_complete

    def _watch_headers(self) -> None:
        """Arm the timer while ``_stalling`` (on a new connection too); disarm it once the headers are in or the
        dropped body is over."""
        if not self._stalling():
            self._cancel_header_timer()
        elif self._header_timer is None:
            self._header_timer = self.loop.call_later(self.guard.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes h11 cannot parse as HTTP/1.1 (a malformed request line, header or chunk), in the
        error envelope every other answer uses: uvicorn's own is plain text. Where a response has already begun (an
        early 413 while a chunked body still comes), no second one can follow: the connection is closed."""
        from .request_id import HEADER, new_request_id

        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.transport.close()
            return
        rid = new_request_id()  # as on every other response: the header, and error.request_id
        body = json.dumps({"error": {
            "message": "the request is not valid HTTP/1.1: its request line, a header or its chunked body framing "
                       "cannot be parsed; the connection is closed", "type": "invalid_request_error", "param": None,
            "code": "invalid_http_request", "request_id": rid}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (HEADER.encode(), rid.encode()), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._stalling():
            self.guard.note("header_timeouts")
            self.guard.forget(self)
            self.transport.close()


def protocol_class(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})


# ---- ASGI side --------------------------------------------------------------------------------------------------
class BodyTimeout(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BodyDeadline:
    """ASGI middleware: the body's pieces must each come within ``idle_s``, the whole within ``total_s`` of the
    first read; else ``BodyTimeout`` is raised from ``receive`` (``FaultBarrier`` answers 408).

    A body with a declared Content-Length must also keep the pace that finishes it within ``total_s``: once
    ``idle_s`` has passed, the share received may lag the share of ``total_s`` elapsed by at most ``idle_s``'s
    worth. An edit reserves its declared bytes of ``limits.max_inflight_upload_bytes`` for as long as its body
    takes, so without this a few connections trickling a byte every few seconds under large declared lengths held
    the whole budget for ``total_s`` (every other upload a 429). The pace asks of a client what ``total_s`` asks at
    the end, only sooner: a 64 MiB upload needs about 0.2 MiB/s, a 5 MB image 17 KB/s."""

    def __init__(self, app, idle_s: float, total_s: float):
        self.app, self.idle_s, self.total_s = app, idle_s, total_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from .requests import decimal

        declared = next((decimal(v.decode("latin-1"), max_digits=4000) for k, v in scope.get("headers", ())
                         if k == b"content-length"), None)
        state = {"more": True, "start": None, "received": 0}

        async def timed_receive():
            if not state["more"]:
                return await receive()
            now = asyncio.get_running_loop().time()
            if state["start"] is None:
                state["start"] = now
            deadline = state["start"] + self.total_s
            wait = min(self.idle_s, deadline - now)
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.0))
            except asyncio.TimeoutError:
                if deadline - now <= self.idle_s:
                    raise BodyTimeout(f"the request body did not arrive whole within {self.total_s:g} s "
                                      f"(server.body_timeout_s)") from None
                raise BodyTimeout(f"the request body stalled: no data for {self.idle_s:g} s "
                                  f"(server.body_idle_timeout_s)") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["more"] = False
            elif declared:
                state["received"] += len(message.get("body", b""))
                elapsed = asyncio.get_running_loop().time() - state["start"]
                if state["received"] < declared * (elapsed - self.idle_s) / self.total_s:
                    raise BodyTimeout(
                        f"the request body arrives too slowly to be whole within {self.total_s:g} s "
                        f"(server.body_timeout_s): {state['received']} of its {declared} bytes after "
                        f"{elapsed:.0f} s") from None
            return message

        await self.app(scope, timed_receive, send)


def _envelope(status: int, message: str, type_: str, code: str | None, close: bool = False) -> list[dict]:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    return [{"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False}]


class FaultBarrier:
    """ASGI middleware (module docstring): what escapes the app becomes one log record and, when no response has
    started, an answer in the envelope: 499 for a client gone mid-body, 408 for a body timeout, else 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.requests import ClientDisconnect

        started = []

        async def tracked(message):
            if message["type"] == "http.response.start":
                started.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracked)
            return
        except ClientDisconnect:
            log.info("client disconnected before its request was read: %s %s", scope.get("method"),
                     scope.get("path"))
            answer = _envelope(499, "the client closed the connection", "invalid_request_error", "client_closed")
        except BodyTimeout as e:
            log.info("%s %s: %s", scope.get("method"), scope.get("path"), e.message)
            answer = _envelope(408, e.message, "invalid_request_error", "request_timeout", close=True)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            answer = _envelope(500, "the server failed to handle this request; the cause is in its log",
                               "server_error", None)
        if started:
            return  # the response is under way: the connection is closed by the server when the app returns
        for message in answer:
            await send(message)


class RateLimitFilter(logging.Filter):
    """Lets each distinct message template through at most ``per_s`` times a second; the first record after a
    quiet spell says how many were dropped. For loggers that report every failed accept or callback."""

    def __init__(self, per_s: float = 2.0, clock=time.monotonic):
        super().__init__()
        self.per_s, self.clock = per_s, clock
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{record.msg}"[:200]
        now = self.clock()
        if now - self._last.get(key, -1e9) < 1.0 / self.per_s:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return False
        self._last[key] = now
        if len(self._last) > 1000:  # bounded memory whatever the messages
            self._last = {key: now}
        dropped = self._dropped.pop(key, 0)
        if dropped:
            record.msg = f"{record.msg} ({dropped} more like this dropped)"
        return True


def install_log_limits(per_s: float = 2.0) -> None:
    """Rate-limit the loggers that log once per failed accept, connection or callback."""
    for name in ("asyncio", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimitFilter) for f in logger.filters):
            logger.addFilter(RateLimitFilter(per_s))


def uvicorn_config(app, server_cfg, host: str, port: int, **kw):
    """The ``uvicorn.Config`` for this service: the guarded protocol and the limits of ``server_cfg``
    (a ``ServerConfig``). Raises the descriptor limit first, so the cap is computed from the raised one."""
    import uvicorn

    fd_limit = raise_fd_limit()
    install_log_limits()
    guard = ConnectionGuard(server_cfg.max_connections, server_cfg.header_timeout_s, fd_limit,
                            server_cfg.fd_reserve)
    config = uvicorn.Config(app, host=host, port=port, http=protocol_class(guard),
                            timeout_keep_alive=server_cfg.keep_alive_s, backlog=server_cfg.backlog, **kw)
    config.connection_guard = guard
    return config
