"""The Z-Image-Turbo computation, stage by stage, with each component on its own device, for batches that mix
image sizes, caption lengths and guidance scales.

This mirrors ``diffusers.ZImagePipeline.__call__`` (diffusers 0.42: tokenize with the chat template ->
``hidden_states[-2]`` masked -> flow-matching Euler loop with the image-size-dependent shift ``mu`` ->
``latents / scaling + shift`` -> VAE decode) with three differences of structure, none of math:

- the stages are separate calls (a split placement puts the text encoder, transformer and VAE on different
  GPUs; stage pipelining overlaps stages of consecutive batches);
- a batch is a list of samples, each with its own size, seed, guidance and negative prompt: the transformer runs
  once per step on all of them packed into one sequence (``actors/packed.py``), each sample with its own sigma
  schedule (``mu`` depends on its token count) and its own timestep;
- the VAE decodes one image at a time (its activations dominate a replica's peak memory; per image they no longer
  grow with the batch).

``tests/test_engine.py`` checks it against ``ZImagePipeline`` itself: bit for bit on a single-size batch, and each
sample of a mixed batch against its solo run.

Noise is drawn per request on the CPU from the request's own seed, so an image depends only on its own request:
not on its batch-mates, and not on which replica or device ran it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

from zimage_common.messages import StageTimes

from .conditioning import Conditioning, encode_conditions, encode_controls
from .controlnet import PackedControl, forward
from .packed import PackedTransformer
from .stages import run_here

log = logging.getLogger(__name__)



def _sync(device: torch.device) -> None:
    """Wait for this thread's current stream on ``device`` only: stages of other batches may be running on
    other streams of the same GPU, and a device-wide synchronize would wait for them too."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def velocity(out: list[torch.Tensor], j: int, guidance: float, negative: int | None) -> torch.Tensor:
    """Sample ``j``'s velocity for the scheduler from a packed call's outputs ``out``: with guidance, combined with
    its negative pass's output (``out[negative]``), as diffusers' pipeline does; ``[C, h, w]`` float32."""
    pred = out[j].float()
    if guidance > 0:
        pred = pred + guidance * (pred - out[negative].float())
    return -pred.squeeze(1)


def _clean_estimates(latents: list[torch.Tensor], velocities: list[torch.Tensor], sigmas_next: list[torch.Tensor]):
    """The flow-matching estimate of each sample's clean latents after a step, as a thunk: x_sigma = x0 + sigma * v
    with v = noise - x0 (what the Euler step integrates), so x0 = x_next - sigma_next * v (exact at the last step,
    where sigma_next = 0)."""
    return lambda: [lat - s.to(lat.device, torch.float32) * v for lat, v, s in zip(latents, velocities, sigmas_next)]


def has_images(samples) -> bool:
    """Whether any sample has an input image (an edit) or a control image: the call has an image-encode stage."""
    return any(s.image is not None or s.control_image is not None for s in samples)


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    module = module.to(device)
    if next(module.parameters()).dtype != dtype:  # loaded weights already come in the right dtype
        module = module.to(dtype)
    return module


@dataclass(frozen=True)
class Sample:
    """One image of a batch."""

    prompt: str
    seed: int
    width: int
    height: int
    guidance_scale: float = 0.0
    negative_prompt: str | None = None
    loras: tuple[tuple[str, float], ...] = ()  # (adapter name, scale): per-request LoRA (actors/lora.py)
    # [conditioning] img2img / inpainting (actors/conditioning.py): the input image, uint8 [H, W, 3] at this size;
    # the mask, uint8 [H, W], nonzero = repaint; the sample's own schedule length (it runs the last
    # steps_run(num_inference_steps, strength) steps of it).
    image: Any = field(default=None, compare=False, repr=False)
    mask: Any = field(default=None, compare=False, repr=False)
    strength: float = 1.0
    num_inference_steps: int | None = None
    # [controlnet] the control image, uint8 [H, W, 3] at this size, and its conditioning scale (actors/controlnet.py)
    control_image: Any = field(default=None, compare=False, repr=False)
    control_scale: float = 0.75


@dataclass
class EncodedPrompts:
    positive: list[torch.Tensor]  # one per sample
    negative: list[torch.Tensor]  # one per sample with guidance > 0, in sample order


class ZImageEngine:
    """Holds the components and runs encode / denoise / decode. Not thread-safe per stage: callers run at most
    one call of each stage at a time (stages on different devices may run concurrently)."""

    def __init__(self, components: dict, devices: dict[str, str], dtype: torch.dtype, remote_encode=None):
        """``devices`` maps each component this engine holds to its device. Without a text encoder, the encode
        stage calls ``remote_encode(prompts, negative_prompts, guidance)`` (another replica's encoder)."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.image_processor import VaeImageProcessor

        self.devices = {k: torch.device(v) for k, v in devices.items()}
        self.dtype = dtype
        self.remote_encode = remote_encode
        self.tokenizer = components.get("tokenizer")
        self.text_encoder = None
        if "text_encoder" in devices:
            self.text_encoder = _place(components["text_encoder"], self.devices["text_encoder"], dtype)
        elif remote_encode is None:
            raise ValueError("an engine without a text encoder needs remote_encode")
        self.transformer = _place(components["transformer"], self.devices["transformer"], dtype)
        self.packed = PackedTransformer(self.transformer)
        self.loras = None  # an ``actors.lora.LoraStore`` once the replica enables per-request LoRA
        self.vae = _place(components["vae"], self.devices["vae"], dtype)
        self.controlnet = None  # [controlnet] beside the transformer, sharing its embedders and refiners
        if components.get("controlnet") is not None:
            self.controlnet = _place(components["controlnet"], self.devices["transformer"], dtype)
        self._scheduler_config = components["scheduler"].config
        self._scheduler_cls = FlowMatchEulerDiscreteScheduler
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE downsampling x the transformer's 2x2 patches)."""
        return self.vae_scale_factor * 2

    # ---- stage 1: text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], negative_prompts: Sequence[str | None] | None = None,
        guidance: float | Sequence[float] = 0.0, max_sequence_length: int = 512,
    ) -> EncodedPrompts:
        """Caption embeddings of every prompt, and of the negative prompt (``""`` when none) of every sample whose
        guidance is above 0, in one text-encoder call."""
        n = len(prompts)
        guidance = [float(guidance)] * n if isinstance(guidance, (int, float)) else [float(g) for g in guidance]
        if self.text_encoder is None:
            return self.remote_encode(list(prompts), list(negative_prompts or [None] * n), guidance)
        negs = list(negative_prompts or [None] * n)
        cfg = [i for i, g in enumerate(guidance) if g > 0]
        out = self._encode(list(prompts) + [negs[i] or "" for i in cfg], max_sequence_length)
        return EncodedPrompts(out[:n], out[n:])

    def _encode(self, prompts: list[str], max_sequence_length: int) -> list[torch.Tensor]:
        device = self.devices["text_encoder"]
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            for p in prompts
        ]
        # Right padding to the longest prompt, not to max_sequence_length as diffusers does: the encoder is causal,
        # so a token's hidden state does not depend on the padding after it, and short prompts cost less.
        inputs = self.tokenizer(
            texts, padding="longest", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        )
        ids = inputs.input_ids.to(device)
        mask = inputs.attention_mask.to(device).bool()
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return [hidden[i][mask[i]] for i in range(len(hidden))]

    @torch.no_grad()
    def prewarm_encoder(self, shapes: Sequence[tuple[int, int]]) -> list[tuple[int, int, float]]:
        """Run the text encoder once at each ``(prompts, padded length)`` of ``shapes``, on synthetic token ids
        right-padded as ``_encode`` pads captions of different lengths (the first row full, the others shorter;
        one prompt alone has no padding, as in serving), so what long and padded captions need the first time is
        loaded at warm-up, not in the serving path. On a fresh H100 the first batch of long prompts after ready
        encoded in 0.75-1.2 s, against 0.1-0.16 s on a machine that had run it before; with this warm-up, its
        first encodes took 0.8-1.8 s each on a fresh H100 and that batch 0.05-0.06 s (docs/benchmarks-history.md).
        Returns ``(prompts, length, seconds)`` per shape; nothing without a text encoder of its own."""
        if self.text_encoder is None:
            return []
        device = self.devices["text_encoder"]
        vocab = int(getattr(self.text_encoder.config, "vocab_size", 0) or len(self.tokenizer))
        g = torch.Generator("cpu").manual_seed(0)
        out = []
        for b, n in shapes:
            t0 = time.perf_counter()
            ids = torch.randint(0, vocab, (b, n), generator=g)
            lengths = torch.tensor([n - (i * n) // (2 * b) for i in range(b)])  # row i keeps n - i*n/(2b) tokens
            mask = torch.arange(n)[None, :] < lengths[:, None]
            self.text_encoder(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
            _sync(device)
            out.append((b, n, time.perf_counter() - t0))
        return out

    # ---- stage 2: denoise ------------------------------------------------------------------------------
    def lora_batch(self, per_sample: list):
        """The per-request LoRA of a packed call (``LoraStore.batch``), per sample in the call's order."""
        if self.loras is None:
            raise ValueError("this replica has per-request LoRA off (model.lora_max_resident is 0)")
        return self.loras.batch(per_sample)

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        return 2 * (int(height) // self.size_multiple), 2 * (int(width) // self.size_multiple)

    def initial_latents(self, samples: Sequence[Sample]) -> list[torch.Tensor]:
        """Per sample ``[16, h, w]`` float32 noise from its own seed (drawn on the CPU, as diffusers' pipeline
        does with a CPU generator), on the transformer's device."""
        out = []
        for s in samples:
            h, w = self.latent_size(s.height, s.width)
            g = torch.Generator("cpu").manual_seed(int(s.seed))
            channels = self.transformer.config.in_channels
            out.append(torch.randn((1, channels, h, w), generator=g, dtype=torch.float32)[0])
        return [x.to(self.devices["transformer"]) for x in out]

    def _schedulers(self, latents: list[torch.Tensor], num_inference_steps: int, device,
                    conditions: Sequence[Conditioning | None] | None = None):
        """One flow-matching scheduler per sample: its ``mu`` depends on its own image token count. A conditioned
        sample's scheduler has its own length and begins at its start step."""
        out = []
        for j, lat in enumerate(latents):
            cond = conditions[j] if conditions else None
            sigmas = get_default_z_image_sigmas(cond.num_inference_steps if cond else num_inference_steps)
            scheduler = self._scheduler_cls.from_config(self._scheduler_config)
            cfg = scheduler.config
            mu = calculate_shift(
                (lat.shape[-2] // 2) * (lat.shape[-1] // 2), cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15),
            )
            scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
            scheduler.set_begin_index(cond.start if cond else 0)
            out.append(scheduler)
        return out

    @torch.no_grad()
    def denoise(
        self,
        prompts: EncodedPrompts,
        latents: list[torch.Tensor],
        num_inference_steps: int,
        guidance: float | Sequence[float] = 0.0,
        on_step: Callable[[int, int, Callable[[], list[torch.Tensor]]], None] | None = None,
        conditions: Sequence[Conditioning | None] | None = None,
        controls: Sequence[torch.Tensor | None] | None = None,
        control_scales: Sequence[float] | None = None,
        loras: Sequence[Sequence[tuple[str, float]]] | None = None,
    ) -> list[torch.Tensor]:
        """The Euler loop over a packed batch. ``latents``: per sample ``[16, h, w]`` float32 (sizes may differ);
        ``guidance`` per sample (a sample with guidance > 0 runs a second, negative-caption pass, as diffusers
        does). Returns the final latents per sample. ``on_step(step, total, denoised)`` runs after every step;
        ``denoised()`` computes each sample's current estimate of its clean latents (for previews and per-sample
        checks; nothing is computed unless it is called). ``conditions`` (per sample, None for a plain one; from
        ``encode_conditions``): a conditioned sample starts from its noised input image at its own start step and is
        blended with its input after each step (inpainting). ``controls`` (per sample, None without; from
        ``encode_controls``) and ``control_scales``: ControlNet inputs, the negative pass with the same ones.
        ``loras``: per sample its ``(adapter, scale)`` list (``self.loras`` holds the adapters); a sample's negative
        pass uses its adapters too, as diffusers does."""
        device = self.devices["transformer"]
        n = len(latents)
        guidance = [float(guidance)] * n if isinstance(guidance, (int, float)) else [float(g) for g in guidance]
        cfg = [i for i, g in enumerate(guidance) if g > 0]
        if len(prompts.negative) != len(cfg):
            raise ValueError(f"{len(cfg)} samples use guidance but {len(prompts.negative)} negative captions came")
        embeds = [p.to(device, non_blocking=True) for p in prompts.positive + prompts.negative]
        latents = [lat.to(device) for lat in latents]
        shapes = [(1, lat.shape[-2], lat.shape[-1]) for lat in latents]
        layout = self.packed.layout(shapes + [shapes[i] for i in cfg], [len(e) for e in embeds])
        conditions = list(conditions) if conditions else None  # moved to the device below
        schedulers = self._schedulers(latents, num_inference_steps, device, conditions)
        # [conditioning] per-sample start offset: a conditioned sample runs its schedule from its start step, from
        # its noised input image (actors/conditioning.py).
        starts = [c.start if c is not None else 0 for c in (conditions or [None] * n)]
        timesteps = torch.stack([s.timesteps[b:b + num_inference_steps] for s, b in zip(schedulers, starts)])
        if timesteps.shape[1] != num_inference_steps:
            raise ValueError("every sample of a batch must run the same number of steps")
        for j, c in enumerate(conditions or ()):
            if c is not None:
                c = c.to(device)
                conditions[j] = c
                latents[j] = c.initial_latents(schedulers[j])
        order = list(range(n)) + cfg
        if loras is not None and any(loras):
            layout.lora = self.lora_batch([loras[j] for j in order])
        negative_of = {j: n + k for k, j in enumerate(cfg)}  # sample -> its negative pass's output
        dtype = self.transformer.dtype
        control = None
        if controls:  # [controlnet] per sample in the call's order
            control = PackedControl.build(self.controlnet, [controls[j] for j in order],
                                          [control_scales[j] for j in order],
                                          [latents[j].shape[-2:] for j in order], device, dtype)
        for i in range(num_inference_steps):
            t = timesteps[:, i]
            t_in = ((1000 - t) / 1000)[order] if cfg else (1000 - t) / 1000
            x = [latents[j].to(dtype).unsqueeze(1) for j in order]
            out = forward(self.packed, x, t_in, embeds, layout, control)
            preds = []
            for j in range(n):
                pred = velocity(out, j, guidance[j], negative_of.get(j))
                preds.append(pred)
                latents[j] = schedulers[j].step(pred.unsqueeze(0), timesteps[j, i], latents[j].unsqueeze(0),
                                                return_dict=False)[0][0]
                if conditions and conditions[j] is not None:  # [conditioning] per-sample after-step hook
                    nxt = timesteps[j, i + 1] if i + 1 < num_inference_steps else None
                    latents[j] = conditions[j].after_step(schedulers[j], latents[j], nxt)
            if on_step is not None:
                on_step(i + 1, num_inference_steps,
                        _clean_estimates(list(latents), preds, [s.sigmas[s.step_index] for s in schedulers]))
        return latents

    # ---- stage 3: decode -------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """Per sample latents ``[16, h, w]`` -> uint8 images ``[H, W, 3]``, one VAE call per image."""
        return [self.decode_one(lat) for lat in latents]

    def decode_one(self, latent: torch.Tensor) -> np.ndarray:
        lat = latent.unsqueeze(0).to(self.devices["vae"], self.vae.dtype)
        lat = lat / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(lat, return_dict=False)[0]
        arr = self.image_processor.postprocess(image, output_type="np")
        return (arr * 255).round().clip(0, 255).astype(np.uint8)[0]

    # ---- the stages of one call, each timed and finished on its device (whole batches and the step loop's calls)
    def encode_stage(self, samples: Sequence[Sample]) -> tuple[EncodedPrompts, float]:
        t0 = time.perf_counter()
        enc = self.encode([s.prompt for s in samples], [s.negative_prompt for s in samples],
                          [s.guidance_scale for s in samples])
        if self.text_encoder is not None:
            _sync(self.devices["text_encoder"])
        return enc, time.perf_counter() - t0

    def encode_images_stage(self, samples: Sequence[Sample], num_inference_steps: int) -> tuple[list, list, float]:
        """Edits' and ControlNet's input images through the VAE: per sample its ``Conditioning`` and control
        latents (None where it has none)."""
        t0 = time.perf_counter()
        conditions = encode_conditions(self, samples, num_inference_steps)
        controls = encode_controls(self, samples)
        _sync(self.devices["vae"])
        return conditions, controls, time.perf_counter() - t0

    def decode_stage(self, latents: Sequence[torch.Tensor]) -> tuple[list[np.ndarray], float]:
        t0 = time.perf_counter()
        return self.decode(latents), time.perf_counter() - t0

    # ---- all three -------------------------------------------------------------------------------------
    def generate(
        self,
        samples: Sequence[Sample],
        num_inference_steps: int,
        on_step: Callable[[int, int, Callable[[], list[torch.Tensor]]], None] | None = None,
        stage_run: Callable[..., Any] | None = None,
    ) -> tuple[list[np.ndarray], StageTimes]:
        """One pipeline call for a batch: returns a uint8 image ``[H, W, 3]`` per sample (each of its own size)
        and the stage times (compute time of each stage; waiting for a stage's thread is not counted).
        ``stage_run(stage, fn)`` runs each of "encode", "denoise", "decode" (``actors/stages.py``): the worker runs
        each stage on its own long-lived thread, with the stage's CUDA stream when stages are pipelined. Each stage
        ends by waiting for its own stream, so the next stage, on another stream or device, reads finished
        tensors."""
        for s in samples:
            self.check_size(s.height, s.width)
        run = stage_run or run_here
        guidance = [s.guidance_scale for s in samples]

        def denoise(enc, conditions, controls):
            t0 = time.perf_counter()
            latents = self.denoise(enc, self.initial_latents(samples), num_inference_steps, guidance, on_step,
                                   conditions, controls, [s.control_scale for s in samples],
                                   [s.loras for s in samples] if any(s.loras for s in samples) else None)
            _sync(self.devices["transformer"])
            return latents, time.perf_counter() - t0

        enc, encode_s = run("encode", self.encode_stage, samples)
        conditions, controls, image_encode_s = None, None, 0.0
        if has_images(samples):
            # [conditioning] the input images' VAE encode: its own stage, on the VAE's stage (the decode
            # stage's thread and stream), off the denoise path.
            conditions, controls, image_encode_s = run("decode", self.encode_images_stage, samples,
                                                       num_inference_steps)
        latents, denoise_s = run("denoise", denoise, enc, conditions, controls)
        del enc
        images, decode_s = run("decode", self.decode_stage, latents)
        return images, StageTimes(encode_s=encode_s, denoise_s=denoise_s, decode_s=decode_s,
                                  total_s=encode_s + image_encode_s + denoise_s + decode_s,
                                  image_encode_s=image_encode_s)

    def check_size(self, height: int, width: int) -> None:
        multiple = self.size_multiple
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple} (got {v})")
