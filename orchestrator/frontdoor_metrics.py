"""Metrics of one front door among several: every series this process exports carries a ``frontdoor`` label naming
it, so a dashboard sums the front doors of a pool (``sum without (frontdoor)``) or tells them apart (``by
(frontdoor)``) whatever Prometheus' own ``instance`` label says (behind a Kubernetes Service, pods come and go)."""

from __future__ import annotations

import os
import socket

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

LABEL = "frontdoor"


def frontdoor_name(config, port: int | None = None) -> str:
    """``frontdoor.name``, else $ZIMAGE_FRONTDOOR_NAME, else '<host name>:<port>' (a pod's name under Kubernetes)."""
    name = config.frontdoor.name or os.environ.get("ZIMAGE_FRONTDOOR_NAME")
    return name or f"{socket.gethostname()}:{config.server.port if port is None else port}"


class _Labelled:
    """A collector re-exporting another registry's metrics with ``LABEL`` added to every sample."""

    def __init__(self, registry: CollectorRegistry, name: str):
        self.registry, self.name = registry, name

    def collect(self):
        for family in self.registry.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                out.add_sample(s.name, {**s.labels, LABEL: self.name}, s.value, s.timestamp, s.exemplar)
            yield out


def labelled_registry(registry: CollectorRegistry, name: str) -> CollectorRegistry:
    """What ``/metrics`` serves: ``registry``'s metrics, each sample labelled with this front door's name."""
    out = CollectorRegistry(auto_describe=False)
    out.register(_Labelled(registry, name))
    return out
