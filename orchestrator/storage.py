"""Object storage for generated images (``response_format: url`` and batch jobs): ``LocalStore`` (the default, files
under ``outputs.directory`` served at ``/v1/outputs/{key}?expires=...&sig=...``, signed with HMAC-SHA256 over the
key and the expiry, so a link cannot be altered or extended: 403) and ``S3Store`` (boto3, presigned GET URLs of the
same lifetime). Every method blocks: callers on the event loop run them in a thread (``run_blocking``). A failed
upload raises ``StorageError`` (HTTP 502)."""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
import uuid
from pathlib import Path
from urllib.parse import quote

from zimage_common.errors import ZImageError
from zimage_common.jobs_config import OutputsConfig

from .requests import decimal

log = logging.getLogger(__name__)

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "jsonl": "application/jsonl"}
# Keys this module makes: a day, a random id, an extension. Served keys must match whole, so a request can never
# name a path outside the directory: no segment starts with a dot (no "..", no hidden files such as the signing key),
# no absolute paths. ``LocalStore.path`` checks the resolved path as well.
KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199})*\.(png|jpeg|webp|jsonl)")
MIN_SECRET_BYTES = 16  # a shorter signing key (an empty file, say) would let anyone sign links


class StorageError(ZImageError):
    """The image was generated but could not be stored (the store is down, full, or refused the credentials).
    Retrying the request may succeed; the cause is in the server log."""

    http_status = 502
    error_type = "server_error"
    retryable = True


def new_key(extension: str) -> str:
    """A fresh key: ``YYYYMMDD/<random>.<ext>`` (the day keeps directories and bucket listings small)."""
    return f"{time.strftime('%Y%m%d', time.gmtime())}/{uuid.uuid4().hex}.{extension}"


class LocalStore:
    """Both stores have ``put(key, data, content_type)`` (replacing what is there; ``StorageError`` on failure) and
    ``url(key, base_url)``: a link that fetches ``key`` with a plain GET until it expires (``base_url``, the
    server's own address, for the store it serves itself)."""

    def __init__(self, directory: Path, secret: bytes, ttl_s: int, public_base_url: str | None = None,
                 clock=time.time):
        self.directory = Path(directory)
        self.secret = secret
        self.ttl_s = ttl_s
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.clock = clock

    def path(self, key: str) -> Path:
        if not KEY_PATTERN.fullmatch(key):
            raise ValueError(f"not a storage key: {key!r}")
        path = self.directory / key
        if not path.resolve().is_relative_to(self.directory.resolve()):  # a link in the directory pointing out
            raise ValueError(f"not a storage key: {key!r}")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        target = self.path(key)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, target)  # readers never see half a file
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # the same fault (no such directory, no permission): nothing was written there
                pass
            raise StorageError(f"could not write the image to {self.directory}: {e.strerror or e}") from e

    def signature(self, key: str, expires: int) -> str:
        return hmac.new(self.secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def url(self, key: str, base_url: str | None = None) -> str:
        expires = int(self.clock()) + self.ttl_s
        base = self.public_base_url or (base_url or "").rstrip("/")
        return f"{base}/v1/outputs/{quote(key)}?expires={expires}&sig={self.signature(key, expires)}"

    def verify(self, key: str, expires: str | None, sig: str | None) -> str | None:
        """None when the link is valid now, else why not (for the 403's message)."""
        when = decimal(expires)
        if when is None or not sig:
            return "the link is not signed (expires and sig are required)"
        if not sig.isascii() or not hmac.compare_digest(self.signature(key, when).encode(), sig.encode()):
            return "the link's signature does not match (it was altered, or signed by another server's key)"
        if when < self.clock():
            return "the link has expired; request the image again for a new link"
        return None


class S3Store:
    def __init__(self, bucket: str, prefix: str = "", ttl_s: int = 3600, client=None, **client_args):
        self.bucket = bucket
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.client = client if client is not None else s3_client(**client_args)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentType=content_type)
        except (BotoCoreError, ClientError) as e:
            raise StorageError(f"could not upload the image to s3://{self.bucket}/{self.prefix}: {e}") from e

    def check(self) -> None:
        """Refuse now, not after a job has generated its images, where the bucket cannot be reached: no
        credentials, an endpoint that does not answer, no such bucket, a name S3 does not take. A 403 passes:
        credentials may write without the right to list the bucket that HEAD asks for (so wrong secrets, which
        also get a 403 there, are found only at the first upload)."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("403", "AccessDenied", "Forbidden"):
                raise StorageError(f"s3://{self.bucket}: {e}") from None
        except (NoCredentialsError, PartialCredentialsError) as e:
            raise StorageError(f"s3://{self.bucket}: {e}; give credentials (AWS_ACCESS_KEY_ID and "
                               f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)") from None
        except EndpointConnectionError as e:
            raise StorageError(f"s3://{self.bucket}: {e}; check outputs.s3.endpoint_url and region") from None
        except BotoCoreError as e:
            raise StorageError(f"s3://{self.bucket}: {e}") from None

    def url(self, key: str, base_url: str | None = None) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket,
                                                                             "Key": self.prefix + key},
                                                      ExpiresIn=self.ttl_s)
        except (BotoCoreError, ClientError, ValueError) as e:
            raise StorageError(f"could not sign a link to s3://{self.bucket}/{self.prefix}: {e}") from e


def s3_client(endpoint_url: str | None = None, region: str | None = None, addressing_style: str = "auto"):
    try:
        import boto3
        from botocore.config import Config as BotoConfig
    except ImportError:
        raise StorageError("outputs.backend 's3' needs boto3: pip install 'zimage-orchestrator[s3]'") from None
    try:
        return boto3.client("s3", endpoint_url=endpoint_url, region_name=region,
                            config=BotoConfig(s3={"addressing_style": addressing_style}, signature_version="s3v4",
                                              retries={"max_attempts": 3, "mode": "standard"}))
    except ValueError as e:  # botocore's check of the endpoint and region
        raise StorageError(f"cannot make an S3 client: {e}; check outputs.s3.endpoint_url and region") from e


def signing_secret(config: OutputsConfig) -> bytes:
    """The configured secret, else the one kept beside the images (made on first use, readable by this user
    only), so that links signed before a restart still work after it. The file appears whole or not at all
    (written under another name, then linked into place), so a server that starts beside another never reads it
    half written; a key file too short to be a secret (emptied, truncated) is an error, never a key."""
    if config.signing_secret:
        return config.signing_secret.encode()
    path = Path(config.directory) / ".signing-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".signing-key.{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_hex(32).encode())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # fails if another process made it first: theirs is used
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    secret = path.read_bytes().strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise StorageError(f"the signing key file {path.name} in outputs.directory holds {len(secret)} bytes, too "
                           f"few to be a secret; delete it (a new one is made; links signed with it stop working) "
                           f"or set outputs.signing_secret")
    return secret


def store_for(config: OutputsConfig) -> LocalStore | S3Store:
    """The configured store; ``StorageError`` when it cannot be set up (no boto3, an unwritable directory)."""
    if config.backend == "s3":
        s3 = config.s3
        return S3Store(s3.bucket, s3.prefix, config.url_ttl_s, endpoint_url=s3.endpoint_url, region=s3.region,
                       addressing_style=s3.addressing_style)
    try:
        secret = signing_secret(config)
    except OSError as e:
        raise StorageError(f"cannot keep the signing key in {config.directory}: {e.strerror or e}") from e
    return LocalStore(config.directory, secret, config.url_ttl_s, config.public_base_url)


async def run_blocking(fn, *args):
    """``fn(*args)`` in a worker thread, in the caller's context (its request id stays on the log lines)."""
    return await asyncio.get_running_loop().run_in_executor(None, contextvars.copy_context().run, fn, *args)
