"""The ``frontdoor`` section: several ``serve`` processes over one replica pool, encoding on the replicas' nodes,
and the ``Idempotency-Key`` store. Loaded by ``config.py`` like the other sections."""

from __future__ import annotations

from pydantic import Field

from .config_http import _Strict

POOL_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"


class IdempotencyConfig(_Strict):
    """How long and how much the ``Idempotency-Key`` store keeps (shared by a pool's front doors)."""

    ttl_s: int = Field(
        default=3600, ge=1, le=7 * 86_400,
        description="How long a key's answer (and its images) is kept after it is recorded, seconds. A retry after "
        "that runs as a new request.")
    max_entries: int = Field(
        default=10_000, ge=1, le=10_000_000,
        description="Keys and keyed images kept at most; past it the oldest are forgotten first.")
    max_bytes: int = Field(
        default=512 * 1024**2, ge=1024**2, le=64 * 1024**3,
        description="Bytes of answers and images kept at most (the store holds them in memory); past it the "
        "oldest are forgotten first.")
    claim_lease_s: float = Field(
        default=900.0, gt=0, le=86_400,
        description="How long a replica's claim on a keyed image stands without an answer before another replica "
        "may run the image (a claim whose replica process is gone is taken over at once). Keep it above the "
        "longest time a request runs.")


class FrontDoorConfig(_Strict):
    """Front doors (``zimage-orch serve`` processes) and the replica pool they share."""

    pool: str | None = Field(
        default=None, pattern=POOL_NAME_PATTERN,
        description="Name of a replica pool that outlives any one front door: the replicas are named, detached Ray "
        "actors (namespace '<cluster.namespace>-pool-<name>'), made by the first `serve` or by `zimage-orch pool "
        "up`, and attached to, still loaded, by every later `serve` with the same name; `zimage-orch pool down` "
        "removes them. Needs cluster.address (a Ray cluster that outlives the process). None: the replicas belong "
        "to this process and end with it.")
    name: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$",
        description="This front door's value of the `frontdoor` label on its metrics. None: $ZIMAGE_FRONTDOOR_NAME, "
        "else '<host name>:<port>'.")
    encode_on_replica: bool = Field(
        default=True,
        description="HTTP answers' PNG / JPEG / WebP encoding (previews included) runs on the replica's node, in "
        "a thread pool beside the GPU loop, and the front door forwards the bytes. False: replicas return pixels "
        "and the front door encodes.")
    replica_encode_threads: int = Field(
        default=2, ge=1, le=64,
        description="Threads of each replica's encoder pool (zlib, libjpeg and libwebp release the GIL: about "
        "0.1 s of one core per 1024x1024 PNG of photographic content).")
    max_frontdoors: int = Field(
        default=8, ge=1, le=1024,
        description="Pooled replicas keep call slots for this many front doors' in-flight work, so each reports "
        "its whole queue; more front doors still work (their calls wait in Ray's queue, within the replica's "
        "budget all the same).")
    idempotency: IdempotencyConfig = Field(default_factory=IdempotencyConfig)
