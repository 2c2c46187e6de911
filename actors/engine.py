"""The Z-Image-Turbo computation, stage by stage, with each component on its own device.

``ZImagePipeline.__call__`` runs everything on one execution device. A split placement needs the three stages
apart (text encoder on one GPU, transformer on another, VAE on a third), and stage overlap needs to call them
separately, so this module runs the same steps as the diffusers pipeline (tokenize with the chat template ->
``hidden_states[-2]`` masked -> flow-matching Euler loop -> ``latents / scaling + shift`` -> VAE decode) and moves
prompt embeddings and latents between devices. ``tests/test_engine.py`` checks it against ``ZImagePipeline``
itself, output for output.

Noise is drawn per request on the CPU from the request's own seed, so an image depends only on its own request:
not on its batch-mates, and not on which replica or device ran it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from orchestrator.messages import StageTimes

log = logging.getLogger(__name__)

LATENT_CHANNELS = 16
SEQ_MULTI_OF = 32  # the transformer pads captions (and image tokens) to a multiple of this many tokens


def _calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def _sync(device: torch.device) -> None:
    """Wait for this thread's current stream on ``device`` only: stages of other batches may be running on
    other streams of the same GPU, and a device-wide synchronize would wait for them too."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def caption_groups(embeds: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of the samples, grouped by the length their caption pads to (the transformer's SEQ_MULTI_OF)."""
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(embeds):
        groups.setdefault(-(-e.shape[0] // SEQ_MULTI_OF), []).append(i)
    return list(groups.values())


def _clean_estimate(latents: torch.Tensor, velocity: torch.Tensor, sigma_next: torch.Tensor):
    """The flow-matching estimate of the clean latents after a step, as a thunk: x_sigma = x0 + sigma * v with
    v = noise - x0 (what the Euler step integrates), so x0 = x_next - sigma_next * v (exact at the last step,
    where sigma_next = 0)."""
    return lambda: latents - sigma_next.to(latents.device, torch.float32) * velocity.to(torch.float32)


@contextlib.contextmanager
def _no_guard(stage: str):
    yield


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    module = module.to(device)
    if next(module.parameters()).dtype != dtype:  # loaded weights already come in the right dtype
        module = module.to(dtype)
    return module


@dataclass
class EncodedPrompts:
    positive: list[torch.Tensor]
    negative: list[torch.Tensor]  # empty unless guidance > 0


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
        self.vae = _place(components["vae"], self.devices["vae"], dtype)
        self._scheduler_config = components["scheduler"].config
        self._scheduler_cls = FlowMatchEulerDiscreteScheduler
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)

    # ---- stage 1: text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], negative_prompts: Sequence[str | None] | None = None, guidance: float = 0.0,
        max_sequence_length: int = 512,
    ) -> EncodedPrompts:
        if self.text_encoder is None:
            return self.remote_encode(list(prompts), list(negative_prompts or [None] * len(prompts)), guidance)
        positive = self._encode(list(prompts), max_sequence_length)
        negative: list[torch.Tensor] = []
        if guidance > 0:
            negs = [n or "" for n in (negative_prompts or [None] * len(prompts))]
            negative = self._encode(negs, max_sequence_length)
        return EncodedPrompts(positive, negative)

    def _encode(self, prompts: list[str], max_sequence_length: int) -> list[torch.Tensor]:
        device = self.devices["text_encoder"]
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            for p in prompts
        ]
        inputs = self.tokenizer(
            texts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        )
        ids = inputs.input_ids.to(device)
        mask = inputs.attention_mask.to(device).bool()
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return [hidden[i][mask[i]] for i in range(len(hidden))]

    # ---- stage 2: denoise ------------------------------------------------------------------------------
    def initial_latents(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        h = 2 * (int(height) // (self.vae_scale_factor * 2))
        w = 2 * (int(width) // (self.vae_scale_factor * 2))
        noise = [
            torch.randn((1, LATENT_CHANNELS, h, w), generator=torch.Generator("cpu").manual_seed(int(s)),
                        dtype=torch.float32)
            for s in seeds
        ]
        return torch.cat(noise, dim=0).to(self.devices["transformer"])

    @torch.no_grad()
    def denoise(
        self,
        prompts: EncodedPrompts,
        latents: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float = 0.0,
        on_step: Callable[[int, int, Callable[[], torch.Tensor]], None] | None = None,
    ) -> torch.Tensor:
        """``on_step(step, total, denoised)`` runs after every step; ``denoised()`` computes the current estimate
        of the clean latents (for previews and per-sample checks; nothing is computed unless it is called)."""
        device = self.devices["transformer"]
        positive = [p.to(device, non_blocking=True) for p in prompts.positive]
        negative = [p.to(device, non_blocking=True) for p in prompts.negative]
        scheduler = self._scheduler_cls.from_config(self._scheduler_config)
        batch = latents.shape[0]
        image_seq_len = (latents.shape[2] // 2) * (latents.shape[3] // 2)
        cfg = scheduler.config
        mu = _calculate_shift(
            image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15),
        )
        sigmas = torch.linspace(1.0, 1 / num_inference_steps, num_inference_steps).tolist()
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        scheduler.set_begin_index(0)
        apply_cfg = guidance_scale > 0
        embeds = positive + negative if apply_cfg else positive
        groups = caption_groups(embeds)  # once per batch: the captions do not change between steps
        for i, t in enumerate(scheduler.timesteps):
            x = latents.to(self.transformer.dtype)
            if apply_cfg:
                x = x.repeat(2, 1, 1, 1)
            out = self.transformer_forward(list(x.unsqueeze(2).unbind(dim=0)), (1000 - t) / 1000, embeds, groups)
            if apply_cfg:
                pos = torch.stack([o.float() for o in out[:batch]])
                neg = torch.stack([o.float() for o in out[batch:]])
                noise_pred = pos + guidance_scale * (pos - neg)
            else:
                noise_pred = torch.stack([o.float() for o in out], dim=0)
            noise_pred = -noise_pred.squeeze(2)
            latents = scheduler.step(noise_pred.to(torch.float32), t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, num_inference_steps, _clean_estimate(latents, noise_pred, scheduler.sigmas[i + 1]))
        return latents

    def transformer_forward(self, x: list[torch.Tensor], timestep: torch.Tensor, embeds: list[torch.Tensor],
                            groups: list[list[int]] | None = None) -> list[torch.Tensor]:
        """The transformer on a batch at one (0-d) timestep, one call per group of samples whose captions pad to
        the same length (``caption_groups``).

        The transformer pads each caption to a multiple of ``SEQ_MULTI_OF`` tokens; a batch whose captions pad to
        different lengths gets a key-padding mask, and a masked attention kernel runs far slower than an unmasked
        one (cuDNN on an H100: 390 against 610 TFLOP/s, ``benchmarks/probe_kernels.py``). Each group needs no mask,
        and each sample attends to exactly what it would alone: the same result up to floating-point rounding,
        computed faster."""
        groups = caption_groups(embeds) if groups is None else groups
        if len(groups) == 1:
            return self.transformer(x, timestep.repeat(len(x)), embeds, return_dict=False)[0]
        out: list = [None] * len(embeds)
        for idx in groups:
            part = self.transformer([x[i] for i in idx], timestep.repeat(len(idx)), [embeds[i] for i in idx],
                                    return_dict=False)[0]
            for i, o in zip(idx, part):
                out[i] = o
        return out

    # ---- stage 3: decode -------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> uint8 images [B, H, W, 3]."""
        latents = latents.to(self.devices["vae"], self.vae.dtype)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return self.decode_to_float(image)

    def decode_to_float(self, image: torch.Tensor) -> np.ndarray:
        arr = self.image_processor.postprocess(image, output_type="np")
        return (arr * 255).round().clip(0, 255).astype(np.uint8)

    # ---- all three -------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float = 0.0,
        negative_prompts: Sequence[str | None] | None = None,
        on_step: Callable[[int, int, Callable[[], torch.Tensor]], None] | None = None,
        stage_guard: Callable[[str], contextlib.AbstractContextManager] | None = None,
    ) -> tuple[np.ndarray, StageTimes]:
        """One pipeline call for a batch: returns uint8 images [B, H, W, 3] and the stage times (compute time of
        each stage; waiting for a guard is not counted). ``stage_guard(stage)`` wraps each of "encode",
        "denoise", "decode": the worker uses it to pipeline stages of consecutive batches (a lock and a CUDA
        stream per stage). Each stage ends by waiting for its own stream, so the next stage, on another stream
        or device, reads finished tensors."""
        self.check_size(height, width)
        guard = stage_guard or _no_guard
        with guard("encode"):
            t0 = time.perf_counter()
            enc = self.encode(prompts, negative_prompts, guidance_scale)
            if self.text_encoder is not None:
                _sync(self.devices["text_encoder"])
            encode_s = time.perf_counter() - t0
        with guard("denoise"):
            t0 = time.perf_counter()
            latents = self.initial_latents(seeds, height, width)
            latents = self.denoise(enc, latents, num_inference_steps, guidance_scale, on_step)
            _sync(self.devices["transformer"])
            denoise_s = time.perf_counter() - t0
        del enc
        with guard("decode"):
            t0 = time.perf_counter()
            images = self.decode(latents)
            decode_s = time.perf_counter() - t0
        return images, StageTimes(encode_s=encode_s, denoise_s=denoise_s, decode_s=decode_s,
                                  total_s=encode_s + denoise_s + decode_s)

    def check_size(self, height: int, width: int) -> None:
        multiple = self.vae_scale_factor * 2
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple} (got {v})")
