"""A replica pool shared by several front doors (``frontdoor.pool``): the first ``serve`` (or ``zimage-orch pool
up``) plans and creates the replicas as named, detached Ray actors and records the pool; every later front door
reads the record and attaches to the same actors, which answer ``start`` at once when they are loaded already. A
front door that stops (or dies) leaves the replicas running for the others; ``zimage-orch pool down`` removes them.

Exactly one front door creates: the pool's registry (``ray_pool.PoolRegistry``) grants a creation lease to the first
that asks; the others wait for the record it publishes (or for its lease to run out, if it died part-way: the next
one then creates, attaching to whatever replicas the first had made already). A front door whose config would
shape the replicas differently (model, placement, budgets) is refused, naming the sections that differ.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING, Protocol

from zimage_common.config import Config
from zimage_common.errors import ConfigError, NotReadyError

if TYPE_CHECKING:
    from .deployment import Deployment

log = logging.getLogger(__name__)

CREATE_LEASE_S = 120.0  # a creator that neither published nor renewed within this is taken to have died
RENEW_S = CREATE_LEASE_S / 4  # how often a creator renews its lease (it may wait long for GPUs to join)
WAIT_POLL_S = 0.5
# Router fields that shape what a replica is given (its step loop's limits and admission); the rest is each front
# door's own (queue length, timeouts, waits).
_SHAPING_ROUTER_FIELDS = ("scheduling", "max_batch_size", "max_batch_tokens", "step_free_tokens", "step_join_window",
                          "step_short_ratio")


class Registry(Protocol):
    async def get(self) -> dict | None: ...

    async def claim_creation(self, owner: str, lease_s: float) -> bool: ...

    async def publish(self, owner: str, record: dict) -> bool: ...


def pool_namespace(cluster_namespace: str, pool: str) -> str:
    return f"{cluster_namespace}-pool-{pool}"


def pool_deployment_id(pool: str) -> str:
    """What the pool's Ray names carry (actors ``zimage-pool-<name>-<replica>``, placement groups likewise)."""
    return f"pool-{pool}"


def pool_digest(config: Config) -> dict[str, str]:
    """A digest of each config part that shapes the pool's replicas: front doors attaching must agree on these."""
    parts = {
        "model": config.model.model_dump(mode="json"),
        "deployment": config.deployment.model_dump(mode="json"),
        "router": {k: getattr(config.router, k) for k in _SHAPING_ROUTER_FIELDS},
        "defaults": config.defaults.model_dump(mode="json"),
        "limits.max_pixels": config.limits.max_pixels,
        "frontdoor": {"max_frontdoors": config.frontdoor.max_frontdoors,
                      "replica_encode_threads": config.frontdoor.replica_encode_threads},
        "cluster": {"gpu_memory_gib": config.cluster.gpu_memory_gib, "nodes": config.cluster.model_dump(
            mode="json")["nodes"]},
    }
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16]
            for k, v in parts.items()}


def differing(mine: dict[str, str], theirs: dict[str, str]) -> list[str]:
    return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


async def open_pool(dep: Deployment, on_replica_ready=None, poll_s: float = WAIT_POLL_S) -> dict:
    """Attach ``dep`` to its pool's replicas, creating the pool when it has none yet, and start them (loaded ones
    answer at once). Sets ``dep.plan``, ``dep.deployment_id`` and the Idempotency-Key store's address; returns the
    pool's record. Raises ``ConfigError`` when the pool was made with a config that shapes replicas differently."""
    cfg = dep.config
    name = cfg.frontdoor.pool
    ns = pool_namespace(cfg.cluster.namespace, name)
    dep.deployment_id = pool_deployment_id(name)
    registry: Registry = dep.backend.pool_registry(ns)
    owner, digest = owner_id(), pool_digest(cfg)
    # a creator first waits for the GPUs to join (cluster.wait_for_gpus), then creates the replicas
    wait_s = (cfg.cluster.wait_timeout_s if cfg.cluster.wait_for_gpus else 0) + cfg.deployment.start_timeout_s
    deadline = time.monotonic() + wait_s
    created = False
    while True:
        record = await registry.get()
        if record is not None:
            break
        if await registry.claim_creation(owner, CREATE_LEASE_S):
            renew = asyncio.get_running_loop().create_task(_renew(registry, owner))
            try:
                dep._store_address = dep._idempotency_address(ns)
                specs = await dep.replica_specs(ns)
                record = {"pool": name, "digest": digest, "deployment_id": dep.deployment_id, "specs": specs,
                          "plan": dep.plan, "store": dep._store_address, "created_by": owner,
                          "created_at": time.time()}
                dep._make_replicas(specs)
                published = await registry.publish(owner, record)
            finally:
                renew.cancel()
            if not published:
                raise NotReadyError(f"pool {name!r}: another front door took over its creation (this one took "
                                    f"longer than {CREATE_LEASE_S:.0f}s); restart this front door to attach")
            created = True
            log.info("pool %s created in namespace %s: %d replica(s)", name, ns, len(specs))
            break
        if time.monotonic() > deadline:
            raise NotReadyError(f"pool {name!r} is being created by another front door and was not ready within "
                                f"{wait_s:.0f}s (cluster.wait_timeout_s + deployment.start_timeout_s)")
        await asyncio.sleep(poll_s)
    if not created:
        if (diff := differing(digest, record["digest"])):
            raise ConfigError(f"pool {name!r} (frontdoor.pool) was created by {record['created_by']} with another "
                              f"config: {', '.join(diff)} differ. Serve it with the config it was made with, or "
                              f"remove it (`zimage-orch pool down`) and start again")
        dep.plan, dep._store_address = record["plan"], record["store"]
        dep._make_replicas(record["specs"])
        log.info("attached to pool %s (%d replica(s), created by %s)", name, len(record["specs"]),
                 record["created_by"])
    dep.pool_record = record
    await dep._start_replicas(on_replica_ready)
    return record


async def _renew(registry: Registry, owner: str) -> None:
    """Keep a creator's lease while it waits for GPUs and makes the replicas."""
    while True:
        await asyncio.sleep(RENEW_S)
        try:
            await registry.claim_creation(owner, CREATE_LEASE_S)
        except Exception as e:  # noqa: BLE001 - the next renewal, or the publish, says whether we still hold it
            log.warning("pool: could not renew the creation lease: %s", e)
