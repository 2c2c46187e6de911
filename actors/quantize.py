"""Opt-in fp8 for the transformer: dynamic per-row float8 activations and weights on the linear layers of its
repeated blocks (chosen main blocks may stay in bf16: ``model.fp8_bf16_blocks``), plus the accuracy probe that
bounds it (one forward, the final latents and the image against the model before, same prompt and seed;
``actors/accuracy.py`` runs it at start-up).

Weights: float8_e4m3 with one scale per output row, computed once; activations: float8_e4m3 with one scale per
token, computed on every call; matmul: ``torch._scaled_mm`` with row-wise scales into bf16. ``Fp8Linear`` holds
plain tensors, so under ``torch.compile`` the activation quantization fuses into the neighbouring kernels and
nothing but ordinary tensors reaches the compiler. (torchao's tensor-subclass version of the same scheme compiled
in 194 s against 25 on an H100, so it is not offered: docs/benchmarks-history.md.)
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torch

log = logging.getLogger(__name__)

BLOCK_PREFIXES = ("layers.", "noise_refiner.", "context_refiner.")
CHECK_PROMPT = "a lighthouse on a rocky coast at sunset, detailed photograph"


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def _rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 values and float32 scales (one per row) of a 2-D tensor, so that ``q * scale`` ~= ``x``."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Linear(torch.nn.Module):
    """``nn.Linear`` with a float8 weight (per-output-row scale) and dynamically per-token-quantized input."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w, w_scale = _rowwise(linear.weight.detach())
        self.register_buffer("weight", w)  # (out, in), row-major: its .t() is the column-major operand
        self.register_buffer("weight_scale", w_scale.reshape(1, -1).contiguous())  # (1, out)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xq, x_scale = _rowwise(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale,
                               out_dtype=x.dtype, use_fast_accum=True)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _quantizable(module: torch.nn.Module, fqn: str) -> bool:
    """The blocks' token-wise linears. Not the adaLN modulation: it runs once per sample ([batch, 256]), costs
    nothing worth saving, and a float8 matmul on a batch-sized dimension makes the compiled packed blocks guard on
    the number of samples."""
    return isinstance(module, torch.nn.Linear) and fqn.startswith(BLOCK_PREFIXES) \
        and "adaLN_modulation" not in fqn and module.in_features % 16 == 0 and module.out_features % 16 == 0


def _swap_linears(module: torch.nn.Module, select, make) -> int:
    """Replace each submodule ``select(m, fqn)`` picks by ``make(m)``, in place, one at a time and by name: holding
    the modules in a list would keep every original weight alive until the last is converted (bf16 and quantized
    copies at once: 17.4 GiB for the transformer, more than a 24 GB card has beside a bf16 text encoder). This
    way the peak is one layer's temporaries."""
    names = [fqn for fqn, m in module.named_modules() if select(m, fqn)]
    for fqn in names:
        parent_name, _, child = fqn.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, make(getattr(parent, child)))
    return len(names)


def resolve_bf16_blocks(spec, n_layers: int) -> list[int]:
    """The main-block indices ``model.fp8_bf16_blocks`` names for a transformer of ``n_layers`` main blocks: a list
    of indices, or ``"last:N"`` / ``"first:N"`` (``zimage_common/config.py`` checks the form). An index or an N
    past the model's blocks is an error that says how many it has."""
    where = "model.fp8_bf16_blocks"
    if isinstance(spec, str):
        end, _, count = spec.partition(":")
        n = int(count)
        if n > n_layers:
            raise ValueError(f"{where}: {spec!r} asks for {n} blocks; this transformer has {n_layers} main blocks")
        return list(range(n_layers - n, n_layers)) if end == "last" else list(range(n))
    bad = sorted(i for i in spec if not 0 <= i < n_layers)
    if bad:
        raise ValueError(f"{where}: block(s) {bad} do not exist; this transformer has {n_layers} main blocks "
                         f"(0-{n_layers - 1})")
    return sorted(set(spec))


def fp8_selector(bf16_blocks=()):
    """``select(module, fqn)`` for ``_swap_linears``: the blocks' quantizable linears, except those of the main
    blocks in ``bf16_blocks``."""
    keep = tuple(f"layers.{i}." for i in bf16_blocks)
    return lambda module, fqn: _quantizable(module, fqn) and not fqn.startswith(keep)


def swap_fp8(transformer: torch.nn.Module, bf16_blocks=()) -> int:
    """The swap itself (any device; ``quantize_fp8`` checks the GPU first): float8 linears for the
    blocks' linears, the main blocks in ``bf16_blocks`` left as they are. Returns how many."""
    return _swap_linears(transformer, fp8_selector(bf16_blocks), Fp8Linear)


def quantize_fp8(transformer: torch.nn.Module, *, bf16_blocks=()) -> int:
    """Swap the blocks' nn.Linear layers for float8 ones (per-row scales) in place, except those of the main
    blocks whose indices are in ``bf16_blocks`` (``resolve_bf16_blocks``). Returns how many."""
    device = next(transformer.parameters()).device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise RuntimeError(f"model.quantization 'fp8' needs an NVIDIA GPU of compute capability 8.9+ (Ada, Hopper); "
                           f"the transformer is on {device}")
    n = swap_fp8(transformer, bf16_blocks)
    kept = f", main blocks {list(bf16_blocks)} kept in {transformer.dtype}" if bf16_blocks else ""
    log.info("fp8: quantized %d linear layers of the transformer blocks%s", n, kept)
    return n


class Probe(NamedTuple):
    """What the numerical check records for one model state: the transformer's output for one forward at t=0.5
    (meaningful even for random weights), the final latents after ``steps`` steps and the decoded image
    (meaningful for real weights), all on the CPU."""

    forward: torch.Tensor
    latents: torch.Tensor
    image: np.ndarray
    size: int = 512
    steps: int = 9
    seed: int = 1234


@torch.no_grad()
def reference_output(engine, size: int = 512, steps: int = 9, seed: int = 1234, prompt: str = CHECK_PROMPT) -> Probe:
    """The numerical check's probe for a fixed prompt and seed through the packed transformer as it is now (eager
    or compiled, bf16 or fp8): one forward at t=0.5 on the seed's noise, then ``steps`` steps of the step loop
    (guidance 0), then the VAE decode."""
    from .engine import Sample
    from .steploop import StepLoop, prepare

    device = engine.devices["transformer"]
    group, _ = prepare(engine, [Sample(prompt, seed, size, size)], steps)
    (s,) = group.samples
    layout = engine.packed.layout([(1, *s.latents.shape[-2:])], [len(s.positive)])
    x = [s.latents.to(engine.transformer.dtype).unsqueeze(1)]
    one = engine.packed(x, torch.full((1,), 0.5, device=device), [s.positive], layout)[0]
    StepLoop(engine).run_alone(group)
    return Probe(one.float().cpu(), s.latents.float().cpu(), engine.decode_one(s.latents), size, steps, seed)


def forward_error(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """Relative L2 error of ``out`` against ``ref`` over the values finite in both, and the share that is not."""
    finite = torch.isfinite(ref) & torch.isfinite(out)
    rel = float((out[finite] - ref[finite]).norm() / ref[finite].norm().clamp_min(1e-12))
    return rel, float(1 - finite.float().mean())


def psnr_db(ref: np.ndarray, img: np.ndarray) -> float:
    mse = float(np.mean((img.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def compare(reference: Probe, candidate: Probe) -> dict:
    """A model state against the reference (the unquantized, eager model): relative L2 error of one transformer
    forward and of the final latents, the share of non-finite values (random weights can overflow), and the
    decoded image's PSNR."""
    rel, nonfinite = forward_error(reference.forward, candidate.forward)
    lat_rel, lat_nonfinite = forward_error(reference.latents, candidate.latents)
    r = reference
    return {"forward_rel_l2": round(rel, 5), "latents_rel_l2": round(lat_rel, 5),
            "nonfinite_fraction": round(max(nonfinite, lat_nonfinite), 5),
            "image_psnr_db": round(psnr_db(reference.image, candidate.image), 2),
            "probe": f"{r.size}x{r.size}, seed {r.seed}: 1 forward at t=0.5; latents and image after {r.steps} steps"}


# ---- weight-only quantization of the text encoder -------------------------------------------------------------
class WeightOnlyLinear(torch.nn.Module):
    """``nn.Linear`` with its weight stored in one byte (int8 or float8_e4m3, one scale per output row) and
    dequantized to the activation dtype on every call. Halves the weight memory; the text encoder runs once per
    batch, so the dequantization costs little time."""

    def __init__(self, linear: torch.nn.Linear, mode: str):
        super().__init__()
        w = linear.weight.detach().float()
        amax = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
        if mode == "int8":
            scale = amax / 127.0
            q = (w / scale).round().clamp(-127, 127).to(torch.int8)
        elif mode == "fp8":
            scale = amax / FP8_MAX
            q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        else:
            raise ValueError(f"weight-only mode must be 'int8' or 'fp8', got {mode!r}")
        self.mode = mode
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)
        return torch.nn.functional.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def quantize_weight_only(module: torch.nn.Module, mode: str) -> int:
    """Swap every ``nn.Linear`` of ``module`` (the text encoder's attention and MLP projections; its embedding
    stays) for a ``WeightOnlyLinear``, in place. Returns how many."""
    n = _swap_linears(module, lambda m, fqn: isinstance(m, torch.nn.Linear), lambda m: WeightOnlyLinear(m, mode))
    log.info("text encoder: %d linear layers quantized weight-only (%s)", n, mode)
    return n


@torch.no_grad()
def encoder_error(engine, quantize, size: int = 512, steps: int = 9, seed: int = 1234) -> dict:
    """The text encoder's error against its unquantized self: ``quantize()`` runs between two runs of the check
    prompt. Relative L2 of the caption embeddings (what the transformer sees) and the PSNR of the final image
    (``size``, ``steps``, same seed) against the unquantized encoder's."""
    ref = engine.encode([CHECK_PROMPT]).positive[0].float().cpu()
    ref_img = reference_output(engine, size, steps, seed).image
    quantize()
    out = engine.encode([CHECK_PROMPT]).positive[0].float().cpu()
    img = reference_output(engine, size, steps, seed).image
    rel, nonfinite = forward_error(ref, out)
    return {"text_encoder_embed_rel_l2": round(rel, 5), "text_encoder_nonfinite_fraction": round(nonfinite, 5),
            "text_encoder_image_psnr_db": round(psnr_db(ref_img, img), 2),
            "text_encoder_probe": f"{size}x{size}, seed {seed}, {steps} steps, against the unquantized encoder"}
