"""Img2img and inpainting in the packed engine against diffusers' ZImageImg2ImgPipeline / ZImageInpaintPipeline,
and conditioned samples batched with plain ones (actors/conditioning.py); then, at the latent level (stricter than
8-bit images): several schedule lengths, strengths and sizes; edits joining a running step loop at different steps
(also parked behind a more urgent sample); ControlNet variants with per-sample scales against
ZImageControlNetPipeline. Toy model, CPU, fp32."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import final_latents
from PIL import Image

from actors.conditioning import start_step, steps_run
from actors.engine import Sample, ZImageEngine
from actors.models import build_components
from actors.steploop import StepLoop, generate, prepare

CPU = dict.fromkeys(("transformer", "text_encoder", "vae"), "cpu")
TOL = 1e-4  # fp32 summation-order noise on latents of magnitude ~3


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


# ---- at the latent level ------------------------------------------------------------------------------------------
def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3)).astype(np.uint8)


def _offgrid(h, w):
    """A rectangle whose edges are not on the 16-px latent-patch grid (nearest resize to the latent grid matters)."""
    m = np.zeros((h, w), np.uint8)
    m[h // 5: 3 * h // 5 + 3, w // 3 - 5: w - 7] = 255
    return m


def _diffusers_latents(components, s: Sample):
    from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline

    kw = dict(height=s.height, width=s.width, num_inference_steps=s.num_inference_steps, strength=s.strength,
              guidance_scale=s.guidance_scale, negative_prompt=s.negative_prompt if s.guidance_scale else None,
              generator=torch.Generator().manual_seed(s.seed), output_type="latent")
    if s.mask is None:
        return ZImageImg2ImgPipeline(**components)(s.prompt, image=Image.fromarray(s.image), **kw).images[0]
    return ZImageInpaintPipeline(**components)(s.prompt, image=Image.fromarray(s.image),
                                               mask_image=Image.fromarray(s.mask), **kw).images[0]


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
@pytest.mark.parametrize("hw", [(64, 96), (128, 112)])
@pytest.mark.parametrize("steps,strength", [(9, 0.6), (7, 0.3), (5, 0.95), (10, 0.15), (50, 0.58)])
def test_edit_latents_equal_diffusers(components, engine, kind, hw, steps, strength):
    """get_timesteps' t_start (50 x 0.58 is 28.999...: runs 29), the size's shift, scale_noise at sigma[t_start]
    and the per-step blend at the next sigma: the final latents equal the pipeline's."""
    h, w = hw
    s = Sample("a fox", 3, w, h, image=_img(h, w, 1), mask=_offgrid(h, w) if kind == "inpaint" else None,
               strength=strength, num_inference_steps=steps)
    (ours,) = final_latents(engine, [s], steps_run(steps, strength))
    ref = _diffusers_latents(components, s)
    assert ours.shape == ref.shape == (16, h // 8, w // 8)
    assert (ours - ref).abs().max() < TOL


@pytest.mark.parametrize("priority", [0, 1])
def test_edits_joining_a_running_loop_equal_diffusers(components, engine, priority):
    """Three edits (two sizes, strengths and schedule lengths, an inpaint with guidance) join a running 10-step
    text-to-image sample at different steps; at priority 1 the running sample is parked behind them. Each edit's
    latents equal the diffusers pipeline's."""
    a = Sample("a fox", 3, 96, 64, image=_img(64, 96, 1), strength=0.6, num_inference_steps=9)
    b = Sample("a boat", 4, 112, 128, 2.0, "blurry", image=_img(128, 112, 2), mask=_offgrid(128, 112), strength=0.75,
               num_inference_steps=8)
    d = Sample("a dog", 6, 48, 80, image=_img(80, 48, 3), mask=_offgrid(80, 48), strength=0.5, num_inference_steps=12)
    assert {steps_run(s.num_inference_steps, s.strength) for s in (a, b, d)} == {6}
    loop = StepLoop(engine)
    g1, _ = prepare(engine, [Sample("long", 1, 64, 64, priority=priority)], 10)
    loop.submit(g1, start=False)
    for _ in range(3):
        loop._guarded(wait=False)
    g2, _ = prepare(engine, [a, b], 6)
    loop.submit(g2, start=False)
    for _ in range(2):
        loop._guarded(wait=False)
    g3, _ = prepare(engine, [d], 6)
    loop.submit(g3, start=False)
    while not all(g.done.is_set() for g in (g1, g2, g3)):
        loop._guarded(wait=False)
    for s, rs in zip((a, b, d), g2.samples + g3.samples):
        ref = _diffusers_latents(components, s)
        assert rs.latents.shape == ref.shape and (rs.latents - ref).abs().max() < TOL, s.prompt


@pytest.mark.parametrize("extra", [{"control_in_dim": 33},
                                   {"add_control_noise_refiner": "control_layers",
                                    "control_refiner_layers_places": [0]},
                                   {"add_control_noise_refiner": "control_noise_refiner",
                                    "control_refiner_layers_places": [0]}],
                         ids=["v2-padded", "refiner-control_layers", "refiner-control_noise_refiner"])
def test_controlnet_variants_batched_equal_pipeline(extra):
    """Two controlled samples (sizes, scales 0.8 and 1.3, one with guidance) and a plain one in one packed batch:
    each equals ZImageControlNetPipeline's latents (the plain one: the pipeline at scale 0)."""
    from diffusers import ZImageControlNetPipeline

    from actors.controlnet import build_controlnet

    comp = build_components("tiny", seed=9)
    cn = build_controlnet("tiny", comp["transformer"], seed=4, **extra)
    eng = ZImageEngine({**comp, "controlnet": cn}, CPU, torch.float32)
    pipe = ZImageControlNetPipeline(**comp, controlnet=cn)
    samples = [Sample("a house", 5, 96, 64, 2.0, "blurry", control_image=_img(64, 96, 1), control_scale=0.8),
               Sample("a cat", 6, 48, 80, control_image=_img(80, 48, 2), control_scale=1.3),
               Sample("plain", 7, 64, 64)]
    outs = final_latents(eng, samples, 3)
    for s, ours in zip(samples, outs):
        ctl = s.control_image if s.control_image is not None else _img(s.height, s.width)
        ref = pipe(s.prompt, control_image=Image.fromarray(ctl), height=s.height, width=s.width,
                   num_inference_steps=3, guidance_scale=s.guidance_scale, negative_prompt=s.negative_prompt,
                   controlnet_conditioning_scale=s.control_scale if s.control_image is not None else 0.0,
                   generator=torch.Generator().manual_seed(s.seed), output_type="latent").images[0]
        assert ours.shape == ref.shape and (ours - ref).abs().max() < TOL, s.prompt


def test_priority_parked_edit_is_unchanged(engine):
    """An inpaint parked (priority 1) while an interactive sample runs resumes to the same latents as alone."""
    s = Sample("a boat", 4, 64, 64, image=_img(64, 64, 5), mask=_offgrid(64, 64), strength=0.8, num_inference_steps=5,
               priority=1)
    (alone,) = final_latents(engine, [s], 4)
    loop = StepLoop(engine)
    g1, _ = prepare(engine, [s], 4)
    loop.submit(g1, start=False)
    loop._guarded(wait=False)
    g2, _ = prepare(engine, [replace(s, prompt="urgent", image=None, mask=None, priority=0)], 3)
    loop.submit(g2, start=False)
    while not (g1.done.is_set() and g2.done.is_set()):
        loop._guarded(wait=False)
    assert (g1.samples[0].latents - alone).abs().max() == 0
