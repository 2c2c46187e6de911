"""OpenAI's Images API as published (``POST /v1/images/generations``): request fields, response and event shapes.

Every field of OpenAI's ``CreateImageRequest`` is either implemented or refused with a 400 that says why, and
``null`` means the default for each field (the spec marks them nullable). What each field does here:

| field | here |
| --- | --- |
| ``prompt`` | required; valid Unicode text up to ``limits.max_prompt_chars`` |
| ``model`` | ``server.served_model_name`` (or null) |
| ``n`` | 1 to ``limits.max_n``; the images get seeds ``seed, seed+1, ...`` |
| ``size`` | ``WIDTHxHEIGHT`` in multiples of 16, or ``auto`` (the configured default) |
| ``quality`` | ``low``/``medium``/``high`` (``hd`` = high) -> ``defaults.quality_steps``; others: default steps |
| ``response_format`` | ``b64_json``; ``url`` refused (this server hosts no image URLs) |
| ``output_format`` | ``png`` (default), ``jpeg``, ``webp`` |
| ``output_compression`` | 0-100, the JPEG/WebP quality (default 100); PNG is lossless, so only 100 |
| ``background`` | ``auto``/``opaque``; ``transparent`` refused (the model has no alpha channel) |
| ``moderation`` | ``auto``/``low``: accepted; this server runs no content moderation at any level |
| ``style`` | refused: a dall-e-3 option this model has no control for |
| ``stream`` | server-sent events (``image_generation.partial_image`` / ``.completed``) |
| ``partial_images`` | 0-3 previews per image while streaming, decoded from intermediate latents |
| ``user``, ``safety_identifier`` | accepted and written to the log with the request id |

Extensions (top-level fields other diffusion servers use): ``seed``, ``num_inference_steps`` (wins over
``quality``), ``guidance_scale``, ``negative_prompt``, ``loras`` (per-request LoRA adapters,
``[{"name", "scale"}]``). Responses carry only spec fields, plus ``seed`` per image
(and ``index``/``seed``/``width``/``height`` in stream events) as extra fields.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from .config import Config
from .errors import InvalidRequestError
from .logging_setup import current_request_id
from .messages import ImageRequest, ImageResult
from .requests import build_requests, check_text, parse_size, shown

SPEC_FIELDS = ("prompt", "model", "n", "quality", "response_format", "output_format", "output_compression",
               "stream", "partial_images", "size", "moderation", "background", "style", "user")
CLIENT_FIELDS = ("safety_identifier",)  # sent by the official client; not in the published document
EXTENSIONS = ("seed", "num_inference_steps", "guidance_scale", "negative_prompt", "loras")
ACCEPTED = frozenset(SPEC_FIELDS + CLIENT_FIELDS + EXTENSIONS)

# Sizes the spec's response and event schemas can name; any other size is reported as "auto" in events (and
# left out of the JSON response, where `size` is optional), with the exact width and height as extra fields.
SPEC_SIZES = ("1024x1024", "1024x1536", "1536x1024")
FORMATS = ("png", "jpeg", "webp")
QUALITIES = ("low", "medium", "high", "auto", "standard", "hd")


@dataclass(frozen=True)
class ImageCall:
    """One validated API call: the requests it fans out into and how to answer it."""

    requests: list[ImageRequest]
    stream: bool = False
    output_format: str = "png"
    output_compression: int | None = None
    quality: str = "auto"  # as reported back: low / medium / high / auto
    user: str | None = None
    safety_identifier: str | None = None


def _enum(payload: dict, name: str, allowed: tuple, default, why: dict | None = None):
    v = payload.get(name)
    if v is None:
        return default
    if why and isinstance(v, str) and v in why:
        raise InvalidRequestError(why[v], param=name)
    if not isinstance(v, str) or v not in allowed:
        raise InvalidRequestError(f"{name} must be one of {list(allowed)} or null, got {shown(v)}", param=name)
    return v


def _identifier(payload: dict, name: str) -> str | None:
    v = payload.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise InvalidRequestError(f"{name} must be a string, got {shown(v)}", param=name)
    if len(v) > 256:
        raise InvalidRequestError(f"{name} is {len(v)} characters; the limit is 256", param=name)
    check_text(name, v)
    return v


def parse_generation(payload, config: Config, max_side: int | None = None, known_loras=None) -> ImageCall:
    """Validate a request body (already JSON-decoded) against the spec and this deployment's limits.
    ``known_loras``: the LoRA adapters registered (the ``loras`` extension names them; None: not checked)."""
    if not isinstance(payload, dict):
        raise InvalidRequestError("request body must be a JSON object")
    unknown = sorted(k for k in payload if k not in ACCEPTED)
    if unknown:
        names = ", ".join(shown(k, 40) for k in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5
                                                                else "")
        raise InvalidRequestError(f"unknown field(s) {names}; accepted: {sorted(ACCEPTED)}",
                                  param=shown(unknown[0], 40).strip("'\""))
    if "prompt" not in payload or payload["prompt"] is None:
        raise InvalidRequestError("prompt is required", param="prompt")
    model = payload.get("model")
    if model is not None and model != config.server.served_model_name:
        raise InvalidRequestError(f"model {shown(model)} is not served here; use "
                                  f"{config.server.served_model_name!r}", param="model")
    _enum(payload, "response_format", ("b64_json", "url"), "b64_json", why={
        "url": "response_format 'url' is not supported: this server hosts no image URLs; use 'b64_json'"})
    output_format = _enum(payload, "output_format", FORMATS, "png")
    compression = payload.get("output_compression")
    if compression is not None:
        if isinstance(compression, bool) or not isinstance(compression, int) or not 0 <= compression <= 100:
            raise InvalidRequestError(f"output_compression must be an integer from 0 to 100, got {shown(compression)}",
                                      param="output_compression")
        if output_format == "png" and compression != 100:
            raise InvalidRequestError("output_compression applies to jpeg and webp; PNG is lossless (use 100 or "
                                      "null, or output_format 'jpeg' / 'webp')", param="output_compression")
    _enum(payload, "background", ("auto", "opaque", "transparent"), "auto", why={
        "transparent": "background 'transparent' is not supported: Z-Image-Turbo generates RGB images with no "
                       "alpha channel; use 'opaque' or 'auto'"})
    _enum(payload, "moderation", ("auto", "low"), "auto")
    _enum(payload, "style", ("vivid", "natural"), None, why={
        s: f"style {s!r} is a dall-e-3 option; this model has no style control: describe the style in the prompt "
           f"and send style null or leave it out" for s in ("vivid", "natural")})
    quality = _enum(payload, "quality", QUALITIES, "auto")
    quality = {"hd": "high", "standard": "auto"}.get(quality, quality)
    stream = payload.get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise InvalidRequestError(f"stream must be true, false or null, got {shown(stream)}", param="stream")
    steps = payload.get("num_inference_steps")
    if steps is None and quality in config.defaults.quality_steps:
        steps = config.defaults.quality_steps[quality]
    width, height = parse_size(payload.get("size"), config.defaults)
    requests = build_requests(
        payload["prompt"], defaults=config.defaults, limits=config.limits, n=payload.get("n"),
        width=width, height=height, num_inference_steps=steps,
        guidance_scale=payload.get("guidance_scale"), seed=payload.get("seed"),
        negative_prompt=payload.get("negative_prompt"), max_side=max_side,
        partial_images=payload.get("partial_images") if stream else _partials_unused(payload),
        trace_id=current_request_id(), loras=payload.get("loras"), known_loras=known_loras,
    )
    return ImageCall(requests, stream, output_format, compression, quality,
                     _identifier(payload, "user"), _identifier(payload, "safety_identifier"))


def _partials_unused(payload: dict) -> int:
    """``partial_images`` without ``stream``: validated, then unused (a JSON response has no place for them)."""
    v = payload.get("partial_images")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 3):
        raise InvalidRequestError(f"partial_images must be an integer from 0 to 3, got {shown(v)}",
                                  param="partial_images")
    return 0


# ---- encoding and response shapes ----------------------------------------------------------------------
def encode_image(image, output_format: str = "png", compression: int | None = None) -> bytes:
    """uint8 [H, W, 3] -> PNG (zlib level 1: the fast trade a serving path wants), JPEG or WebP at quality
    ``compression`` (default 100)."""
    from PIL import Image

    buf = io.BytesIO()
    pil = Image.fromarray(image)
    if output_format == "png":
        pil.save(buf, format="PNG", compress_level=1)
    elif output_format == "jpeg":
        pil.save(buf, format="JPEG", quality=100 if compression is None else compression)
    elif output_format == "webp":
        pil.save(buf, format="WEBP", quality=100 if compression is None else compression)
    else:
        raise ValueError(f"unknown output format {output_format!r}")
    return buf.getvalue()


def size_label(width: int, height: int) -> str | None:
    label = f"{width}x{height}"
    return label if label in SPEC_SIZES else None


def usage(results: list[ImageResult]) -> dict | None:
    """Token usage as the spec counts it: input = the prompt's text tokens as the text encoder saw them (chat
    template included, negative prompt added when guidance uses it), counted once per call; output = image
    tokens generated, (H/16) x (W/16) per image. None when a replica did not report its counts."""
    if not results or any(r.prompt_tokens is None or r.image_tokens is None for r in results):
        return None
    text = results[0].prompt_tokens
    image = sum(r.image_tokens for r in results)
    return {"input_tokens": text, "output_tokens": image, "total_tokens": text + image,
            "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
            "output_tokens_details": {"image_tokens": image, "text_tokens": 0}}


def images_response(call: ImageCall, results: list[ImageResult], b64: list[str], created: int) -> dict:
    """The ``ImagesResponse`` body: spec fields only (``revised_prompt`` is left out, not null), ``seed`` per
    image as an extra field."""
    body: dict = {"created": created,
                  "data": [{"b64_json": b, "seed": r.seed} for b, r in zip(b64, results)],
                  "background": "opaque", "output_format": call.output_format}
    first = results[0]
    if (label := size_label(first.width, first.height)) is not None:
        body["size"] = label
    if call.quality in ("low", "medium", "high"):
        body["quality"] = call.quality
    if (u := usage(results)) is not None:
        body["usage"] = u
    return body


def _event_common(call: ImageCall, result_or_request, created: int) -> dict:
    r = result_or_request
    return {"created_at": created, "size": size_label(r.width, r.height) or "auto", "quality": call.quality,
            "background": "opaque", "output_format": call.output_format}


def partial_image_event(call: ImageCall, index: int, request: ImageRequest, partial_index: int, b64: str,
                        created: int) -> dict:
    return {"type": "image_generation.partial_image", "b64_json": b64, **_event_common(call, request, created),
            "partial_image_index": partial_index, "index": index, "width": request.width, "height": request.height}


def completed_event(call: ImageCall, index: int, result: ImageResult, b64: str, created: int) -> dict:
    zero = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
            "input_tokens_details": {"text_tokens": 0, "image_tokens": 0}}
    return {"type": "image_generation.completed", "b64_json": b64, **_event_common(call, result, created),
            "usage": usage([result]) or zero, "index": index, "seed": result.seed, "width": result.width,
            "height": result.height}
