"""Image conditioning: img2img (a noised input image as the starting point) and inpainting (plus a per-step blend
that keeps the unmasked area), as diffusers 0.42's ``ZImageImg2ImgPipeline`` and ``ZImageInpaintPipeline`` compute
them, per sample (docs/conditioning.md, "The math").

- ``encode_conditions`` (its own stage, on the VAE's device): each input image preprocessed and VAE-encoded
  (``latent_dist.sample`` with the sample's own CPU generator), then the noise drawn from the same generator, in
  diffusers' order (the inpaint pipeline's unused masked-image encode is skipped); the mask scaled to the latent grid.
- ``Conditioning.start`` / ``noised``: ``t_start = int(max(N - min(N * strength, N), 0))`` of the sample's own
  ``N``-step schedule (``get_timesteps``); it runs the ``N - t_start`` steps from ``scale_noise(image_latents,
  sigma[t_start], noise)``.
- ``Conditioning.after_step``: inpainting blends ``(1 - mask) * scale_noise(image_latents, sigma_next, noise) + mask
  * latents`` (the clean image latents after the last step); img2img does nothing.

The router puts requests that run the same number of steps (``steps_run``, ``ImageRequest.key``) in one call; in the
step loop samples of any step count share each step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from zimage_common.messages import start_step, steps_run

__all__ = ["Conditioning", "encode_conditions", "encode_controls", "start_step", "steps_run"]


@dataclass
class Conditioning:
    """One sample's conditioning, on the transformer's device: its latents ``[C, h, w]`` float32."""

    num_inference_steps: int  # the length of the sample's own schedule (N)
    start: int  # the schedule index it starts at (t_start)
    image_latents: torch.Tensor  # the VAE latents of the input image, scaled as the transformer sees latents
    noise: torch.Tensor
    mask: torch.Tensor | None = None  # [1, h, w]: 1 = repaint, 0 = keep the input; None: img2img

    def to(self, device) -> Conditioning:
        return Conditioning(self.num_inference_steps, self.start, self.image_latents.to(device),
                            self.noise.to(device), None if self.mask is None else self.mask.to(device))

    def noised(self, sigma: float, keep: float) -> torch.Tensor:
        """The input image's latents noised to ``sigma`` (``keep`` = 1 - sigma): diffusers' ``scale_noise``,
        ``sigma * noise + (1 - sigma) * image_latents``. At the schedule's ``start`` sigma: the starting point."""
        return sigma * self.noise + keep * self.image_latents

    def after_step(self, latents: torch.Tensor, sigma: float | None, keep: float) -> torch.Tensor:
        """The inpainting blend after a step, with the sample's next sigma (None after its last step); img2img: the
        latents unchanged."""
        if self.mask is None:
            return latents
        proper = self.image_latents if sigma is None else self.noised(sigma, keep)
        return (1 - self.mask) * proper + self.mask * latents


def _mask_processor(engine):
    from diffusers.image_processor import VaeImageProcessor

    proc = getattr(engine, "_mask_processor", None)
    if proc is None:
        proc = VaeImageProcessor(vae_scale_factor=engine.vae_scale_factor * 2, do_normalize=False,
                                 do_binarize=True, do_convert_grayscale=True)
        engine._mask_processor = proc
    return proc


@torch.no_grad()
def encode_conditions(engine, samples, num_inference_steps: int) -> list[Conditioning | None]:
    """The conditioning of every sample that has an input image (``Sample.image``: uint8 ``[H, W, 3]`` at the
    sample's size; ``Sample.mask``: uint8 ``[H, W]``, nonzero = repaint), None for the others. Runs the VAE
    encoder, one image at a time; the results are moved to the transformer's device. ``num_inference_steps``: the
    steps the batch runs, which each conditioned sample's schedule (``Sample.num_inference_steps``, default the
    same) and ``strength`` must give."""
    from PIL import Image

    out: list[Conditioning | None] = []
    vae = engine.vae
    vae_device = engine.devices["vae"]
    target = engine.devices["transformer"]
    for s in samples:
        if s.image is None:
            out.append(None)
            continue
        image = np.asarray(s.image)
        if image.shape != (s.height, s.width, 3):
            raise ValueError(f"input image is {image.shape}, the sample is {s.height}x{s.width}")
        steps = int(s.num_inference_steps or num_inference_steps)
        if steps_run(steps, s.strength) != num_inference_steps:
            raise ValueError(f"a {steps}-step schedule at strength {s.strength} runs {steps_run(steps, s.strength)} "
                             f"steps, the batch runs {num_inference_steps}")
        g = torch.Generator("cpu").manual_seed(int(s.seed))
        pixels = engine.image_processor.preprocess(Image.fromarray(image)).to(torch.float32)
        pixels = pixels.to(vae_device, vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(g)
        latents = ((latents - vae.config.shift_factor) * vae.config.scaling_factor).float()
        h, w = engine.latent_size(s.height, s.width)
        noise = torch.randn((1, engine.transformer.config.in_channels, h, w), generator=g, dtype=torch.float32)
        mask = None
        if s.mask is not None:
            m = _mask_processor(engine).preprocess(Image.fromarray(np.asarray(s.mask)), height=s.height,
                                                   width=s.width)
            mask = torch.nn.functional.interpolate(m, size=(h, w), mode="nearest").to(torch.float32)[0]
        out.append(Conditioning(steps, start_step(steps, s.strength), latents[0].to(target), noise[0].to(target),
                                None if mask is None else mask.to(target)))
    return out


@torch.no_grad()
def encode_controls(engine, samples) -> list[torch.Tensor | None]:
    """The ControlNet input of every sample with a control image (``Sample.control_image``: uint8 ``[H, W, 3]``
    at the sample's size), None for the others: as ``ZImageControlNetPipeline`` prepares it, the VAE latents'
    mode (no random draw), ``(z - shift) * scale``, zero-padded to the ControlNet's ``control_in_dim`` channels,
    ``[C, 1, h, w]`` on the transformer's device."""
    from PIL import Image

    vae = engine.vae
    out: list[torch.Tensor | None] = []
    for s in samples:
        if getattr(s, "control_image", None) is None:
            out.append(None)
            continue
        if engine.controlnet is None:
            raise ValueError("a control image was sent to an engine without a ControlNet")
        image = np.asarray(s.control_image)
        if image.shape != (s.height, s.width, 3):
            raise ValueError(f"control image is {image.shape}, the sample is {s.height}x{s.width}")
        pixels = engine.image_processor.preprocess(Image.fromarray(image), height=s.height, width=s.width)
        z = vae.encode(pixels.to(engine.devices["vae"], vae.dtype)).latent_dist.mode()
        z = (z - vae.config.shift_factor) * vae.config.scaling_factor
        extra = engine.controlnet.config.control_in_dim - z.shape[1]
        if extra > 0:
            z = torch.cat([z, z.new_zeros(z.shape[0], extra, *z.shape[2:])], dim=1)
        out.append(z[0].unsqueeze(1).to(engine.devices["transformer"]))
    return out
