"""The stage-wise engine against diffusers' ZImagePipeline, and batched output against single output."""

import numpy as np
import pytest
import torch

from actors.engine import ZImageEngine
from actors.models import build_pipeline

CPU = dict.fromkeys(("transformer", "text_encoder", "vae"), "cpu")


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline("tiny", seed=3)


@pytest.fixture(scope="module")
def engine(pipe):
    return ZImageEngine(dict(pipe.components), CPU, torch.float32)


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_engine_equals_zimage_pipeline(pipe, engine, guidance):
    """Bit for bit, where the batch's captions pad to one length (mixed lengths: the next tests)."""
    prompts, seeds = ["a red fox in snow", "a lighthouse at dusk"], [11, 12]
    negs = ["blurry and low quality", "oversaturated colors"]
    ours, times = engine.generate(prompts, seeds, 64, 96, 3, guidance, negs)
    ref = pipe(
        prompts, height=64, width=96, num_inference_steps=3, guidance_scale=guidance,
        negative_prompt=[n or "" for n in negs] if guidance else None,
        generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np",
    ).images
    ref = (ref * 255).round().clip(0, 255).astype(np.uint8)
    assert ours.shape == (2, 64, 96, 3)
    assert np.array_equal(ours, ref)
    assert times.total_s >= times.denoise_s > 0


def test_batched_equals_single(engine):
    prompts = ["a cat", "a much longer prompt about a dog on a hill at sunset", "x"]
    seeds = [1, 2, 3]
    enc = engine.encode(prompts)
    lat = engine.denoise(enc, engine.initial_latents(seeds, 64, 64), 3)
    for i in range(3):
        one = engine.denoise(engine.encode([prompts[i]]), engine.initial_latents([seeds[i]], 64, 64), 3)
        assert torch.allclose(lat[i], one[0], atol=1e-5), float((lat[i] - one[0]).abs().max())


def test_image_depends_on_seed_and_prompt(engine):
    a, _ = engine.generate(["a cat"], [1], 64, 64, 2)
    b, _ = engine.generate(["a cat"], [2], 64, 64, 2)
    c, _ = engine.generate(["a dog"], [1], 64, 64, 2)
    again, _ = engine.generate(["a cat"], [1], 64, 64, 2)
    assert np.array_equal(a, again)
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


def test_bad_size_is_a_clear_error(engine):
    with pytest.raises(ValueError, match="height must be a positive multiple of 16 \\(got 100\\)"):
        engine.generate(["a"], [1], 100, 64, 2)


def test_step_callback(engine):
    seen = []
    engine.generate(["a"], [1], 32, 32, 4, on_step=lambda i, n, denoised: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_captions_of_different_padded_lengths_run_unmasked_groups(pipe, engine, monkeypatch, guidance):
    """A batch whose captions pad to different lengths runs one transformer call per length (no padding mask),
    and gives what diffusers' masked batch gives."""
    prompts = ["a cat", "a much longer prompt about a dog on a hill at sunset, with mountains behind it", "x"]
    negs = ["blurry", None, None]
    seeds = [1, 2, 3]
    lengths = {-(-e.shape[0] // 32) for e in engine.encode(prompts).positive}
    assert len(lengths) == 2, lengths  # the test needs two padded lengths
    calls = []
    real = engine.transformer.forward
    monkeypatch.setattr(engine.transformer, "forward", lambda x, *a, **k: calls.append(len(x)) or real(x, *a, **k))
    ours, _ = engine.generate(prompts, seeds, 32, 32, 2, guidance, negs)
    assert len(calls) == 4 and sum(calls) == 2 * len(prompts) * (2 if guidance else 1)  # two groups a step
    ref = pipe(prompts, height=32, width=32, num_inference_steps=2, guidance_scale=guidance, output_type="np",
               negative_prompt=[n or "" for n in negs] if guidance else None,
               generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    ref = (ref * 255).round().clip(0, 255).astype(np.uint8)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
