"""One failure vocabulary: every kind in one table, used by errors, the HTTP mapping and the metrics labels."""

import pytest

from orchestrator.metrics import PrometheusObserver
from zimage_common import errors
from zimage_common.messages import FAILURES, FailureKind, ImageResult, failure


def test_every_kind_has_one_entry_and_errors_derive_from_it():
    assert set(FAILURES) == set(FailureKind)
    for cls, kind in ((errors.InvalidRequestError, FailureKind.INVALID_REQUEST),
                      (errors.CapacityError, FailureKind.INVALID_REQUEST),
                      (errors.QueueFullError, FailureKind.QUEUE_FULL), (errors.NotReadyError, FailureKind.NOT_READY),
                      (errors.ReplicaError, FailureKind.REPLICA_ERROR),
                      (errors.ReplicaUnavailableError, FailureKind.REPLICA_LOST),
                      (errors.ReplicaHungError, FailureKind.REPLICA_LOST)):
        e = cls("x")
        assert e.kind is kind
        assert (e.http_status, e.error_type, e.retryable) == (FAILURES[kind].http_status, FAILURES[kind].openai_type,
                                                              FAILURES[kind].retryable)
    assert (errors.ConfigError("x").http_status, errors.ConfigError("x").error_type) == (500, "config_error")
    assert failure("something new") is FAILURES[FailureKind.REPLICA_ERROR]


def test_encoder_unavailable_is_caught_by_type():
    ray_backend = pytest.importorskip("orchestrator.ray_backend")
    assert issubclass(ray_backend.EncoderUnavailable, errors.ReplicaUnavailableError)


def test_one_label_per_failure_in_metrics():
    """A refusal at admission and a failed result of the same kind count under one label (they used to be
    'service_unavailable' and 'not_ready')."""
    obs = PrometheusObserver()
    obs.rejected(errors.NotReadyError("x").kind)
    obs.finished(ImageResult("q", ok=False, error="down", error_type=FailureKind.NOT_READY))
    obs.finished(ImageResult("r", ok=False, error="down", error_type="not_ready"))
    assert obs.registry.get_sample_value("zimage_request_errors_total", {"type": "not_ready"}) == 3
    assert str(FailureKind.QUEUE_FULL) == "queue_full" and f"{FailureKind.TIMEOUT}" == "timeout"
