"""Logging for the service and its replicas: one line format (text or JSON), the request id on every line about a
request, and replica processes without progress bars.

- ``request_context(ids)``: the request id(s) the log lines written inside are about (a ``contextvars`` variable:
  asyncio tasks created inside inherit it, threads do not leak it into each other).
- ``configure(fmt, level)``: the driver's one stderr handler, writing ``request_id`` (and ``replica`` in a replica)
  on every line, as text or one JSON object per line.
- ``setup_replica_process(replica_id)``: no progress bars (diffusers, transformers, huggingface_hub, tqdm); in a Ray
  actor (``ZIMAGE_REPLICA_LOG``, ``replica_env``) the same handler, so the lines Ray forwards name the replica."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator

FORMATS = ("text", "json")
# Set in a replica actor's environment (by ray_backend) to the format its log lines should use.
REPLICA_LOG_ENV = "ZIMAGE_REPLICA_LOG"
# Ray drops log lines it thinks repeat across workers, comparing them with every word that contains a digit
# removed: two replicas' "replica r0 ... req_1f3" and "replica r1 ... req_9a2" would collapse into one line and lose
# a request id. Lines that match this pattern (every line our replica handler writes) are never deduplicated.
RAY_DEDUP_ALLOW = r'replica=|"replica": '

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("zimage_request_id", default=None)
_state = {"format": "text", "replica": None}
_HANDLER_MARK = "_zimage_handler"


def current_request_id() -> str | None:
    """The request id(s) the code running now is about (comma-separated for a batch), or None."""
    return _request_id.get()


@contextlib.contextmanager
def request_context(ids: str | Iterable[str] | None) -> Iterator[None]:
    """Log lines written inside the block (and by tasks created inside it) carry ``ids``."""
    if ids is not None and not isinstance(ids, str):
        ids = ",".join(dict.fromkeys(i for i in ids if i)) or None
    token = _request_id.set(ids)
    try:
        yield
    finally:
        _request_id.reset(token)


def batch_request_ids(batch) -> list[str]:
    """The ids a batch's log lines carry: each request's HTTP request id (``trace_id``), or its own id when it did
    not come through HTTP. Several images of one HTTP request share one id."""
    return list(dict.fromkeys(getattr(r, "trace_id", "") or r.request_id for r in batch.requests))


def batch_log_context(batch) -> contextlib.AbstractContextManager:
    return request_context(batch_request_ids(batch))


def logs_batch(method):
    """Decorator for a replica method ``(self, batch, ...)``: its log lines carry the batch's request ids."""

    @functools.wraps(method)
    def wrapper(self, batch, *args, **kwargs):
        with batch_log_context(batch):
            return method(self, batch, *args, **kwargs)

    return wrapper


# ---- formatting ------------------------------------------------------------------------------------------------
class ContextFilter(logging.Filter):
    """Adds ``request_id`` and ``replica`` to every record (None when not known) and ``context``, their text form."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = getattr(record, "request_id", None) or _request_id.get()
        replica = getattr(record, "replica", None) or _state["replica"]
        record.request_id = rid
        record.replica = replica
        parts = ([f"replica={replica}"] if replica else []) + ([f"request_id={rid}"] if rid else [])
        record.context = f" [{' '.join(parts)}]" if parts else ""
        return True


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s"


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__(TEXT_FORMAT, datefmt="%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "context"):
            ContextFilter().filter(record)
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, request_id, replica, pid, and
    exc_info (the formatted traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "context"):
            ContextFilter().filter(record)
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.request_id:
            out["request_id"] = record.request_id
        if record.replica:
            out["replica"] = record.replica
        out["pid"] = record.process
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def make_handler(fmt: str = "text", stream=None) -> logging.Handler:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    h = logging.StreamHandler(stream or sys.stderr)
    h.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    h.addFilter(ContextFilter())
    setattr(h, _HANDLER_MARK, True)
    return h


def configure(fmt: str = "text", level: int = logging.INFO, stream=None) -> None:
    """Install (or replace) the one handler of ours on the root logger. Idempotent."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_MARK, False):
            root.removeHandler(h)
    root.addHandler(make_handler(fmt, stream))
    root.setLevel(level)
    _state["format"] = fmt
    for noisy in ("urllib3", "httpx", "filelock", "asyncio", "PIL", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # A malformed multipart body is the client's error, answered with a 400 that names it; python_multipart also
    # logs a WARNING for each one, a line any client could have written at will.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)


def adopt_logger(name: str) -> None:
    """Send a library logger that has handlers of its own (Ray's ``ray``) through ours instead: in JSON mode every
    line of the process is then one JSON object."""
    lg = logging.getLogger(name)
    for h in list(lg.handlers):
        lg.removeHandler(h)
    lg.propagate = True


def current_format() -> str:
    """The format this process logs in (what replicas are told to use)."""
    return _state["format"]


API_KEYS_ENV = "ZIMAGE_API_KEYS"


def take_api_keys_from_env(environ=None) -> list[str]:
    """The API keys in ``ZIMAGE_API_KEYS`` (comma-separated), removed from the environment so that no process
    started from this one (a local Ray and its replica workers) inherits them."""
    environ = os.environ if environ is None else environ
    return [k.strip() for k in environ.pop(API_KEYS_ENV, "").split(",") if k.strip()]


def replica_env(fmt: str | None = None) -> dict[str, str]:
    """Environment variables for a replica actor's process (``PipelineWorker(env=...)`` sets them before its
    first import): no progress bars, and the log format to use."""
    return {
        REPLICA_LOG_ENV: fmt or current_format(),
        "TQDM_DISABLE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


# ---- replica processes -----------------------------------------------------------------------------------------
def quiet_progress_bars() -> None:
    """No loading progress bars from the model libraries in this process, nor from tqdm itself (ModelScope's
    download bars) where TQDM_DISABLE is set (``replica_env``)."""
    for mod, fn in (("diffusers.utils.logging", "disable_progress_bar"),
                    ("transformers.utils.logging", "disable_progress_bar"),
                    ("huggingface_hub.utils", "disable_progress_bars")):
        try:
            getattr(__import__(mod, fromlist=[fn]), fn)()
        except (ImportError, AttributeError):  # an optional library that is not installed
            pass
    if os.environ.get("TQDM_DISABLE") and "tqdm" in sys.modules:
        _quiet_tqdm()


def _quiet_tqdm() -> None:
    """tqdm reads TQDM_DISABLE once, when it is imported, and a Ray worker has imported it before a replica's
    constructor sets the variable: make ``disable=True`` the default of every bar in this process instead (a call
    that passes ``disable`` itself still decides)."""
    import tqdm.std

    init = tqdm.std.tqdm.__init__
    if getattr(init, "zimage_quiet", False):
        return
    quiet = functools.partialmethod(init, disable=True)
    quiet.zimage_quiet = True
    tqdm.std.tqdm.__init__ = quiet


def setup_replica_process(replica_id: str) -> None:
    """Called when a replica is created. Always: no progress bars. In a Ray actor (``ZIMAGE_REPLICA_LOG`` set):
    log INFO and above to stderr, each line naming the replica (Ray forwards it to the driver)."""
    quiet_progress_bars()
    fmt = os.environ.get(REPLICA_LOG_ENV)
    if fmt:
        _state["replica"] = replica_id
        configure(fmt if fmt in FORMATS else "text")
