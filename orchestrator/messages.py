"""Every message that crosses a process boundary, as small frozen types (no torch, no ray).

One request is one prompt and one image; batching is the router's job. A result always comes back as data,
with ``ok`` and a reason, never as an exception through the router loop.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple


class BatchKey(NamedTuple):
    """Everything that must match for requests to share one pipeline call."""

    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}/{self.num_inference_steps}steps/g{self.guidance_scale:g}"


@dataclass(frozen=True)
class ImageRequest:
    """One prompt -> one image. ``seed`` is always set (the router draws one when the caller did not)."""

    request_id: str
    prompt: str
    seed: int
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    negative_prompt: str | None = None
    trace_id: str = ""  # the X-Request-ID of the HTTP request it came from (shared by its n images); for log lines

    @property
    def key(self) -> BatchKey:
        return BatchKey(self.width, self.height, self.num_inference_steps, self.guidance_scale)


@dataclass(frozen=True)
class Batch:
    batch_id: int
    requests: tuple[ImageRequest, ...]

    @property
    def key(self) -> BatchKey:
        return self.requests[0].key

    def __len__(self) -> int:
        return len(self.requests)


@dataclass(frozen=True)
class StageTimes:
    """Seconds spent in each stage of one batch, measured inside the replica."""

    encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0


def encode_png(image) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes. Compression level 1: several times faster than the default for a file
    a little larger, the trade a serving path wants."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@dataclass(frozen=True)
class ImageResult:
    """The outcome for one request. ``image`` (uint8 [H, W, 3]) is set when ``ok``; ``error``/``error_type`` when
    not. The replica returns raw pixels, so PNG encoding never holds a GPU replica: ``png`` encodes on first use,
    wherever the caller is (the HTTP server does it in a thread pool)."""

    request_id: str
    ok: bool
    replica_id: str = ""
    batch_id: int = -1
    batch_size: int = 0
    seed: int = 0
    width: int = 0
    height: int = 0
    image: Any = None  # numpy uint8 [H, W, 3]
    error: str | None = None
    error_type: str | None = None
    stage_times: StageTimes = field(default_factory=StageTimes)
    queue_s: float = 0.0
    latency_s: float = 0.0
    attempts: int = 1

    @cached_property
    def png(self) -> bytes | None:
        return None if self.image is None else encode_png(self.image)

    def pil(self):
        from PIL import Image

        return None if self.image is None else Image.fromarray(self.image)


@dataclass(frozen=True)
class BatchResult:
    batch_id: int
    replica_id: str
    results: tuple[ImageResult, ...]
    stage_times: StageTimes = field(default_factory=StageTimes)


@dataclass(frozen=True)
class ReplicaHealth:
    replica_id: str
    ready: bool
    device_map: dict[str, str]
    dtype: str
    batches_run: int = 0
    images_run: int = 0
    check_s: float = 0.0
    memory_allocated_bytes: dict[str, int] = field(default_factory=dict)
    peak_memory_bytes: dict[str, int] = field(default_factory=dict)
    load_s: float = 0.0
    encodes_served: int = 0  # encodes done for other replicas (a shared text encoder)
    pid: int = 0  # the replica's process: a restarted replica has a new one
    warmup_s: float = 0.0
    numerics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StepProgress:
    """Per-step progress of a running batch, for streaming clients."""

    batch_id: int
    step: int
    total_steps: int
