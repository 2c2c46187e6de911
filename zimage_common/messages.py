"""Every message that crosses a process boundary, as small frozen types (no torch, no ray).

One request is one prompt and one image; batching is the router's job. A result always comes back as data,
with ``ok`` and a reason, never as an exception through the router loop.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import TYPE_CHECKING, Any, NamedTuple

from placement.memory import caption_tokens_bound, sample_tokens

from .image_codec import EncodedImage, encode_image

if TYPE_CHECKING:
    from .config import JoinPolicy


class BatchKey(NamedTuple):
    """What must match for requests to share one pipeline call: the number of denoising steps run. Sizes, prompt
    lengths and guidance scales may differ: the replica packs them into one transformer call per step. An edit
    (img2img, inpainting) runs the last ``steps_run(num_inference_steps, strength)`` steps of its schedule and
    batches with any request that runs as many (``actors/conditioning.py``)."""

    num_inference_steps: int

    def __str__(self) -> str:
        return f"{self.num_inference_steps}steps"


def start_step(num_inference_steps: int, strength: float) -> int:
    """The first step of a ``num_inference_steps`` schedule that an edit at ``strength`` runs (diffusers'
    ``get_timesteps``: ``int(max(N - min(N * strength, N), 0))``)."""
    init_timestep = min(num_inference_steps * strength, num_inference_steps)
    return int(max(num_inference_steps - init_timestep, 0))


def steps_run(num_inference_steps: int, strength: float) -> int:
    """How many denoising steps an edit actually runs (0: none, the request cannot run)."""
    return num_inference_steps - start_step(num_inference_steps, strength)


def _utf8_len(text: str) -> int:
    """The bytes the text encoder's byte-level BPE runs over: after its tokenizer's NFC normalization, which makes
    some text longer (code points excluded from composition decompose: U+1D160 goes from 4 bytes to 12)."""
    return len(unicodedata.normalize("NFC", text).encode("utf-8", "surrogatepass"))


INTERACTIVE = 0  # API calls and the Python API
BATCH_JOB = 1  # requests of a batch job: they take what capacity interactive requests leave


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
    # An edit (orchestrator/image_input.py): the input image, uint8 [height, width, 3]; the mask, uint8
    # [height, width], 255 = repaint (inpainting), None = img2img; strength, the part of the schedule that runs.
    image: Any = field(default=None, compare=False, repr=False)
    mask: Any = field(default=None, compare=False, repr=False)
    strength: float = 1.0
    # ControlNet (actors/controlnet.py): the control image, uint8 [height, width, 3], and its conditioning scale.
    control_image: Any = field(default=None, compare=False, repr=False)
    control_scale: float = 0.75
    loras: tuple[tuple[str, float], ...] = ()  # per-request LoRA: (adapter name, scale), applied in this order
    priority: int = 0  # INTERACTIVE or BATCH_JOB: the router serves lower values first (scheduler.py)
    # How the replica returns the image: None, raw pixels (the Python API); "png" / "jpeg" / "webp", encoded on the
    # replica's node at ``output_compression`` (the HTTP service), so the front door only forwards bytes.
    output_format: str | None = None
    output_compression: int | None = None
    # Idempotency-Key (orchestrator/idempotency.py): the key of this one image within a keyed call. A replica runs a
    # keyed image at most once across every front door and replica of a pool (actors/intake.py); "" = none.
    result_key: str = ""

    @property
    def steps_run(self) -> int:
        return self.num_inference_steps if self.image is None else steps_run(self.num_inference_steps, self.strength)

    @property
    def key(self) -> BatchKey:
        return BatchKey(self.steps_run)

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @cached_property
    def adapter_names(self) -> frozenset[str]:
        """The LoRA adapters it names (the scheduler's adapter limit reads it on every router-loop pass)."""
        return frozenset(name for name, _ in self.loras)

    @cached_property
    def tokens(self) -> int:
        """An upper bound of the tokens this request adds to a packed transformer call (the router's budget unit):
        its image tokens and caption tokens, both padded, twice with guidance (the negative pass). Computed once
        per request: the scheduler reads it on every pass of the router loop."""
        # surrogatepass: a prompt with a lone surrogate (legal in JSON) must still be counted, not raise here, in
        # admission or the router loop; the replica refuses it alone (actors/screening.py).
        return sample_tokens(self.width, self.height, caption_tokens_bound(_utf8_len(self.prompt)),
                             self.guidance_scale > 0, caption_tokens_bound(_utf8_len(self.negative_prompt or "")))


@dataclass(frozen=True)
class Batch:
    batch_id: int
    requests: tuple[ImageRequest, ...]
    # when these requests join a running set of the replica's step loop (``config.JoinPolicy``, from
    # ``router.scheduling``); None: the replica's default
    join: JoinPolicy | None = None

    @property
    def key(self) -> BatchKey:
        return self.requests[0].key

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.requests)

    @property
    def is_job(self) -> bool:
        """A batch job's work (priorities never share a call)."""
        return bool(self.requests) and self.requests[0].priority > INTERACTIVE

    def __len__(self) -> int:
        return len(self.requests)


@dataclass(frozen=True)
class StageTimes:
    """Seconds spent in each stage of one batch, measured inside the replica."""

    encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    image_encode_s: float = 0.0  # the VAE encode of input images (edits), its own stage


# Why a result failed (``ImageResult.error_type``). The router and the HTTP layer act on these:
class FailureKind(str, Enum):
    """Why a request failed or was refused: one vocabulary for the replica, the router, the HTTP layer and the
    metrics (``zimage_request_errors_total{type}``). Results carry it as ``ImageResult.error_type``; errors raised at
    admission carry it as ``ZImageError.kind``. ``FAILURES`` maps each to its HTTP status, OpenAI error type and
    retryability."""

    INVALID_REQUEST = "invalid_request"
    REQUEST_ERROR = "request_error"
    REPLICA_ERROR = "replica_error"
    OUT_OF_MEMORY = "out_of_memory"
    REPLICA_LOST = "replica_lost"
    NOT_READY = "not_ready"
    QUEUE_FULL = "queue_full"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"

    __str__ = str.__str__  # the value, in log lines and metric labels


@dataclass(frozen=True)
class Failure:
    http_status: int
    openai_type: str  # the ``error.type`` of OpenAI's envelope
    retryable: bool  # whether the same request may succeed if sent again later
    meaning: str


FAILURES: dict[FailureKind, Failure] = {
    FailureKind.INVALID_REQUEST: Failure(400, "invalid_request_error", False,
                                         "the request's own input cannot be run (at admission or found by the "
                                         "replica); never retried"),
    FailureKind.REQUEST_ERROR: Failure(500, "server_error", False,
                                       "a fault attributed to this request alone (e.g. non-finite output)"),
    FailureKind.REPLICA_ERROR: Failure(500, "server_error", False,
                                       "the whole batch failed; the router bisects it so only the culprit fails"),
    FailureKind.OUT_OF_MEMORY: Failure(507, "insufficient_memory", False,
                                       "the batch did not fit: the router splits it; a lone image that does not fit "
                                       "fails"),
    FailureKind.REPLICA_LOST: Failure(503, "service_unavailable", True,
                                      "the replica died or hung under it; retried elsewhere up to "
                                      "router.max_attempts"),
    FailureKind.NOT_READY: Failure(503, "service_unavailable", True,
                                   "no replica is ready (starting, draining, restarting)"),
    FailureKind.QUEUE_FULL: Failure(429, "rate_limit_error", True, "the queue is at router.queue_limit"),
    FailureKind.TIMEOUT: Failure(504, "timeout", True, "over its deadline (router.request_timeout_s)"),
    FailureKind.CANCELLED: Failure(499, "cancelled", False, "the caller went away before it ran"),
}


def failure(kind: str | None) -> Failure:
    """The table's entry for a failure kind (an unknown one counts as a replica error)."""
    try:
        return FAILURES[FailureKind(kind)]
    except ValueError:
        return FAILURES[FailureKind.REPLICA_ERROR]


@dataclass(frozen=True)
class ImageResult:
    """The outcome for one request. When ``ok``, ``image`` (uint8 [H, W, 3]) holds the pixels, or, for a request
    that named an ``output_format``, ``encoded`` holds the bytes the replica's encoder pool made (``image`` None: the
    pixels do not travel twice). ``error``/``error_type`` when not ok. Encoding never holds a GPU: ``png`` encodes
    raw pixels on first use, wherever the caller is."""

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
    error_type: str | None = None  # a FailureKind
    param: str | None = None  # for error_type "invalid_request": the request field at fault
    stage_times: StageTimes = field(default_factory=StageTimes)
    queue_s: float = 0.0
    latency_s: float = 0.0
    attempts: int = 1
    prompt_tokens: int | None = None  # text tokens the encoder saw (chat template included), as the replica counted
    image_tokens: int | None = None  # image tokens the transformer generated ((H/16) x (W/16))
    encoded: EncodedImage | None = field(default=None, repr=False)

    @property
    def picture(self):
        """What the replica sent: the ``EncodedImage`` when it encoded, else the pixels (None when failed)."""
        return self.encoded if self.encoded is not None else self.image

    @cached_property
    def png(self) -> bytes | None:
        if self.encoded is not None and self.encoded.format == "png":
            return self.encoded.data
        pixels = self.pixels()
        return None if pixels is None else encode_image(pixels, "png")

    def pixels(self):
        """uint8 [H, W, 3]: the pixels, decoded from ``encoded`` when that is what came back."""
        if self.image is not None:
            return self.image
        return None if self.encoded is None else self.encoded.pixels()

    def pil(self):
        from PIL import Image

        pixels = self.pixels()
        return None if pixels is None else Image.fromarray(pixels)


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
    eager_fallbacks: dict[str, int] = field(default_factory=dict)  # per stage: calls after ready no graph covered
    encoder_graphs: int = 0  # CUDA graphs the text encoder replays (actors/encoder_graphs.py); 0: it runs eager
    max_side: int = 0  # longest image side the model's position table can place, in pixels (0: unknown)
    # seconds of each phase of the replica's start: "process" (the process's creation to the actor's: Ray's worker
    # start and the imports), then actors/startup.py's phases in order ("imports", "load", "speed_options",
    # "warmup_batches", "warmup_extra", what was left of "attention_plans", which run beside them on the denoise
    # stage's thread, and "text_encoder": the capture of its CUDA graphs, or what was left of its eager warm-up)
    startup_s: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StepProgress:
    """Per-step progress of a running batch, for streaming clients. ``previews`` holds the preview images decoded
    at this step for the requests that asked for them (``partial_images``): ``(request_id, partial_index, image)``
    with ``image`` a uint8 [H, W, 3] array, or an ``EncodedImage`` where the request named an ``output_format``."""

    batch_id: int
    step: int
    total_steps: int
    previews: tuple = ()
    # the replica's loop step this came from, the samples that ran in it and those that joined at it (metrics)
    loop_step: int = 0
    running: int = 0
    joined: int = 0
