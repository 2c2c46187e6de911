"""The stage-wise engine against diffusers' ZImagePipeline, and packed batches against solo runs."""

import numpy as np
import pytest
import torch
from conftest import final_latents

from actors.engine import Sample, ZImageEngine
from actors.models import build_pipeline
from actors.steploop import generate

CPU = dict.fromkeys(("transformer", "text_encoder", "vae"), "cpu")


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline("tiny", seed=3)


@pytest.fixture(scope="module")
def engine(pipe):
    return ZImageEngine(dict(pipe.components), CPU, torch.float32)


def _pipe_images(pipe, prompts, seeds, h, w, steps, guidance, negs=None):
    ref = pipe(prompts, height=h, width=w, num_inference_steps=steps, guidance_scale=guidance,
               negative_prompt=[n or "" for n in negs] if guidance and negs else None,
               generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np").images
    return (ref * 255).round().clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("guidance", [0.0, 0.5, 3.0])
def test_engine_equals_zimage_pipeline(pipe, engine, guidance):
    """Against diffusers' own pipeline on a single-size batch: the same images up to one 8-bit level (fp32
    rounding: the packed call and diffusers' padded batch add in different orders). Guidance between 0 and 1
    included: diffusers runs the negative pass for any guidance above 0."""
    prompts, seeds = ["a red fox in snow", "a lighthouse at dusk"], [11, 12]
    negs = ["blurry and low quality", "oversaturated colors"]
    samples = [Sample(p, s, 96, 64, guidance, n) for p, s, n in zip(prompts, seeds, negs)]
    ours, times = generate(engine, samples, 3)
    ref = _pipe_images(pipe, prompts, seeds, 64, 96, 3, guidance, negs)
    assert [o.shape for o in ours] == [(64, 96, 3)] * 2
    for o, r in zip(ours, ref):
        assert np.abs(o.astype(int) - r.astype(int)).max() <= 1
    assert times.total_s >= times.denoise_s > 0


def test_mixed_batch_equals_solo_runs(pipe, engine):
    """Sizes, prompt lengths, guidance and negative prompts all differ within one batch: each image equals its own
    solo run, and equals diffusers' pipeline run alone on it."""
    samples = [
        Sample("a cat", 1, 64, 64),
        Sample("a much longer prompt about a dog on a hill at sunset, with mountains behind it", 2, 96, 32, 2.0,
               "blurry"),
        Sample("x", 3, 32, 128),
        Sample("a red fox in the snow at night", 4, 64, 64, 0.0),
        Sample("a lighthouse", 5, 48, 80, 4.0),
    ]
    batch, _ = generate(engine, samples, 3)
    for s, img in zip(samples, batch):
        solo, _ = generate(engine, [s], 3)
        assert img.shape == (s.height, s.width, 3)
        assert np.abs(img.astype(int) - solo[0].astype(int)).max() <= 1, s
        ref = _pipe_images(pipe, [s.prompt], [s.seed], s.height, s.width, 3, s.guidance_scale, [s.negative_prompt])
        assert np.abs(img.astype(int) - ref[0].astype(int)).max() <= 1, s


def test_packed_latents_match_solo_closely(engine):
    samples = [Sample("a cat", 1, 64, 64), Sample("a much longer prompt about a dog on a hill", 2, 32, 96),
               Sample("x", 3, 64, 64)]
    lat = final_latents(engine, samples, 3)
    for i, s in enumerate(samples):
        one = final_latents(engine, [s], 3)
        assert torch.allclose(lat[i], one[0], atol=1e-5), float((lat[i] - one[0]).abs().max())


def test_image_depends_on_seed_and_prompt(engine):
    a, _ = generate(engine, [Sample("a cat", 1, 64, 64)], 2)
    b, _ = generate(engine, [Sample("a cat", 2, 64, 64)], 2)
    c, _ = generate(engine, [Sample("a dog", 1, 64, 64)], 2)
    again, _ = generate(engine, [Sample("a cat", 1, 64, 64)], 2)
    assert np.array_equal(a[0], again[0])
    assert not np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])


def test_bad_size_is_a_clear_error(engine):
    with pytest.raises(ValueError, match="height must be a positive multiple of 16 \\(got 100\\)"):
        generate(engine, [Sample("a", 1, 64, 100)], 2)


def test_step_callback(engine):
    seen = []
    generate(engine, [Sample("a", 1, 32, 32)], 4, on_step=lambda i, n, denoised: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_one_transformer_call_per_step_for_a_mixed_batch(engine, monkeypatch):
    """A batch of several sizes and caption lengths runs one packed transformer call per step (no grouping)."""
    calls = []
    real = engine.packed.__class__.__call__
    monkeypatch.setattr(engine.packed.__class__, "__call__",
                        lambda self, x, *a, **k: calls.append(len(x)) or real(self, x, *a, **k))
    samples = [Sample("a cat", 1, 32, 32), Sample("a much longer prompt about a dog on a hill", 2, 64, 48, 3.0),
               Sample("x", 3, 48, 32)]
    generate(engine, samples, 2)
    assert calls == [4, 4]  # three samples plus one negative pass, twice
