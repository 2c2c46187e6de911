"""The disk that batch input files (``POST /v1/files``) may take: stored files plus uploads in progress stay within
``batches.max_stored_bytes``, and an upload never takes the disk below ``batches.min_free_disk_bytes``.

It exists because the job database, the compile cache and the image outputs share that disk: without a bound on the
total, concurrent uploads of ``batches.max_upload_bytes`` each, and files nobody deletes, could fill it and take
the server down with it. ``JobService`` owns one; ``batch_api.upload`` reserves before it reads a byte.

Every method is synchronous and does no I/O beyond ``disk_usage``, so a check and its reservation happen with no
await between them: concurrent uploads on one event loop can never both pass a check that only one of them fits.
The lock makes the counts safe from a thread as well.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from shutil import disk_usage

WATCH_BYTES = 4 << 20  # an upload in progress looks at the disk's free space once per this many bytes received


@dataclass(frozen=True)
class Refusal:
    """Why an upload cannot be stored: the error's ``code`` and a message naming the field and the fix."""

    code: str  # storage_limit_reached (the quota) or insufficient_storage (free disk)
    message: str
    type_: str


class StorageRefused(Exception):
    """Raised from the upload's stream when free disk falls below the floor while it is written."""

    def __init__(self, refusal: Refusal):
        super().__init__(refusal.message)
        self.refusal = refusal


class FileQuota:
    """Bytes of stored input files (``stored``: set from the job database's ``files`` table when it is opened, so
    it survives a restart) and bytes reserved by uploads in progress (``reserved``: in memory, as those uploads
    are)."""

    def __init__(self, max_stored_bytes: int, min_free_disk_bytes: int, directory: Path):
        self.limit = max_stored_bytes
        self.min_free = min_free_disk_bytes
        self.directory = Path(directory)
        self.stored = 0
        self.reserved = 0
        self._lock = threading.Lock()

    def reserve(self, need: int) -> Refusal | None:
        """Hold ``need`` bytes for an upload about to be read, or say why it cannot be. A None answer must be
        matched by one ``release(need)`` however the upload ends."""
        need = max(0, need)
        with self._lock:
            if self.stored + self.reserved + need > self.limit:
                return Refusal("storage_limit_reached", (
                    f"batch input files may hold {self.limit} bytes (batches.max_stored_bytes): {self.stored} are "
                    f"stored and {self.reserved} reserved by uploads in progress, and this upload needs {need} (its "
                    f"Content-Length, or batches.max_upload_bytes without one); delete files you no longer need "
                    f"(DELETE /v1/files/{{id}}) or raise batches.max_stored_bytes"), "invalid_request_error")
            # what uploads in progress have reserved may not be written yet: it is not free for this one
            free = disk_usage(self.directory).free - self.reserved
            if free < self.min_free + need:
                return Refusal("insufficient_storage", (
                    f"the disk holding batches.directory has {free} bytes free beyond what uploads in progress "
                    f"reserved ({self.reserved}); this upload needs {need} and "
                    f"batches.min_free_disk_bytes = {self.min_free} must stay free; delete files you no longer "
                    f"need (DELETE /v1/files/{{id}}), free space on that disk, or lower "
                    f"batches.min_free_disk_bytes"), "server_error")
            self.reserved += need
        return None

    def release(self, need: int) -> None:
        """An upload ended (stored, refused or abandoned): its reservation goes; a stored file was counted by
        ``add``."""
        with self._lock:
            self.reserved = max(0, self.reserved - max(0, need))

    def add(self, size: int) -> None:
        """A stored input file's real bytes (the caller releases the upload's reservation right after)."""
        with self._lock:
            self.stored += size

    def remove(self, size: int) -> None:
        with self._lock:
            self.stored = max(0, self.stored - size)

    def free_below_floor(self) -> int | None:
        """The free bytes of the disk holding ``batches.directory`` when they are under the floor, else None."""
        free = disk_usage(self.directory).free
        return free if free < self.min_free else None

    def job_pause_reason(self) -> str | None:
        """Why a running job must wait before taking its next request (its outputs share this disk), or None. A
        job's output holds its images (base64 in its file and the database, or the files of ``response_format:
        url``), so a long job could otherwise fill the disk the server needs."""
        free = self.free_below_floor()
        if free is None:
            return None
        return (f"the disk holding batches.directory has {free} bytes free, below batches.min_free_disk_bytes = "
                f"{self.min_free}; the job takes no more requests until there is room (free space on that disk, or "
                f"lower batches.min_free_disk_bytes); its completion window still runs")

    def low_disk(self) -> Refusal | None:
        free = self.free_below_floor()
        if free is None:
            return None
        return Refusal("insufficient_storage", (
            f"the disk holding batches.directory fell to {free} bytes free while this upload was written, below "
            f"batches.min_free_disk_bytes = {self.min_free}; the upload was dropped; delete files you no longer "
            f"need (DELETE /v1/files/{{id}}), free space on that disk, or lower batches.min_free_disk_bytes"),
            "server_error")

    async def watched(self, stream):
        """``stream``'s chunks, raising StorageRefused once free disk is below the floor (looked at every
        ``WATCH_BYTES`` received, not per chunk: ``disk_usage`` is a system call)."""
        since = 0
        async for chunk in stream:
            since += len(chunk)
            if since >= WATCH_BYTES:
                since = 0
                if (refusal := self.low_disk()) is not None:
                    raise StorageRefused(refusal)
            yield chunk
