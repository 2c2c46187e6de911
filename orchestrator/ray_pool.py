"""The Ray side of a replica pool shared by several front doors, and of the ``Idempotency-Key`` store: the only
module besides ``ray_backend.py`` that calls Ray (it reaches no replica code: ``ray_backend`` makes the replicas).

- ``RayPoolRegistry``: a detached actor per pool holding the pool's record (its plan and replica specs) and the
  creation lease, so that exactly one front door creates the replicas and the others attach to them.
- ``store_actor``: the ``IdempotencyStore`` inside an actor: detached and named in a pool's namespace (every front
  door and replica of the pool shares it), or owned by the one front door of a deployment without a pool.
- ``RayIdempotency`` (the front doors' async client) and ``RayResultStore`` (the replicas' blocking one, picklable:
  it travels to the replica actor and finds the store by name there).
- ``pool_down``: remove a pool's actors and placement groups.
"""

from __future__ import annotations

import logging
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from .idempotency_store import IdempotencyStore

log = logging.getLogger(__name__)

REGISTRY = "zimage-pool-registry"
STORE = "zimage-idempotency"
# The registry and the store live on the head node: the node made durable (GCS fault tolerance), and one that never
# leaves with a front door or a GPU worker.
ON_HEAD = {"node:__internal_head__": 0.001}
ALIVE_PROBE_S = 5.0  # how long the store waits for a claimant replica to say its process id


class PoolRegistry:
    """One pool's record. Actor calls run one at a time, so claim and publish are atomic."""

    def __init__(self):
        self.record: dict | None = None
        self.creator: str | None = None
        self.lease_until = 0.0

    def get(self) -> dict | None:
        return self.record

    def claim_creation(self, owner: str, lease_s: float) -> bool:
        """True for the front door that is to create the pool: the first to ask, or anyone once the creator's
        lease ran out (it died part-way); it renews the lease while it creates."""
        now = time.monotonic()
        if self.record is not None:
            return False
        if self.creator not in (None, owner) and now < self.lease_until:
            return False
        self.creator, self.lease_until = owner, now + lease_s
        return True

    def publish(self, owner: str, record: dict) -> bool:
        if self.creator != owner:
            return False
        self.record = record
        return True

    def drop(self) -> None:
        self.record, self.creator, self.lease_until = None, None, 0.0


class RayPoolRegistry:
    """The async face of a pool's registry actor, for ``pool.open_pool``."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.actor = ray.remote(PoolRegistry).options(
            name=REGISTRY, namespace=namespace, lifetime="detached", get_if_exists=True, num_cpus=0,
            resources=ON_HEAD, max_restarts=-1).remote()

    async def get(self) -> dict | None:
        return await self.actor.get.remote()

    async def claim_creation(self, owner: str, lease_s: float) -> bool:
        return await self.actor.claim_creation.remote(owner, lease_s)

    async def publish(self, owner: str, record: dict) -> bool:
        return await self.actor.publish.remote(owner, record)


def pool_record(namespace: str, timeout_s: float = 30.0) -> dict | None:
    """A pool's record as its registry holds it; None when the pool has no registry or no record yet."""
    try:
        registry = ray.get_actor(REGISTRY, namespace=namespace)
    except ValueError:
        return None
    return ray.get(registry.get.remote(), timeout=timeout_s)


def store_stats(namespace: str, timeout_s: float = 10.0) -> dict | None:
    """The pool's Idempotency-Key store's counters (``StoreStats``), or None without one."""
    try:
        return ray.get(ray.get_actor(STORE, namespace=namespace).stats.remote(), timeout=timeout_s)
    except ValueError:
        return None


# ---- the Idempotency-Key store ---------------------------------------------------------------------------------
class _StoreActor(IdempotencyStore):
    """The store in an actor; a claimant replica's process is probed by name (``<actor_prefix><replica id>``)."""

    def __init__(self, namespace: str, actor_prefix: str, control_group: str | None, **kw):
        super().__init__(alive=self._probe, **kw)
        self._ns, self._prefix, self._group = namespace, actor_prefix, control_group

    def _probe(self, claimant) -> bool | None:
        replica_id, pid = claimant
        try:
            actor = ray.get_actor(self._prefix + replica_id, namespace=self._ns)
            call = actor.pid if self._group is None else actor.pid.options(concurrency_group=self._group)
            return ray.get(call.remote(), timeout=ALIVE_PROBE_S) == pid
        except (ValueError, RayActorError):
            return False  # no such actor, or its process died: the claim is stale
        except GetTimeoutError:
            return None  # a busy process cannot answer: not known to be gone
        except Exception:  # noqa: BLE001
            return None

    def stats(self) -> dict:
        return vars(self.snapshot())


def store_actor(namespace: str, name: str, actor_prefix: str, control_group: str | None, detached: bool,
                ttl_s: float, max_entries: int, max_bytes: int, claim_lease_s: float):
    """The store's actor (made, or found by name when another front door made it)."""
    opts = dict(name=name, namespace=namespace, get_if_exists=True, num_cpus=0, resources=ON_HEAD, max_restarts=-1,
                max_concurrency=32)  # threaded: a claim's liveness probe must not hold up the others
    if detached:
        opts["lifetime"] = "detached"
    return ray.remote(_StoreActor).options(**opts).remote(
        namespace, actor_prefix, control_group, ttl_s=ttl_s, max_entries=max_entries, max_bytes=max_bytes,
        claim_lease_s=claim_lease_s)


class RayIdempotency:
    """The front doors' async client of the store actor. ``images_deduped``: the replicas claim keyed images in
    the same store, so a call found pending may run again without generating twice."""

    images_deduped = True

    def __init__(self, actor):
        self.actor = actor

    async def begin(self, key: str, fingerprint: str):
        return await self.actor.begin.remote(key, fingerprint)

    async def finish(self, key: str, fingerprint: str, response, ttl_s: float | None = None) -> None:
        await self.actor.finish.remote(key, fingerprint, response, ttl_s)

    async def abandon(self, key: str, fingerprint: str) -> None:
        await self.actor.abandon.remote(key, fingerprint)

    async def stats(self) -> dict:
        return await self.actor.stats.remote()


class RayResultStore:
    """The replicas' client of the store actor (``actors.intake.ResultStore``): blocking calls, made on the
    replica's call threads. Picklable: it holds the store's name and finds the actor on first use."""

    def __init__(self, namespace: str, name: str, timeout_s: float = 30.0):
        self.namespace, self.name, self.timeout_s = namespace, name, timeout_s
        self._actor = None

    def __getstate__(self):
        return {"namespace": self.namespace, "name": self.name, "timeout_s": self.timeout_s}

    def __setstate__(self, state):
        self.__dict__.update(state, _actor=None)

    def _store(self):
        if self._actor is None:
            self._actor = ray.get_actor(self.name, namespace=self.namespace)
        return self._actor

    def claim(self, key, claimant):
        return ray.get(self._store().claim.remote(key, tuple(claimant)), timeout=self.timeout_s)

    def deposit(self, key, claimant, result) -> None:
        ray.get(self._store().deposit.remote(key, tuple(claimant), result), timeout=self.timeout_s)

    def release(self, key, claimant) -> None:
        ray.get(self._store().release.remote(key, tuple(claimant)), timeout=self.timeout_s)


# ---- operations -------------------------------------------------------------------------------------------------
def pool_down(namespace: str, pg_prefix: str, replica_names: list[str]) -> dict:
    """Kill the pool's replicas (``replica_names``, from its record), its store and its registry, and remove its
    placement groups (named ``pg_prefix...`` in the driver's namespace, so those of a creator that died before it
    published the record go too). Returns what was removed."""
    killed = []
    for name in [*replica_names, STORE, REGISTRY]:
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
            killed.append(name)
        except ValueError:
            pass
    groups = []
    for info in ray.util.placement_group_table().values():
        name = info.get("name") or ""
        if name.startswith(pg_prefix) and info.get("state") != "REMOVED":
            try:
                ray.util.remove_placement_group(ray.util.get_placement_group(name))
                groups.append(name)
            except ValueError:
                pass
    return {"actors": killed, "placement_groups": sorted(set(groups))}


def replica_stats(namespace: str, names: list[str], timeout_s: float = 10.0) -> dict[str, dict | str]:
    """Each named replica's ``intake_stats`` (its gate, encoder and keyed-image counters), or why not."""
    out: dict[str, dict | str] = {}
    for name in names:
        try:
            actor = ray.get_actor(name, namespace=namespace)
            out[name] = ray.get(actor.intake_stats.options(concurrency_group="control").remote(), timeout=timeout_s)
        except ValueError:
            out[name] = "no such actor"
        except Exception as e:  # noqa: BLE001 - report, don't raise
            out[name] = f"unreachable: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
    return out
