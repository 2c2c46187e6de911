"""OpenAI's Images API as published (``POST /v1/images/generations``): request fields, response and event shapes.

Every field of OpenAI's ``CreateImageRequest`` is either implemented or refused with a 400 that says why, and
``null`` means the default for each field; README.md's table says what each does here. Extensions (top-level fields
other diffusion servers use): ``seed``, ``num_inference_steps`` (wins over ``quality``), ``guidance_scale``,
``negative_prompt``, ``loras`` (``[{"name", "scale"}]``); ``control_image`` and ``controlnet_conditioning_scale`` with
``model.controlnet`` (``with_control``). ``POST /v1/images/edits``: ``parse_edit`` / ``parse_json_edit`` below
(docs/conditioning.md). Responses carry only spec fields, plus ``seed`` per image (and ``index``/``seed``/``width``/
``height`` in stream events) as extra fields."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from zimage_common.config import Config
from zimage_common.errors import InvalidRequestError
from zimage_common.image_codec import FORMATS
from zimage_common.logging_setup import current_request_id
from zimage_common.messages import ImageRequest, ImageResult, steps_run

from .requests import build_requests, check_text, parse_size, shown

SPEC_FIELDS = ("prompt", "model", "n", "quality", "response_format", "output_format", "output_compression",
               "stream", "partial_images", "size", "moderation", "background", "style", "user")
CLIENT_FIELDS = ("safety_identifier",)  # sent by the official client; not in the published document
EXTENSIONS = ("seed", "num_inference_steps", "guidance_scale", "negative_prompt", "loras", "control_image",
              "controlnet_conditioning_scale")
ACCEPTED = frozenset(SPEC_FIELDS + CLIENT_FIELDS + EXTENSIONS)

# Sizes the spec's response and event schemas can name; any other size is reported as "auto" in events (and
# left out of the JSON response, where `size` is optional), with the exact width and height as extra fields.
SPEC_SIZES = ("1024x1024", "1024x1536", "1536x1024")
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
    event_type: str = "image_generation"  # stream events' prefix: image_generation.* or image_edit.*
    input_image_tokens: int = 0  # an edit's input images, as image tokens ((H/16) x (W/16) each), for usage
    response_format: str = "b64_json"  # or "url": each image is stored and answered with a link
    body_digest: str = ""  # the call's fingerprint, for Idempotency-Key (idempotency.py); set when a key came


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
    payload = integral(payload)
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
    response_format = _enum(payload, "response_format", ("b64_json", "url"), "b64_json")
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
    if payload.get("control_image") is not None or payload.get("controlnet_conditioning_scale") is not None:
        requests = with_control(requests, payload.get("control_image"),
                                payload.get("controlnet_conditioning_scale"), config)
    if config.frontdoor.encode_on_replica:  # encoded on the replica's node; the front door forwards the bytes
        requests = [replace(r, output_format=output_format, output_compression=compression) for r in requests]
    return ImageCall(requests, stream, output_format, compression, quality,
                     _identifier(payload, "user"), _identifier(payload, "safety_identifier"),
                     response_format=response_format)


def integral(payload: dict) -> dict:
    """``payload`` with the integer fields' integral numbers as ints: JSON Schema's ``integer`` takes 1.0 (a
    number with a zero fractional part), and so do we."""
    fixed = {k: int(v) for k in _INTEGER_FIELDS if isinstance(v := payload.get(k), float) and v.is_integer()}
    return {**payload, **fixed} if fixed else payload


def with_control(requests: list[ImageRequest], control_image, scale, config: Config) -> list[ImageRequest]:
    """Attach a ControlNet control image (bytes, a base64 string, a PIL image) and its scale to every request;
    400s: no ControlNet in this deployment (``model.controlnet``), a bad image (the edit image rules), a scale
    outside 0-4 or without an image."""
    from .image_input import prepare_control

    if control_image is None:
        raise InvalidRequestError("controlnet_conditioning_scale needs a control_image", param="control_image")
    if config.model.controlnet is None:
        raise InvalidRequestError("this deployment has no ControlNet (model.controlnet is not set); send the request "
                                  "without control_image", param="control_image")
    if scale is None:
        scale = config.model.controlnet.conditioning_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= scale <= 4.0:
        raise InvalidRequestError(f"controlnet_conditioning_scale must be a number from 0 to 4, got {shown(scale)}",
                                  param="controlnet_conditioning_scale")
    r0 = requests[0]
    control = prepare_control(control_image, r0.width, r0.height, config.limits)
    return [replace(r, control_image=control, control_scale=float(scale)) for r in requests]


def _partials_unused(payload: dict) -> int:
    """``partial_images`` without ``stream``: validated, then unused (a JSON response has no place for them)."""
    v = payload.get("partial_images")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 3):
        raise InvalidRequestError(f"partial_images must be an integer from 0 to 3, got {shown(v)}",
                                  param="partial_images")
    return 0


# ---- POST /v1/images/edits ------------------------------------------------------------------------------
EDIT_SPEC_FIELDS = ("image", "prompt", "mask", "background", "model", "n", "size", "response_format",
                    "output_format", "output_compression", "user", "input_fidelity", "stream", "partial_images",
                    "quality")
EDIT_EXTENSIONS = ("seed", "num_inference_steps", "guidance_scale", "negative_prompt", "strength", "loras",
                   "control_image", "controlnet_conditioning_scale")
EDIT_ACCEPTED = frozenset(EDIT_SPEC_FIELDS + CLIENT_FIELDS + EDIT_EXTENSIONS)
_INTEGER_FIELDS = ("n", "output_compression", "partial_images", "seed", "num_inference_steps")
_NUMBER_FIELDS = ("guidance_scale", "strength", "controlnet_conditioning_scale")
_BOOLEAN_FIELDS = ("stream",)
_JSON_FIELDS = ("loras",)  # a multipart text field holding JSON (``loras=[{"name": "x", "scale": 0.8}]``)
_FILE_FIELDS = ("image", "mask")
_CONTROL_FIELDS = ("control_image", "controlnet_conditioning_scale")


def _form_value(name: str, value):
    """A multipart field's text as the JSON type the spec gives it (clients send numbers and booleans as text:
    the official one writes ``true``/``false`` and ``str(int)``); ``null`` or an empty value means absent."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text in ("", "null"):
        return None
    try:
        if name in _INTEGER_FIELDS:
            try:
                return int(text)
            except ValueError:
                number = float(text)  # "1.0", "1e2": integers as JSON Schema counts them
                if not number.is_integer():
                    raise
                return int(number)
        if name in _NUMBER_FIELDS:
            v = float(text)
            if v != v or v in (float("inf"), float("-inf")):
                raise ValueError
            return v
    except ValueError:
        kind = "an integer" if name in _INTEGER_FIELDS else "a number"
        raise InvalidRequestError(f"{name} must be {kind}, got {shown(value)}", param=name) from None
    if name in _JSON_FIELDS:
        try:
            return json.loads(text)
        except RecursionError:
            raise InvalidRequestError(f"{name} is nested too deeply (send a flat list of {{\"name\", \"scale\"}} "
                                      f"objects)", param=name) from None
        except ValueError:
            raise InvalidRequestError(f"{name} must be JSON (e.g. [{{\"name\": \"style\", \"scale\": 0.8}}]), "
                                      f"got {shown(value)}", param=name) from None
    if name in _BOOLEAN_FIELDS:
        if text.lower() not in ("true", "false"):
            raise InvalidRequestError(f"{name} must be true or false, got {shown(value)}", param=name)
        return text.lower() == "true"
    return value


JSON_EDIT_FIELDS = ("images", "mask", "prompt", "model", "n", "quality", "input_fidelity", "size", "user",
                    "output_format", "output_compression", "moderation", "background", "stream", "partial_images")


def parse_json_edit(payload, config: Config, max_side: int | None = None, known_loras=None) -> ImageCall:
    """The spec's JSON form of an edit (``EditImageBodyJsonParam``): ``images`` (1-16 ``{"image_url"}``) and
    ``mask`` as base64 ``data:`` URLs (``file_id`` and network URLs are refused: the Files API holds batch input
    only, and nothing is fetched), the other fields as in multipart (plus ``moderation``, accepted as for
    generations), JSON-typed."""
    fields, files = json_edit_parts(payload)
    return parse_edit(fields, files, config, max_side, typed=True, image_param="images", known_loras=known_loras)


def json_edit_parts(payload) -> tuple[dict, dict]:
    """A JSON edit -> (its typed fields, ``{"image": [bytes, ...], "mask": bytes | None}``): what ``parse_edit``
    takes with ``typed=True``; the images' base64 decoded, nothing else."""
    from .image_input import MAX_IMAGES, data_url_bytes

    if not isinstance(payload, dict):
        raise InvalidRequestError("request body must be a JSON object")
    if "image" in payload:
        raise InvalidRequestError("a JSON edit sends its images in `images` (a list of {\"image_url\": "
                                  "\"data:...\"}); `image` is the multipart field", param="image")
    images = payload.get("images")
    if not isinstance(images, list) or not images:
        raise InvalidRequestError("images is required: a list of 1 to 16 {\"image_url\": \"data:image/png;base64,"
                                  "...\"}", param="images")
    if len(images) > MAX_IMAGES:
        raise InvalidRequestError(f"{len(images)} images sent; at most {MAX_IMAGES}", param="images")
    files = {"image": [data_url_bytes(ref, "images") for ref in images],
             "mask": None if payload.get("mask") is None else data_url_bytes(payload["mask"], "mask")}
    return {k: v for k, v in payload.items() if k not in ("images", "mask")}, files


def parse_edit(fields: dict, files: dict, config: Config, max_side: int | None = None, typed: bool = False,
               image_param: str = "image", known_loras=None) -> ImageCall:
    """Validate an edit: ``fields`` the multipart text fields (name -> text, or a typed value from the Python
    API), ``files`` ``{"image": [bytes, ...], "mask": bytes | None}``. What each field of OpenAI's
    ``CreateImageEditRequest`` and each extension (``strength``, and those of generations) does here:
    docs/conditioning.md, "Fields"; the image rules are ``orchestrator/image_input.py``'s."""
    from .image_input import control_bytes, prepare_edit

    accepted = EDIT_ACCEPTED | {"moderation"} if typed else EDIT_ACCEPTED
    unknown = sorted(k for k in list(fields) + [k for k in files if files[k] is not None] if k not in accepted)
    if unknown:
        raise InvalidRequestError(f"unknown field(s) {', '.join(shown(k, 40) for k in unknown[:5])}; accepted: "
                                  f"{sorted(accepted)}", param=shown(unknown[0], 40).strip("'\""))
    for name in _FILE_FIELDS:
        if name in fields and fields[name] not in (None, ""):
            raise InvalidRequestError(f"{name} must be sent as a file (multipart/form-data), not as text",
                                      param=name)
    as_file = sorted(k for k, v in files.items() if v is not None and k not in (*_FILE_FIELDS, "control_image"))
    if as_file:  # a text field sent as a file part: never dropped silently
        raise InvalidRequestError(f"{shown(as_file[0], 40)} must be sent as a text field, not as a file",
                                  param=shown(as_file[0], 40).strip("'\""))
    payload = integral({k: v if typed else _form_value(k, v) for k, v in fields.items() if k not in _FILE_FIELDS})
    if files.get("control_image") is not None:  # a multipart file: parse_generation attaches it
        payload["control_image"] = files["control_image"]
    others = []
    if payload.get("control_image") is not None and config.model.controlnet is not None:
        payload["control_image"] = control_bytes(payload["control_image"])  # base64 decoded once
        others.append(("control_image", payload["control_image"]))  # counted in the request's input pixels
    images = files.get("image") or []
    if not images:
        raise InvalidRequestError(f"{image_param} is required: send an image file", param=image_param)
    if len(images) > 1:
        raise InvalidRequestError(
            f"{len(images)} images sent; this server edits one input image per call (in OpenAI's API several images "
            f"are the inputs of one composite edit, which Z-Image does not make): send one image, and n for several "
            f"results", param=image_param)
    # the edit schemas' own quality values: no "hd" (a dall-e-3 generation value); the JSON body has no "standard"
    _enum(payload, "quality", ("low", "medium", "high", "auto") if typed else ("standard", "low", "medium", "high",
                                                                                "auto"), "auto")
    _enum(payload, "input_fidelity", ("high", "low"), "low", why={
        "high": "input_fidelity 'high' is not implemented here; use strength (0 to 1: lower keeps more of the input "
                "image, the default is defaults.strength) to control how closely the edit follows its input"})
    strength = payload.pop("strength", None)
    payload.pop("input_fidelity", None)
    if strength is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float))
                                 or not 0.0 <= strength <= 1.0):
        raise InvalidRequestError(f"strength must be a number from 0 to 1, got {shown(strength)}", param="strength")
    size = None  # an explicit size is validated before any image is decoded (the control image once, below)
    if payload.get("size") not in (None, "auto"):
        r0 = parse_generation({k: v for k, v in payload.items() if k not in _CONTROL_FIELDS}, config, max_side,
                              known_loras).requests[0]
        size = (r0.width, r0.height)
    inputs = prepare_edit(images, files.get("mask"), size, config.limits, max_side, image_param, others)
    if size is None:
        payload["size"] = f"{inputs.width}x{inputs.height}"
    call = parse_generation(payload, config, max_side, known_loras)
    requests = []
    for r in call.requests:
        mask = inputs.mask
        s = strength if strength is not None else (config.defaults.inpaint_strength if mask is not None
                                                   else config.defaults.strength)
        if steps_run(r.num_inference_steps, s) < 1:
            raise InvalidRequestError(f"strength {s} with {r.num_inference_steps} steps runs no denoising step; "
                                      f"raise strength or num_inference_steps", param="strength")
        requests.append(replace(r, image=inputs.images[0], mask=mask, strength=float(s)))
    tokens = (inputs.width // 16) * (inputs.height // 16)
    return replace(call, requests=requests, event_type="image_edit", input_image_tokens=tokens)


# ---- response shapes ----------------------------------------------------------------------
def size_label(width: int, height: int) -> str | None:
    label = f"{width}x{height}"
    return label if label in SPEC_SIZES else None


def usage(results: list[ImageResult], input_image_tokens: int = 0) -> dict | None:
    """Token usage as the spec counts it: input = the prompt's text tokens as the text encoder saw them (chat
    template included, negative prompt added when guidance uses it), counted once per call; output = image
    tokens generated, (H/16) x (W/16) per image. None when a replica did not report its counts."""
    if not results or any(r.prompt_tokens is None or r.image_tokens is None for r in results):
        return None
    text = results[0].prompt_tokens
    image = sum(r.image_tokens for r in results)
    inputs = text + input_image_tokens
    return {"input_tokens": inputs, "output_tokens": image, "total_tokens": inputs + image,
            "input_tokens_details": {"text_tokens": text, "image_tokens": input_image_tokens},
            "output_tokens_details": {"image_tokens": image, "text_tokens": 0}}


def images_response(call: ImageCall, results: list[ImageResult], b64: list[str], created: int) -> dict:
    """The ``ImagesResponse`` body: spec fields only (``revised_prompt`` is left out, not null), ``seed`` per
    image as an extra field. ``b64``: each image's base64 text, or its link when the call asked for ``url``."""
    body: dict = {"created": created,
                  "data": [{call.response_format: b, "seed": r.seed} for b, r in zip(b64, results)],
                  "background": "opaque", "output_format": call.output_format}
    first = results[0]
    if (label := size_label(first.width, first.height)) is not None:
        body["size"] = label
    if call.quality in ("low", "medium", "high"):
        body["quality"] = call.quality
    if (u := usage(results, call.input_image_tokens)) is not None:
        body["usage"] = u
    return body


def _event_common(call: ImageCall, result_or_request, created: int) -> dict:
    r = result_or_request
    return {"created_at": created, "size": size_label(r.width, r.height) or "auto", "quality": call.quality,
            "background": "opaque", "output_format": call.output_format}


def partial_image_event(call: ImageCall, index: int, request: ImageRequest, partial_index: int, b64: str,
                        created: int) -> dict:
    return {"type": f"{call.event_type}.partial_image", "b64_json": b64, **_event_common(call, request, created),
            "partial_image_index": partial_index, "index": index, "width": request.width, "height": request.height}


def completed_event(call: ImageCall, index: int, result: ImageResult, b64: str, created: int,
                    url: str | None = None) -> dict:
    """The spec's completed event: ``b64_json`` is required, so a ``response_format: url`` call gets its link as
    the extra field ``url`` beside it."""
    zero = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
            "input_tokens_details": {"text_tokens": 0, "image_tokens": 0}}
    return {"type": f"{call.event_type}.completed", "b64_json": b64, **_event_common(call, result, created),
            "usage": usage([result], call.input_image_tokens) or zero, "index": index, "seed": result.seed,
            "width": result.width, "height": result.height, **({"url": url} if url is not None else {})}
