"""Every error the orchestrator raises on purpose, in one place.

Each type names its ``FailureKind``; the table ``messages.FAILURES`` says whether the caller may retry and which
HTTP status and OpenAI error type it maps to, so the router, the HTTP layer, the metrics and the Python API agree on
what a failure means.
"""

from __future__ import annotations

from .messages import FAILURES, FailureKind


class ZImageError(Exception):
    """Base class. ``kind`` (a ``FailureKind``) decides the HTTP status, the OpenAI error type and whether the caller
    may retry, through ``messages.FAILURES``: one table for the router, the HTTP layer and the metrics."""

    kind = FailureKind.REPLICA_ERROR
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param

    @property
    def http_status(self) -> int:
        return FAILURES[self.kind].http_status

    @property
    def error_type(self) -> str:
        return FAILURES[self.kind].openai_type

    @property
    def retryable(self) -> bool:
        return FAILURES[self.kind].retryable


class ConfigError(ZImageError):
    """A config file is unreadable or invalid. The message names the file and the dotted field path. Raised at
    start-up, never for a request."""

    http_status = 500
    error_type = "config_error"
    retryable = False


class InvalidRequestError(ZImageError):
    """The request itself is wrong (bad size, steps, prompt...). ``param`` names the field."""

    kind = FailureKind.INVALID_REQUEST


class ForbiddenError(InvalidRequestError):
    """The deployment's configuration does not allow this (HTTP 403); the message names the setting that would."""

    http_status = 403


class ConflictError(InvalidRequestError):
    """The request conflicts with the deployment's configuration or state (HTTP 409); the message says why."""

    http_status = 409


class CapacityError(InvalidRequestError):
    """No replica of this deployment can ever serve the request (too large for every replica's plan)."""


class QueueFullError(ZImageError):
    """The router's queue is at its limit; retry after ``retry_after_s``."""

    kind = FailureKind.QUEUE_FULL

    def __init__(self, message: str, *, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReadyError(ZImageError):
    """The deployment is starting, draining or has no live replica."""

    kind = FailureKind.NOT_READY


class ReplicaError(ZImageError):
    """A replica raised while running a batch; the message carries the replica's reason."""

    kind = FailureKind.REPLICA_ERROR


class ReplicaUnavailableError(ReplicaError):
    """The replica process died or is unreachable (or, for a replica that borrows a text encoder, the encoder's).
    Seeded requests are idempotent, so the router retries them elsewhere."""

    kind = FailureKind.REPLICA_LOST


class ReplicaHungError(ReplicaUnavailableError):
    """A batch ran far past its expected time, or a health check did not answer: the replica is recycled."""
