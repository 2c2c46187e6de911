"""Every message that crosses a process boundary, as small frozen types (no torch, no ray).

One request is one prompt and one image; batching is the router's job. A result always comes back as data,
with ``ok`` and a reason, never as an exception through the router loop.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

from placement.memory import caption_tokens_bound, sample_tokens


class BatchKey(NamedTuple):
    """What must match for requests to share one pipeline call: the number of denoising steps. Sizes, prompt
    lengths and guidance scales may differ: the replica packs them into one transformer call per step."""

    num_inference_steps: int

    def __str__(self) -> str:
        return f"{self.num_inference_steps}steps"


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


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
    partial_images: int = 0  # preview images wanted while streaming (decoded from intermediate latents)
    trace_id: str = ""  # the X-Request-ID of the HTTP request it came from (shared by its n images); for log lines

    @property
    def key(self) -> BatchKey:
        return BatchKey(self.num_inference_steps)

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def tokens(self) -> int:
        """An upper bound of the tokens this request adds to a packed transformer call (the router's budget unit):
        its image tokens and caption tokens, both padded, twice with guidance (the negative pass)."""
        # surrogatepass: a prompt with a lone surrogate (legal in JSON) must still be counted, not raise here, in
        # admission or the router loop; the replica refuses it alone (actors/screening.py).
        return sample_tokens(self.width, self.height, caption_tokens_bound(_utf8_len(self.prompt)),
                             self.guidance_scale > 0, caption_tokens_bound(_utf8_len(self.negative_prompt or "")))


@dataclass(frozen=True)
class Batch:
    batch_id: int
    requests: tuple[ImageRequest, ...]

    @property
    def key(self) -> BatchKey:
        return self.requests[0].key

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.requests)

    @property
    def pixels(self) -> int:
        return sum(r.pixels for r in self.requests)

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


# Why a result failed (``ImageResult.error_type``). The router and the HTTP layer act on these:
FAILURE_KINDS = {
    "invalid_request": "the request's own input cannot be run (found by the replica); HTTP 400, never retried",
    "request_error": "a fault attributed to this request alone (e.g. non-finite output); HTTP 500, not retried",
    "replica_error": "the whole batch failed; the router bisects it so only the culprit fails; HTTP 500",
    "out_of_memory": "the batch did not fit; the router splits it; a single image that does not fit: HTTP 507",
    "replica_lost": "the replica died under it; retried elsewhere; HTTP 503 when attempts run out",
    "not_ready": "the replica has not loaded yet; retried; HTTP 503",
    "timeout": "over its deadline; HTTP 504",
    "cancelled": "the caller went away",
}


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
    error_type: str | None = None  # see FAILURE_KINDS
    param: str | None = None  # for error_type "invalid_request": the request field at fault
    stage_times: StageTimes = field(default_factory=StageTimes)
    queue_s: float = 0.0
    latency_s: float = 0.0
    attempts: int = 1
    prompt_tokens: int | None = None  # text tokens the encoder saw (chat template included), as the replica counted
    image_tokens: int | None = None  # image tokens the transformer generated ((H/16) x (W/16))

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
    compiles_warmup: int = 0  # graphs torch.compile built before ready
    compiles_after_ready: int = 0  # graphs built while serving (the goal is none)
    max_side: int = 0  # longest image side the model's position table can place, in pixels (0: unknown)


@dataclass(frozen=True)
class StepProgress:
    """Per-step progress of a running batch, for streaming clients. ``previews`` holds the preview images decoded
    at this step for the requests that asked for them (``partial_images``): ``(request_id, partial_index, image)``
    with ``image`` a uint8 [H, W, 3] array."""

    batch_id: int
    step: int
    total_steps: int
    previews: tuple = ()
