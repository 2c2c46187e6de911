"""Per-request checks and the per-step hook: what keeps one request's trouble away from its batch-mates. What can be
attributed to one request is checked per request before its call runs (``screen``: the prompt through the tokenizer
on its own, the size against the transformer's position table); what can only be seen while it runs is checked per
sample (``StepHook``: non-finite latents at the last step); what still fails a whole call is bisected by the router.
``StepHook`` also decodes a streaming request's previews (``partial_images``) from the clean-latent estimate."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from zimage_common.messages import Batch, ImageRequest, StepProgress

MAX_SEQUENCE_LENGTH = 512  # what the engine pads and truncates captions to (ZImagePipeline's default)


class InputError(ValueError):
    """One request's own input cannot be run; ``param`` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def image_token_side(engine) -> int:
    """Pixels per image token along each side: the VAE's downsampling times the transformer's patch size (2)."""
    return engine.vae_scale_factor * 2


def max_image_side(engine) -> int:
    """The longest side, in pixels, the transformer can place: its RoPE position table (``axes_lens``) has one
    entry per image token along height (axis 1) and width (axis 2); a longer side indexes past the table."""
    lens = list(getattr(engine.transformer.config, "axes_lens", None) or [])
    if len(lens) < 3:
        return 0
    return min(int(lens[1]), int(lens[2])) * image_token_side(engine)


def validate_prompt(tokenizer, prompt, param: str = "prompt",
                    max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> int | None:
    """Check that ``prompt`` can be encoded on its own, as the engine will (chat template, then the tokenizer),
    and return how many tokens the text encoder will see (``None`` without a tokenizer). Raises ``InputError``."""
    if not isinstance(prompt, str):
        raise InputError(f"{param} must be a string", param)
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{param} is not valid Unicode text: it holds a lone surrogate (U+{ord(prompt[e.start]):04X}) "
                         f"at character {e.start}; send UTF-8 text", param) from None
    if tokenizer is None:
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=True)
        ids = tokenizer(text, truncation=True, max_length=max_sequence_length)["input_ids"]
    except Exception:  # noqa: BLE001 - whatever the tokenizer refuses is this prompt's own fault
        raise InputError(f"the model's tokenizer cannot encode this {param}", param) from None
    return len(ids)


@dataclass
class Screened:
    runnable: tuple[ImageRequest, ...]
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # request_id -> (message, param)
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    image_tokens: dict[str, int] = field(default_factory=dict)


def size_error(engine, width: int, height: int) -> str | None:
    """Why the model cannot make a ``width`` x ``height`` image, or None."""
    unit = image_token_side(engine)
    limit = max_image_side(engine)
    if width <= 0 or height <= 0 or width % unit or height % unit:
        return f"width and height must be positive multiples of {unit} (got {width}x{height})"
    if limit and max(width, height) > limit:
        return f"size {width}x{height}: the model places at most {limit} pixels per side (its position table)"
    return None


def edit_error(r: ImageRequest) -> tuple[str, str] | None:
    """Why an edit's image or mask cannot run at its size, as (message, param), or None. (The HTTP layer and the
    Python API send arrays of the request's size; this catches a request built by hand.)"""
    import numpy as np

    for name, shape in (("control_image", (r.height, r.width, 3)), ("image", (r.height, r.width, 3)),
                        ("mask", (r.height, r.width))):
        a = getattr(r, name)
        if a is None:
            continue
        if name == "mask" and r.image is None:
            return "a mask needs an image", "mask"
        a = np.asarray(a)
        if a.dtype != np.uint8 or a.shape != shape:
            size = " (the request's size)" if name == "image" else ""
            want = ", ".join(str(int(n)) for n in shape)
            return f"{name} must be uint8 [{want}]{size}, got {a.dtype} {list(a.shape)}", name
    if r.image is not None and (not 0.0 <= r.strength <= 1.0 or r.steps_run < 1):
        return f"strength {r.strength} with {r.num_inference_steps} steps runs no step", "strength"
    return None


def lora_error(engine, loras) -> str | None:
    """Why this replica cannot apply ``loras`` (names it does not hold), or None."""
    store = getattr(engine, "loras", None)
    missing = sorted({n for n, _ in loras if store is None or n not in store})
    if not missing:
        return None
    return (f"LoRA adapter(s) {', '.join(repr(n) for n in missing)} not registered on this replica "
            f"(GET /v1/loras lists them)")


def screen(engine, batch: Batch) -> Screened:
    """Validate each request of ``batch`` on its own: its size, its prompt (and negative prompt when its guidance
    uses one) through the tokenizer."""
    out = Screened(runnable=())
    unit = image_token_side(engine)
    runnable = []
    for r in batch.requests:
        if (why := size_error(engine, r.width, r.height)) is not None:
            out.failed[r.request_id] = (why, "size")
            continue
        if (why := edit_error(r)) is not None:
            out.failed[r.request_id] = why
            continue
        if r.control_image is not None and getattr(engine, "controlnet", None) is None:
            out.failed[r.request_id] = ("this replica has no ControlNet (model.controlnet)", "control_image")
            continue
        if r.loras and (why := lora_error(engine, r.loras)) is not None:
            out.failed[r.request_id] = (why, "loras")
            continue
        try:
            tokens = validate_prompt(engine.tokenizer, r.prompt, "prompt")
            if r.guidance_scale > 0:  # the negative pass encodes "" when there is none (as diffusers does)
                neg = validate_prompt(engine.tokenizer, r.negative_prompt or "", "negative_prompt")
                tokens = None if tokens is None or neg is None else tokens + neg
        except InputError as e:
            out.failed[r.request_id] = (str(e), e.param)
            continue
        if tokens is not None:
            out.prompt_tokens[r.request_id] = tokens
        out.image_tokens[r.request_id] = (r.width // unit) * (r.height // unit)
        runnable.append(r)
    out.runnable = tuple(runnable)
    return out


def preview_steps(total_steps: int, partial_images: int) -> list[int]:
    """The denoising steps after which a request's previews are decoded: ``partial_images`` steps spread evenly
    over the run, never the last (that is the final image). Fewer when there are too few steps (the spec allows
    the final image to come before all partial images)."""
    steps = []
    for j in range(1, partial_images + 1):
        s = int(j * total_steps / (partial_images + 1) + 0.5)
        if 1 <= s < total_steps and s not in steps:
            steps.append(s)
    return steps


class StepHook:
    """The engine's ``on_step(step, total, denoised)`` for one batch: emits progress (with previews) to ``emit``
    and records which samples ended non-finite. ``denoised()`` returns the engine's current estimate of each
    sample's clean latents (``[C, h, w]`` each, sizes may differ; exact at the last step); it is only computed
    when a preview or the final check needs it."""

    def __init__(self, engine, batch: Batch, emit: Callable[[StepProgress], None] | None = None,
                 decode: Callable[..., list] | None = None):
        self.engine = engine
        self.batch = batch
        self.emit = emit
        # previews' decode ``decode(latents, ready)``: the worker's runs it on its decode stage's thread
        # (``actors/stages.py``)
        self.decode = decode or (engine.decode if engine is not None else None)
        self.nonfinite: set[str] = set()
        self.preview_s = 0.0  # time spent decoding previews (reported in the log)
        self._plan: dict[int, list[tuple[int, str, int]]] = {}  # step -> [(row, request_id, partial_index)]
        if emit is not None:
            for row, r in enumerate(batch.requests):
                for k, s in enumerate(preview_steps(batch.key.num_inference_steps, r.partial_images)):
                    self._plan.setdefault(s, []).append((row, r.request_id, k))

    def __call__(self, step: int, total: int, denoised: Callable | None = None, stamp: tuple = (),
                 ready=None) -> None:
        """``stamp``: the loop's (step, running, joined) counts of this step, for the event; ``ready``: a
        ``devices.mark`` of the loop's stream once the estimates are made (the check and previews wait for it, not
        for the steps launched since)."""
        import time

        import torch

        previews: tuple = ()
        estimates = None
        if step == total and denoised is not None:
            estimates = denoised()
            reading = getattr(self.engine, "reading", None)
            with reading(ready) if reading is not None else contextlib.nullcontext():
                ok = [bool(torch.isfinite(x).all()) for x in estimates]
            self.nonfinite = {r.request_id for r, good in zip(self.batch.requests, ok) if not good}
        wanted = self._plan.get(step)
        if wanted and denoised is not None:
            t0 = time.perf_counter()
            estimates = denoised() if estimates is None else estimates
            images = self.decode([estimates[row] for row, _, _ in wanted], ready)
            previews = tuple((rid, k, img) for (_, rid, k), img in zip(wanted, images))
            self.preview_s += time.perf_counter() - t0
        if self.emit is not None:
            self.emit(StepProgress(self.batch.batch_id, step, total, previews, *stamp))
