"""Opt-in fp8 for the transformer: dynamic per-row float8 activations and weights (torchao) on the linear layers
of its repeated blocks, plus the numerical check the benchmark reports (output against bf16, same seed)."""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

BLOCK_PREFIXES = ("layers.", "noise_refiner.", "context_refiner.")
CHECK_PROMPT = "a lighthouse on a rocky coast at sunset, detailed photograph"


def quantize_fp8(transformer: torch.nn.Module) -> int:
    """Swap the blocks' nn.Linear weights for float8 (per-row scales) in place. Returns how many were swapped."""
    device = next(transformer.parameters()).device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise RuntimeError(f"model.quantization 'fp8' needs an NVIDIA GPU of compute capability 8.9+ (Ada, Hopper); "
                           f"the transformer is on {device}")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as e:
        raise RuntimeError("model.quantization 'fp8' needs torchao: pip install 'zimage-orchestrator[fp8]'") from e

    names = []

    def in_blocks(module: torch.nn.Module, fqn: str) -> bool:
        ok = isinstance(module, torch.nn.Linear) and fqn.startswith(BLOCK_PREFIXES) \
            and module.in_features % 16 == 0 and module.out_features % 16 == 0
        if ok:
            names.append(fqn)
        return ok

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=in_blocks)
    log.info("fp8: quantized %d linear layers of the transformer blocks", len(names))
    return len(names)


@torch.no_grad()
def reference_output(engine, size: int = 512, steps: int = 9, seed: int = 1234):
    """The numerical check's probe for a fixed prompt and seed: the transformer's output for one forward
    (meaningful even for random weights) and the final image after ``steps`` steps (meaningful for real ones)."""
    enc = engine.encode([CHECK_PROMPT])
    lat0 = engine.initial_latents([seed], size, size)
    device = engine.devices["transformer"]
    x = list(lat0.to(engine.transformer.dtype).unsqueeze(2).unbind(0))
    t = torch.full((1,), 0.5, device=device)
    one = engine.transformer(x, t, [e.to(device) for e in enc.positive], return_dict=False)[0][0].float().cpu()
    lat = engine.denoise(enc, lat0, steps)
    return one, engine.decode(lat)[0]


def compare(reference, candidate) -> dict:
    """fp8 against the unquantized model: relative L2 error of one transformer forward, the share of
    non-finite values in the reference (random weights can overflow), and the final image's PSNR."""
    (ref_out, ref_img), (out, img) = reference, candidate
    finite = torch.isfinite(ref_out) & torch.isfinite(out)
    rel = float((out[finite] - ref_out[finite]).norm() / ref_out[finite].norm().clamp_min(1e-12))
    mse = float(np.mean((img.astype(np.float64) - ref_img.astype(np.float64)) ** 2))
    psnr = float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
    return {"forward_rel_l2": round(rel, 5), "nonfinite_fraction": round(float(1 - finite.float().mean()), 5),
            "image_psnr_db": round(psnr, 2), "probe": "512x512, seed 1234: 1 forward at t=0.5; image after 9 steps"}
