"""CUDA helpers the replica's parts share: waiting for a stream, out-of-memory checks, freeing the cache, the stream
that reads what the step loop made. torch is imported inside them, so importing the replica's modules (the driver
does, to make the actor class) loads no torch."""

from __future__ import annotations

import contextlib


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


def mark(device):
    """An event recorded on this thread's current stream of ``device``: where the work launched so far ends (None
    off CUDA, where there is nothing to wait for)."""
    import torch

    if device is None or torch.device(device).type != "cuda":
        return None
    event = torch.cuda.Event()
    try:
        event.record(torch.cuda.current_stream(device))
    except RuntimeError:  # a broken context: a reader then waits for the whole stream, and fails as the loop did
        return None
    return event


class ReadStream:
    """A high-priority CUDA stream for the work that reads what the step loop made: the final non-finite check,
    previews and decodes. The loop's host runs up to about two steps ahead of its GPU (the launch queue bounds it),
    so that work, queued on the loop's stream, would wait for the steps launched after the one it reads (a decode
    under load took three times its time alone). Here it waits only for the event recorded after that step, and the
    GPU may run its blocks ahead of the next step's as SMs come free; the step loses about the reader's GPU time.

    Tensors the loop made are read here while the reader holds them and until it has synced (a decode copies its
    image to the host, the check reads a bool), so the allocator cannot hand their memory to the loop meanwhile;
    what is allocated here is freed here."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device, priority=-1)

    @contextlib.contextmanager
    def after(self, ready=None):
        """Run the block on this stream once ``ready`` (a ``mark`` of the loop's stream) is reached; without one,
        once everything the calling thread's stream has so far is done."""
        import torch

        if ready is not None:
            self.stream.wait_event(ready)
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            try:
                yield
            except BaseException:
                # the reader's queued reads must end before the caller lets go of what they read (a failed decode's
                # inputs would otherwise go back to the loop's pool while still being read)
                self.stream.synchronize()
                raise
