"""fp8 pieces that run on the CPU: the native float8 linear against the bf16 one, the swap, and the errors."""

import pytest
import torch
from conftest import needs_cpu_fp8

from actors.models import build_components
from actors.quantize import Fp8Linear, _quantizable, compare, quantize_fp8


@needs_cpu_fp8
def test_fp8_linear_matches_linear_within_fp8_precision():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96).to(torch.bfloat16)
    x = torch.randn(2, 7, 256, dtype=torch.bfloat16)
    q = Fp8Linear(lin)
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.shape == (1, 96)
    with torch.no_grad():
        ref, out = lin(x).float(), q(x)
    assert out.shape == (2, 7, 96) and out.dtype == torch.bfloat16
    rel = float((out.float() - ref).norm() / ref.norm())
    assert 0 < rel < 0.06  # e4m3 keeps 3 mantissa bits: a few percent, never exact
    # A row of zeros (a padded token) stays zeros instead of 0/0.
    zero = q(torch.zeros(1, 256, dtype=torch.bfloat16))
    assert torch.isfinite(zero).all() and torch.allclose(zero.float(), lin.bias.float()[None])


def test_only_the_blocks_linear_layers_are_chosen():
    tr = build_components("tiny", device={"transformer": "cpu"})["transformer"]
    chosen = [fqn for fqn, m in tr.named_modules() if _quantizable(m, fqn)]
    assert chosen and all(fqn.startswith(("layers.", "noise_refiner.", "context_refiner.")) for fqn in chosen)
    assert not any(fqn.startswith(("t_embedder", "cap_embedder", "all_final_layer", "all_x_embedder"))
                   for fqn in chosen)


def test_fp8_needs_a_recent_gpu_and_names_the_setting():
    tr = build_components("tiny", device={"transformer": "cpu"})["transformer"]
    with pytest.raises(RuntimeError, match="model.quantization 'fp8' needs an NVIDIA GPU"):
        quantize_fp8(tr)


def test_compare_reports_errors_nonfinite_share_and_psnr():
    import numpy as np

    from actors.quantize import Probe

    ref = Probe(torch.ones(4, 4), torch.full((2, 3), 2.0), np.zeros((8, 8, 3), np.uint8))
    same = compare(ref, ref)
    assert same["forward_rel_l2"] == 0 and same["latents_rel_l2"] == 0 and same["nonfinite_fraction"] == 0
    assert same["image_psnr_db"] == float("inf") and "512x512, seed 1234" in same["probe"]
    bad = torch.ones(4, 4)
    bad[0, 0] = float("nan")
    out = compare(ref, Probe(bad * 1.1, torch.full((2, 3), 1.0), np.full((8, 8, 3), 1, np.uint8)))
    assert out["nonfinite_fraction"] == pytest.approx(1 / 16, abs=1e-4)
    assert out["forward_rel_l2"] == pytest.approx(0.1, abs=1e-3) and out["image_psnr_db"] == pytest.approx(48.13, 0.01)
    assert out["latents_rel_l2"] == pytest.approx(0.5)


@pytest.mark.parametrize("mode,max_rel,min_psnr", [("int8", 0.01, 50.0), ("fp8", 0.03, 45.0)])
def test_weight_only_text_encoder_error_is_measured_and_small(mode, max_rel, min_psnr):
    """The tiny model's text encoder, quantized weight-only: halves its linear weights, reports the embedding
    error and the image PSNR against bf16/fp32 (bounds from CPU runs: int8 0.0035 / 65.6 dB, fp8 0.015 / 58.7 dB)."""
    from actors.engine import ZImageEngine
    from actors.models import build_pipeline
    from actors.quantize import WeightOnlyLinear, encoder_error, quantize_weight_only

    pipe = build_pipeline("tiny", seed=3)
    eng = ZImageEngine(dict(pipe.components), dict.fromkeys(("transformer", "text_encoder", "vae"), "cpu"),
                       torch.float32)
    before = sum(b.numel() * b.element_size() for b in eng.text_encoder.buffers()) + sum(
        p.numel() * p.element_size() for p in eng.text_encoder.parameters())
    report = encoder_error(eng, lambda: quantize_weight_only(eng.text_encoder, mode), size=64, steps=4)
    after = sum(b.numel() * b.element_size() for b in eng.text_encoder.buffers()) + sum(
        p.numel() * p.element_size() for p in eng.text_encoder.parameters())
    assert any(isinstance(m, WeightOnlyLinear) for m in eng.text_encoder.modules())
    assert after < before
    assert report["text_encoder_embed_rel_l2"] <= max_rel and report["text_encoder_nonfinite_fraction"] == 0
    assert report["text_encoder_image_psnr_db"] >= min_psnr


def test_quantizing_frees_each_original_layer_as_it_goes():
    """The peak while quantizing is one layer's copies, not the whole model twice (a bf16 text encoder beside the
    transformer being converted did not fit a 24 GB card when every original layer stayed alive to the end)."""
    import gc
    import weakref

    from actors.quantize import _swap_linears

    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
    refs = [weakref.ref(layer) for layer in model]
    alive = []

    def make(layer):
        gc.collect()
        alive.append(sum(r() is not None for r in refs))
        return torch.nn.Identity()

    assert _swap_linears(model, lambda m, fqn: isinstance(m, torch.nn.Linear), make) == 4
    assert alive == [4, 3, 2, 1]
