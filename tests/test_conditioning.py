"""Img2img and inpainting in the packed engine against diffusers' ZImageImg2ImgPipeline / ZImageInpaintPipeline,
and conditioned samples batched with plain ones (actors/conditioning.py)."""

import numpy as np
import pytest
import torch
from conftest import final_latents

from actors.conditioning import start_step, steps_run
from actors.engine import Sample, ZImageEngine
from actors.models import build_components
from actors.steploop import generate

CPU = dict.fromkeys(("transformer", "text_encoder", "vae"), "cpu")


@pytest.fixture(scope="module")
def components():
    return build_components("tiny", seed=5)


@pytest.fixture(scope="module")
def engine(components):
    return ZImageEngine(dict(components), CPU, torch.float32)


def _input_image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) * 127 // max(1, h + w - 2)], -1)
    return np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _mask(h, w):
    m = np.zeros((h, w), np.uint8)
    m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
    return m


def _u8(ref):
    return (ref * 255).round().clip(0, 255).astype(np.uint8)


def _ref(components, kind, prompt, seed, image, mask, steps, strength, guidance=0.0, neg=None):
    from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline
    from PIL import Image

    h, w = image.shape[:2]
    kw = dict(height=h, width=w, num_inference_steps=steps, strength=strength, guidance_scale=guidance,
              negative_prompt=neg if guidance else None, generator=torch.Generator().manual_seed(seed),
              output_type="np")
    if kind == "img2img":
        pipe = ZImageImg2ImgPipeline(**components)
        return _u8(pipe(prompt, image=Image.fromarray(image), **kw).images[0])
    pipe = ZImageInpaintPipeline(**components)
    return _u8(pipe(prompt, image=Image.fromarray(image), mask_image=Image.fromarray(mask), **kw).images[0])


def test_start_step_is_diffusers_get_timesteps():
    assert [start_step(8, s) for s in (1.0, 0.6, 0.5, 0.25, 0.0)] == [0, 3, 4, 6, 8]
    assert steps_run(8, 0.6) == 5 and steps_run(10, 0.05) == 1 and steps_run(10, 0.0) == 0 and steps_run(3, 1.0) == 3


@pytest.mark.parametrize("kind,strength,guidance", [("img2img", 0.6, 0.0), ("img2img", 1.0, 2.0),
                                                    ("inpaint", 0.6, 0.0), ("inpaint", 0.75, 1.5)])
def test_engine_equals_diffusers_pipelines(components, engine, kind, strength, guidance):
    """Output for output against diffusers' pipelines on the CPU (up to one 8-bit level: fp32 summation order of
    the packed call)."""
    steps, h, w = 8, 64, 96
    image = _input_image(h, w)
    mask = _mask(h, w) if kind == "inpaint" else None
    s = Sample("a red fox in snow", 7, w, h, guidance, "blurry" if guidance else None, image=image, mask=mask,
               strength=strength, num_inference_steps=steps)
    ours, times = generate(engine, [s], steps_run(steps, strength))
    ref = _ref(components, kind, s.prompt, 7, image, mask, steps, strength, guidance, "blurry")
    assert ours[0].shape == ref.shape == (h, w, 3)
    assert np.abs(ours[0].astype(int) - ref.astype(int)).max() <= 1
    assert times.image_encode_s > 0


def test_conditioned_and_plain_samples_share_a_batch(engine):
    """A 5-step plain sample, an 8-step img2img at strength 0.6 (runs 5) and a 10-step inpaint at 0.5 (runs 5) in
    one packed batch: each image equals its solo run."""
    img_a, img_b = _input_image(64, 64, 1), _input_image(48, 80, 2)
    samples = [
        Sample("a cat", 1, 64, 64),
        Sample("a dog on a hill", 2, 64, 64, 2.0, "blurry", image=img_a, strength=0.6, num_inference_steps=8),
        Sample("a lighthouse", 3, 80, 48, image=img_b, mask=_mask(48, 80), strength=0.5, num_inference_steps=10),
    ]
    batch, _ = generate(engine, samples, 5)
    for s, img in zip(samples, batch):
        solo, _ = generate(engine, [s], 5)
        assert img.shape == (s.height, s.width, 3)
        assert np.abs(img.astype(int) - solo[0].astype(int)).max() <= 1


def test_inpaint_keeps_the_unmasked_area_and_lower_strength_stays_closer(engine):
    image = _input_image(64, 64, 3)
    mask = _mask(64, 64)
    out, _ = generate(engine, [Sample("a boat", 4, 64, 64, image=image, mask=mask, strength=1.0,
                                     num_inference_steps=4)], 4)
    keep = mask == 0
    # The unmasked area comes back as the VAE's round trip of the input; the masked area is repainted.
    roundtrip = engine.decode([engine.vae.encode(
        engine.image_processor.preprocess(__import__("PIL.Image").Image.fromarray(image))).latent_dist.mode()[0]
        .sub(engine.vae.config.shift_factor).mul(engine.vae.config.scaling_factor)])[0]
    kept = np.abs(out[0].astype(int) - roundtrip.astype(int))[keep].mean()
    painted = np.abs(out[0].astype(int) - roundtrip.astype(int))[~keep].mean()
    assert kept < painted
    # Lower strength ends closer to the input (in latent space: the toy VAE's random weights make its pixel round
    # trip meaningless).
    from actors.conditioning import encode_conditions

    dist = []
    for strength in (0.25, 0.5, 1.0):
        s = Sample("a boat", 4, 64, 64, image=image, strength=strength, num_inference_steps=8)
        run = steps_run(8, strength)
        conds = encode_conditions(engine, [s], run)
        clean = conds[0].image_latents.clone()
        (final,) = final_latents(engine, [s], run)
        dist.append(float((final - clean).abs().mean()))
    assert dist[0] < dist[1] < dist[2], dist


def test_a_wrong_step_count_is_refused(engine):
    s = Sample("x", 1, 64, 64, image=_input_image(64, 64), strength=0.5, num_inference_steps=8)
    with pytest.raises(ValueError, match="runs 4 steps"):
        generate(engine, [s], 5)
