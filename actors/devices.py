"""CUDA helpers the replica's parts share: waiting for a stream, out-of-memory checks, freeing the cache. torch is
imported inside them, so importing the replica's modules (the driver does, to make the actor class) loads no torch."""

from __future__ import annotations


def sync(device) -> None:
    """Wait for this thread's current stream on ``device`` only: a device-wide synchronize would also wait for the
    encode stream's work of other calls."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def sync_all(devices) -> None:
    """Wait for every stream of each of ``devices`` (start-up: what loading made, before the stages use it)."""
    import torch

    for d in {torch.device(d) for d in devices if d is not None}:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
