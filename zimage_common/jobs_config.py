"""Config sections for image outputs (``url`` responses) and batch jobs, loaded by ``config.py`` like the others.

Kept apart from ``config.py`` because they concern storage and job bookkeeping, not the model or its placement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .config_http import _Strict


class S3Config(_Strict):
    """Any S3-compatible store (AWS, MinIO, Ceph, R2 ...), reached through boto3 (the ``s3`` extra)."""

    bucket: str = Field(min_length=3, max_length=63, description="Bucket the images are uploaded to.")
    prefix: str = Field(default="", max_length=512, description="Key prefix inside the bucket, e.g. 'zimage/'.")
    endpoint_url: str | None = Field(
        default=None, description="S3 endpoint for a store other than AWS (http://minio:9000). None: AWS's.")
    region: str | None = Field(default=None, description="Region name; None: boto3's default chain.")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="auto", description="Bucket in the host name (virtual) or the path (path: most self-hosted stores).")

    @model_validator(mode="after")
    def _endpoint_scheme(self) -> S3Config:
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint_url must start with http:// or https://, got {self.endpoint_url!r} "
                             f"(e.g. http://minio:9000)")
        return self


class OutputsConfig(_Strict):
    """Where images answered with ``response_format: url`` live, and how long their links work. Credentials for
    S3 come from boto3's usual chain (environment, ~/.aws, instance role), never from this file."""

    backend: Literal["local", "s3"] = Field(
        default="local", description="local: files under `directory`, served by this server at /v1/outputs/... as "
        "HMAC-signed links that expire. s3: uploaded to `s3`, answered with presigned GET URLs.")
    directory: Path = Field(
        default=Path("zimage-data/outputs"), description="local: where images are written (relative to the working "
        "directory unless absolute).")
    url_ttl_s: int = Field(
        default=3600, ge=1, le=7 * 86_400, description="How long an image link works, seconds (OpenAI's are valid for "
        "60 minutes; S3 presigning allows at most 7 days).")
    public_base_url: str | None = Field(
        default=None, description="local: the scheme://host[:port] that links start with (behind a proxy or a load "
        "balancer). None: the base URL the request came in on.")
    signing_secret: str | None = Field(
        default=None, min_length=16, description="local: the HMAC key that signs links. None: a random key is "
        "generated and kept in `directory`/.signing-key, so links survive a restart. Give every server behind one "
        "load balancer the same.")
    s3: S3Config | None = Field(default=None, description="backend s3: the bucket and endpoint.")

    @model_validator(mode="after")
    def _backend_fields(self) -> OutputsConfig:
        if self.backend == "s3" and self.s3 is None:
            raise ValueError("backend 's3' needs outputs.s3.bucket (and s3.endpoint_url for a store other than AWS)")
        if self.public_base_url is not None and not self.public_base_url.startswith(("http://", "https://")):
            raise ValueError(f"public_base_url must start with http:// or https://, got {self.public_base_url!r}")
        return self


class BatchesConfig(_Strict):
    """Batch jobs (``POST /v1/batches`` and ``zimage-orch batch``): where their state lives and how large they
    may be."""

    directory: Path = Field(
        default=Path("zimage-data/batches"), description="The server's job database (batches.db, SQLite) and its "
        "input and output files.")
    max_lines: int = Field(
        default=50_000, ge=1, le=10_000_000, description="Most requests in one job submitted over HTTP (OpenAI's "
        "limit is 50,000).")
    cli_max_lines: int = Field(
        default=1_000_000, ge=1, le=100_000_000, description="Most requests in one `zimage-orch batch` input file.")
    max_upload_bytes: int = Field(
        default=200 * 1024 * 1024, ge=1024, le=10 * 1024**3, description="Largest file accepted by POST /v1/files "
        "(OpenAI's limit for batch input is 200 MB).")
    max_stored_bytes: int = Field(
        default=10 * 1024**3, ge=1024**2, description="Most bytes the server's batch input files may hold together: "
        "those stored plus uploads in progress, each of which reserves its Content-Length (max_upload_bytes without "
        "one) before it is read and keeps its file's real size once stored. Past it POST /v1/files is a 507 "
        "(code storage_limit_reached) until files are deleted (DELETE /v1/files/{id}). Counted from the job "
        "database at start, so it survives a restart; job output files are not counted. At least "
        "max_upload_bytes.")
    min_free_disk_bytes: int = Field(
        default=1024**3, ge=0, description="Free space an upload must leave on the filesystem holding `directory` "
        "(shared with the job database, and often the compile cache and image outputs): an upload is refused "
        "before it is read when less than this plus its reservation is free, and dropped (its partial file "
        "removed) when free space falls below this while it is written, looked at every 4 MiB; a 507 with code "
        "insufficient_storage. A running job looks before each request it takes: below this it waits (those in "
        "flight finish) until there is room. 0: an upload needs only the room it reserves.")
    reserve_replicas: int = Field(
        default=1, ge=0, le=1024, description="While interactive requests keep coming (within reserve_s), batch-job "
        "work leaves this many replicas idle for them (never the last one), so they find a replica free instead of "
        "waiting behind a batch job's batch, which cannot be preempted. 0: the job takes every replica interactive "
        "work leaves.")
    reserve_batch_size: int | None = Field(
        default=1, ge=1, le=256, description="While the reserve holds, a batch job's batches take at most this many "
        "images, so the one an interactive request finds running ends soon. None: router.max_batch_size (more job "
        "throughput, more interactive latency).")
    reserve_s: float = Field(
        default=10.0, ge=0, le=86_400, description="How long after the last interactive request the reserve holds; "
        "then a job uses every replica in full batches.")
    max_inflight: int | None = Field(
        default=None, ge=1, le=100_000, description="Images a job keeps queued or running at once. None: two full "
        "batches per replica for a server job (one running, the next queued, so a replica never waits for the job "
        "between batches; interactive requests are queued ahead of them), three per replica for the CLI (which has "
        "the deployment to itself).")

    @model_validator(mode="after")
    def _stored_holds_an_upload(self) -> BatchesConfig:
        # An upload without a Content-Length reserves max_upload_bytes: a smaller quota would refuse every one.
        if self.max_stored_bytes < self.max_upload_bytes:
            raise ValueError(f"max_stored_bytes ({self.max_stored_bytes}) must be at least max_upload_bytes "
                             f"({self.max_upload_bytes}): an upload reserves up to max_upload_bytes against it")
        return self
