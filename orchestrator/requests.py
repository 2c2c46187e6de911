"""Turning what a caller asked for into validated ``ImageRequest`` s, with errors that name the field and the fix.

Shared by the Python API, the CLI and the HTTP server, so every entry point accepts and rejects the same things.
"""

from __future__ import annotations

import re
import secrets
import uuid

from zimage_common.config import LimitsConfig, RequestDefaults
from zimage_common.errors import InvalidRequestError
from zimage_common.messages import ImageRequest

SEED_MAX = 2**63 - 1
MAX_SIDE = 1 << 16  # a hard ceiling whatever the model: the model's own limit (max_side) is usually lower
_SIZE_RE = re.compile(r"^\s*(\d{1,7})\s*[xX×]\s*(\d{1,7})\s*$")


def shown(value, limit: int = 60) -> str:
    """A caller's value for an error message: repr'd, cut to ``limit`` characters, surrogates escaped, so that
    echoing it never makes a response huge or unencodable."""
    if isinstance(value, (list, dict)):  # never repr a caller's structure: it may be huge or nested too deeply
        return f"a JSON {'array' if isinstance(value, list) else 'object'}"
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's digit limit for str()
        return "<a number with too many digits>"
    if len(text) > limit:
        text = text[: limit - 5] + "...'" if text[:1] in "'\"" else text[: limit - 3] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def decimal(text: str | None, max_digits: int = 19) -> int | None:
    """A header's or a query's non-negative decimal, or None. ``str.isdigit`` is no test for ``int()``: it is
    true for "²" and for a number past Python's 4,300-digit limit, on which ``int()`` raises (a 500 from any
    caller's link or header)."""
    if text is None or not 0 < len(text) <= max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def check_text(name: str, text: str) -> None:
    """Text the model will read must be valid Unicode: JSON can carry lone surrogates (``"\\ud800"``) that no
    UTF-8 tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            f"{name} is not valid Unicode text: it holds a lone surrogate (U+{ord(text[e.start]):04X}) at "
            f"character {e.start}; send UTF-8 text", param=name) from None


def parse_size(size: str | None, defaults: RequestDefaults) -> tuple[int, int]:
    """'WxH' -> (width, height); None/'auto' -> the defaults."""
    if size is None or size == "auto":
        return defaults.width, defaults.height
    if not isinstance(size, str):
        raise InvalidRequestError(f"size must be a string 'WIDTHxHEIGHT', e.g. '1024x1024' (got {shown(size)})",
                                  param="size")
    m = _SIZE_RE.match(size)
    if not m:
        raise InvalidRequestError(f"size must look like '1024x1024' (WIDTHxHEIGHT in pixels), got {shown(size)}",
                                  param="size")
    return int(m.group(1)), int(m.group(2))


def _check_int(name: str, v, lo: int, hi: int, hint: str = "", param: str | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequestError(f"{name} must be an integer, got {shown(v)}", param=param or name)
    if not lo <= v <= hi:
        raise InvalidRequestError(f"{name} must be between {lo} and {hi}, got {shown(v)}{hint}",
                                  param=param or name)
    return v


MAX_N = 10  # OpenAI's Images API: n is 1 to 10 (CreateImageRequest, CreateImageEditRequest)
MAX_LORAS_PER_REQUEST = 8
LORA_SCALE_LIMIT = 10.0


def parse_loras(value, known=None) -> tuple[tuple[str, float], ...]:
    """The ``loras`` extension: ``[{"name": "style-a", "scale": 0.8}, ...]`` (scale defaults to 1; the Python API
    may also pass ``(name, scale)`` pairs) -> ``((name, scale), ...)``. ``known``: the registered adapter names
    (None: not checked here)."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise InvalidRequestError(f"loras must be a list of {{\"name\", \"scale\"}} objects, got {shown(value)}",
                                  param="loras")
    if len(value) > MAX_LORAS_PER_REQUEST:
        raise InvalidRequestError(f"loras lists {len(value)} adapters; at most {MAX_LORAS_PER_REQUEST} per request",
                                  param="loras")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, (list, tuple)) and len(item) == 2:
            item = {"name": item[0], "scale": item[1]}
        if not isinstance(item, dict):
            raise InvalidRequestError(f"loras[{i}] must be an object {{\"name\": ..., \"scale\": ...}}, got "
                                      f"{shown(item)}", param="loras")
        extra = sorted(k for k in item if k not in ("name", "scale"))
        if extra:
            raise InvalidRequestError(f"loras[{i}] has unknown field(s) {', '.join(shown(k, 30) for k in extra)}; "
                                      f"accepted: name, scale", param="loras")
        name, scale = item.get("name"), item.get("scale", 1.0)
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"loras[{i}].name must be an adapter's name (a string), got {shown(name)}",
                                      param="loras")
        if scale is None:
            scale = 1.0
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale \
                or abs(scale) > LORA_SCALE_LIMIT:
            raise InvalidRequestError(f"loras[{i}].scale must be a number from -{LORA_SCALE_LIMIT:g} to "
                                      f"{LORA_SCALE_LIMIT:g}, got {shown(scale)}", param="loras")
        if known is not None and name not in known:
            names = ", ".join(sorted(known)[:20]) or "none"
            raise InvalidRequestError(f"unknown LoRA adapter {shown(name)}; registered: {names} (GET /v1/loras "
                                      f"lists them, POST /v1/loras adds one)", param="loras")
        out.append((name, float(scale)))
    return tuple(out)


LORA_REGISTRATION_FIELDS = ("name", "path", "source", "model_id", "revision")


def parse_lora_registration(payload) -> dict:
    """The body of ``POST /v1/loras``: ``{"name", "path"}`` (or ``source`` / ``model_id`` / ``revision`` for a
    hub), strictly: any other key, or a value that is not a string (null for the optional ones), is an
    InvalidRequestError naming that field. Returns the keyword arguments of ``Deployment.register_lora``."""
    if not isinstance(payload, dict):
        raise InvalidRequestError(f'send a JSON object {{"name": "...", "path": "..."}}, got {shown(payload)}',
                                  param="name")
    extra = [k for k in payload if k not in LORA_REGISTRATION_FIELDS]
    if extra:
        raise InvalidRequestError(f"unknown field {shown(extra[0], 40)}; accepted: "
                                  f"{', '.join(LORA_REGISTRATION_FIELDS)}", param=str(extra[0])[:64])
    for key, value in payload.items():
        if not isinstance(value, str) and not (value is None and key != "name"):
            raise InvalidRequestError(f"{key} must be a string, got {shown(value)}", param=key)
    if "name" not in payload:
        raise InvalidRequestError('name is required: send {"name": "...", "path": "..."}', param="name")
    return dict(payload)


def build_requests(prompt, *, defaults: RequestDefaults, limits: LimitsConfig, n: int = 1, width: int | None = None,
                   height: int | None = None, num_inference_steps: int | None = None,
                   guidance_scale: float | None = None, seed: int | None = None, negative_prompt: str | None = None,
                   request_id: str | None = None, max_side: int | None = None, partial_images: int | None = None,
                   trace_id: str | None = None, loras=None, known_loras=None) -> list[ImageRequest]:
    """Validate one prompt's parameters and fan ``n`` out into ``n`` requests with seeds seed, seed+1, ...
    ``None`` means the default for every parameter. ``max_side``: the longest side the model can place
    (``Deployment.max_side``); ``partial_images``: preview images per request while streaming (0-3);
    ``trace_id`` (the HTTP request's X-Request-ID) goes on every one of them, for log lines. ``loras``: per-request
    LoRA adapters (``parse_loras``), checked against ``known_loras`` when given."""
    if not isinstance(prompt, str):
        raise InvalidRequestError(f"prompt must be a string, got {type(prompt).__name__}", param="prompt")
    if not prompt.strip():
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidRequestError(
            f"prompt is {len(prompt)} characters; the limit is {limits.max_prompt_chars} "
            f"(limits.max_prompt_chars)", param="prompt")
    check_text("prompt", prompt)
    spec_n = min(limits.max_n, MAX_N)
    n = 1 if n is None else _check_int(
        "n", n, 1, spec_n, f" (limits.max_n = {limits.max_n}; OpenAI's Images API allows at most {MAX_N})"
        if limits.max_n > MAX_N else " (limits.max_n)")
    side = min(MAX_SIDE, max_side or MAX_SIDE)
    hint = f" (the model places at most {side} pixels per side)" if max_side else ""
    width = defaults.width if width is None else _check_int("width", width, 1, side, hint, param="size")
    height = defaults.height if height is None else _check_int("height", height, 1, side, hint, param="size")
    for name, v in (("width", width), ("height", height)):
        if v % 16:
            raise InvalidRequestError(
                f"{name} must be a multiple of 16 (got {v}); try {max(16, round(v / 16) * 16)}", param="size")
    if width * height > limits.max_pixels:
        raise InvalidRequestError(
            f"size {width}x{height} is {width * height} pixels; the limit is {limits.max_pixels} "
            f"(limits.max_pixels)", param="size")
    steps = defaults.num_inference_steps if num_inference_steps is None else num_inference_steps
    steps = _check_int("num_inference_steps", steps, 1, limits.max_steps)
    guidance = defaults.guidance_scale if guidance_scale is None else guidance_scale
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance != guidance:
        raise InvalidRequestError(f"guidance_scale must be a number, got {shown(guidance)}",
                                  param="guidance_scale")
    if not 0.0 <= guidance <= 20.0:
        raise InvalidRequestError(f"guidance_scale must be between 0 and 20, got {shown(guidance)}",
                                  param="guidance_scale")
    if negative_prompt is None:
        negative_prompt = defaults.negative_prompt
    if negative_prompt is not None:
        if not isinstance(negative_prompt, str):
            raise InvalidRequestError("negative_prompt must be a string", param="negative_prompt")
        if len(negative_prompt) > limits.max_prompt_chars:
            raise InvalidRequestError(f"negative_prompt is longer than {limits.max_prompt_chars} characters",
                                      param="negative_prompt")
        check_text("negative_prompt", negative_prompt)
    seed = secrets.randbelow(2**31) if seed is None else _check_int("seed", seed, 0, SEED_MAX - limits.max_n)
    partial_images = 0 if partial_images is None else _check_int("partial_images", partial_images, 0, 3)
    adapters = parse_loras(loras, known_loras)
    base = request_id or uuid.uuid4().hex[:16]
    return [
        ImageRequest(
            request_id=base if n == 1 else f"{base}-{i}",
            prompt=prompt,
            seed=seed + i,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=float(guidance),
            negative_prompt=negative_prompt if guidance > 0 else None,
            partial_images=partial_images,
            trace_id=trace_id or "",
            loras=adapters,
        )
        for i in range(n)
    ]
