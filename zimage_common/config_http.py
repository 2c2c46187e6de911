"""The request-facing sections of the configuration: request defaults (``defaults``), request and upload limits
(``limits``) and the HTTP server (``server``). Same rules as ``config.py``: bounds and a description on every field,
unknown keys rejected."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class RequestDefaults(_Strict):
    """Generation parameters used when a request does not set them (Z-Image-Turbo's recipe)."""

    width: int = Field(default=1024, ge=16, le=4096, multiple_of=16, description="Image width, multiple of 16.")
    height: int = Field(default=1024, ge=16, le=4096, multiple_of=16, description="Image height, multiple of 16.")
    num_inference_steps: int = Field(default=9, ge=1, le=100, description="Denoising steps (Turbo: 9).")
    guidance_scale: float = Field(default=0.0, ge=0, le=20, description="CFG scale; > 0 doubles transformer work.")
    negative_prompt: str | None = Field(default=None, description="Used only when guidance_scale > 0.")
    strength: float = Field(
        default=0.6, ge=0, le=1, description="Edits without a mask (img2img): how much of the schedule runs from the "
        "noised input image (diffusers' img2img default).")
    inpaint_strength: float = Field(
        default=1.0, ge=0, le=1, description="Edits with a mask (inpainting): the same, for the masked area "
        "(diffusers' inpaint default).")
    quality_steps: dict[Literal["low", "medium", "high"], int] = Field(
        default_factory=lambda: {"low": 4, "medium": 6, "high": 9}, description="Denoising steps for the API's "
        "`quality` low / medium / high (`hd` counts as high; `auto`, `standard` and no quality use "
        "num_inference_steps). A request's own num_inference_steps wins.")

    @field_validator("quality_steps")
    @classmethod
    def _all_qualities(cls, v: dict) -> dict:
        missing = {"low", "medium", "high"} - set(v)
        if missing:
            raise ValueError(f"quality_steps needs low, medium and high (missing {sorted(missing)})")
        bad = {k: n for k, n in v.items() if not 1 <= n <= 100}
        if bad:
            raise ValueError(f"quality_steps must be between 1 and 100 steps (got {bad})")
        return v


class LimitsConfig(_Strict):
    """Request limits enforced before anything is queued."""

    max_prompt_chars: int = Field(default=4000, ge=1, le=100_000, description="Longest prompt accepted.")
    max_n: int = Field(default=8, ge=1, le=128, description="Most images per API request (`n`; OpenAI's API allows at "
                       "most 10, so the HTTP API refuses more whatever this says).")
    max_pixels: int = Field(
        default=2048 * 2048, ge=256, le=4096 * 4096, description="Most pixels (width*height) per image.")
    max_steps: int = Field(default=50, ge=1, le=200, description="Most denoising steps per request.")
    max_body_bytes: int = Field(default=1_000_000, ge=1024, le=100_000_000, description="Largest HTTP body.")
    max_upload_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024, description="Largest multipart body of "
        "/v1/images/edits (its images and mask together).")
    max_image_bytes: int = Field(
        default=50_000_000, ge=1024, le=1024 * 1024 * 1024, description="Largest input image file (`image`, `mask`) "
        "of an edit (OpenAI's limit: 50 MB).")
    max_input_pixels: int = Field(
        default=40_000_000, ge=256, le=400_000_000, description="Most pixels of an input image as stored, before any "
        "resize (a guard against images that decompress to gigabytes).")
    max_request_input_pixels: int = Field(
        default=100_000_000, ge=256, le=4_000_000_000, description="Most pixels of all the input images of one "
        "request together (the edit's image, its mask, a control_image), as stored, read from the headers before "
        "anything is decoded: bounds one request's decoding time and memory.")
    max_concurrent_image_decodes: int = Field(
        default=2, ge=1, le=64, description="Requests whose input images the HTTP process decodes at the same time "
        "(each decodes its images one by one), within limits.decode_pixel_budget; the others wait in the decode queue "
        "(limits.decode_wait_s).")
    max_inflight_upload_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024, le=64 * 1024**3, description="Bytes of edit bodies (multipart or JSON) "
        "being read, parsed and decoded at once, all requests together. A body reserves its Content-Length before "
        "it is read (a chunked one reserves as its bytes arrive, up to limits.max_upload_bytes) and keeps it until "
        "its images are decoded; the others wait (limits.upload_wait_s), then 429. A batch input file "
        "(POST /v1/files) streams to disk and reserves what "
        "checking it holds (about three times its longest line). Bounds the memory uploads take whatever their "
        "number.")
    upload_wait_s: float = Field(
        default=10.0, ge=0, le=3600, description="How long an upload waits for room in "
        "limits.max_inflight_upload_bytes before a 429 with Retry-After.")
    decode_pixel_budget: int = Field(
        default=64_000_000, ge=256, le=4_000_000_000, description="Input pixels (as stored) the HTTP process decodes "
        "at once, all requests together. A request costs its input images' pixels (read from their headers; at most "
        "the whole budget) and waits in a first-come queue where a small request may pass a large one that does not "
        "fit yet, within one budget's worth of pixels, so decoding is shared by pixels, not by files.")
    decode_wait_s: float = Field(
        default=10.0, ge=0, le=3600, description="How long a request waits in the image-decode queue before a 429 "
        "with Retry-After.")


class ServerConfig(_Strict):
    host: str = Field(default="127.0.0.1", description="Bind address. Loopback by default; 0.0.0.0 exposes it.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    api_keys: list[str] = Field(
        default_factory=list, description="Accepted Bearer keys. Empty and ZIMAGE_API_KEYS unset: no authentication.")
    served_model_name: str = Field(default="z-image-turbo", description="Model name in /v1/models.")
    drain_timeout_s: float = Field(default=600.0, gt=0, le=86_400, description="SIGTERM: wait this long.")
    docs: bool = Field(
        default=False, description="Serve FastAPI's /docs, /redoc and /openapi.json (the generated pages; Swagger UI "
        "loads from a CDN), behind the API key when keys are configured. Off: those paths answer 404 like any unknown "
        "path.")
    metrics_host: str = Field(
        default="127.0.0.1", description="Bind address of the key-free metrics listener (server.metrics_port).")
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="A second listener serving only GET /metrics without a key, for "
        "Prometheus (on server.metrics_host). None: metrics only on the API port, behind the key when keys are "
        "configured.")
    max_connections: int = Field(
        default=32768, ge=16, le=1_000_000, description="Open client connections at most; the effective cap is also "
        "kept below the process's descriptor limit less server.fd_reserve. Past it a new connection closes the oldest "
        "one that has no request in progress (one that never completed a request first, then idle keep-alive ones); "
        "when every connection is busy, the new one is closed. Held connections are cheap and closing them makes a "
        "flooding client reconnect at once, so the cap is best left high and the descriptor limit raised.")
    fd_reserve: int = Field(
        default=512, ge=16, le=1_000_000, description="File descriptors kept free for everything but client "
        "connections (Ray, files, the decode threads): connections are shed before the process runs out. The soft "
        "descriptor limit is raised to the hard one at start.")
    header_timeout_s: float = Field(
        default=10.0, gt=0, le=3600, description="A request's line and headers must arrive within this long after the "
        "connection opens or the previous response ends; else the connection is closed.")
    body_idle_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="Longest pause between two pieces of a request body before a 408 and "
        "the connection closed.")
    body_timeout_s: float = Field(
        default=300.0, gt=0, le=86_400, description="A request body must arrive whole within this long after its "
        "headers (408 otherwise).")
    keep_alive_s: float = Field(
        default=5.0, gt=0, le=3600, description="An idle keep-alive connection is closed after this long.")
    backlog: int = Field(default=2048, ge=1, le=65535, description="The listening socket's accept backlog.")

    @model_validator(mode="after")
    def _two_ports(self) -> ServerConfig:
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError(f"metrics_port ({self.metrics_port}) is the API's port: the key-free metrics listener "
                             f"needs a port of its own (or leave metrics_port out)")
        return self
