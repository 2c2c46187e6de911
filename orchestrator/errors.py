"""Every error the orchestrator raises on purpose, in one place.

Each type says whether the caller may retry (``retryable``) and which HTTP status and OpenAI error type it maps to,
so the router, the HTTP layer and the Python API agree on what a failure means.
"""

from __future__ import annotations


class ZImageError(Exception):
    """Base class. ``retryable`` tells a client whether the same request may succeed later."""

    retryable = False
    http_status = 500
    error_type = "server_error"
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param


class ConfigError(ZImageError):
    """A config file is unreadable or invalid. The message names the file and the dotted field path."""

    http_status = 500
    error_type = "config_error"


class InvalidRequestError(ZImageError):
    """The request itself is wrong (bad size, steps, prompt...). ``param`` names the field."""

    http_status = 400
    error_type = "invalid_request_error"


class CapacityError(InvalidRequestError):
    """No replica of this deployment can ever serve the request (too large for every replica's plan)."""


class QueueFullError(ZImageError):
    """The router's queue is at its limit; retry after ``retry_after_s``."""

    retryable = True
    http_status = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReadyError(ZImageError):
    """The deployment is starting, draining or has no live replica."""

    retryable = True
    http_status = 503
    error_type = "service_unavailable"


class RequestTimeoutError(ZImageError):
    """The request did not finish within its timeout (queue time included)."""

    retryable = True
    http_status = 504
    error_type = "timeout"


class RequestCancelledError(ZImageError):
    """The caller went away; the request was dropped before it ran."""

    http_status = 499
    error_type = "cancelled"


class ReplicaError(ZImageError):
    """A replica raised while running a batch; the message carries the replica's reason."""

    http_status = 500
    error_type = "server_error"


class ReplicaUnavailableError(ReplicaError):
    """The replica process died or is unreachable. Seeded requests are idempotent, so the router retries them."""

    retryable = True
    http_status = 503
    error_type = "service_unavailable"


class ReplicaHungError(ReplicaUnavailableError):
    """A batch ran far past its expected time, or a health check did not answer: the replica is recycled."""


class OutOfMemoryError(ReplicaError):
    """The device ran out of memory for a batch. The router splits the batch and retries smaller pieces."""

    retryable = True
