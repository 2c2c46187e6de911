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


def reference_output(engine, size: int = 512, steps: int = 9, seed: int = 1234):
    """Latents and decoded image of a fixed prompt and seed: the numerical check's probe."""
    enc = engine.encode([CHECK_PROMPT])
    lat = engine.denoise(enc, engine.initial_latents([seed], size, size), steps)
    return lat.float().cpu(), engine.decode(lat)[0]


def compare(reference, candidate) -> dict:
    (ref_lat, ref_img), (lat, img) = reference, candidate
    rel = float((lat - ref_lat).norm() / ref_lat.norm().clamp_min(1e-12))
    mse = float(np.mean((img.astype(np.float64) - ref_img.astype(np.float64)) ** 2))
    psnr = float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
    return {"latent_rel_l2": round(rel, 5), "image_psnr_db": round(psnr, 2), "probe": "512x512, 9 steps, seed 1234"}
