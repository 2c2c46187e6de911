"""The transformer's lossy option at start-up (fp8, with chosen blocks kept in bf16) and its accuracy bound.

The bound (``actors/quantize.py`` ``reference_output`` / ``compare``): a fixed prompt and seed through the model
before the option (eager, bf16: the reference) and after it, on the same inputs: relative L2 of one
transformer forward and of the final latents after 9 steps, and the PSNR of the decoded image. The replica
measures it at start-up for what it is configured with and reports it in its health (``numerics``);
``benchmarks/roofline.py --accuracy`` measures every option side by side on the full-size model.

What a bound measured on random weights can tell: how far the option moves the arithmetic of this architecture at
this size (rounding, overflow, the error each block adds and how it grows over 30 blocks and 9 steps), and whether
it stays within a stated bound from one tree to the next. What it cannot tell: how much a real image changes.
Trained weights have outlier channels and activation ranges that random ones lack (per-row float8 scales suffer
from exactly those), and the 9-step schedule of a trained model contracts towards the data while a random one's
need not, so an error can be larger or smaller with real weights; and a relative L2 or PSNR says nothing of which
changes a viewer would see. vLLM-Omni found Z-Image-Turbo's images turn to noise with every block in fp8 and keeps
the last 15 of its 30 main blocks in bf16: a fact about the trained weights that no random-weight number shows.
"""

from __future__ import annotations

from typing import NamedTuple


class Bound(NamedTuple):
    """The most an option may move the probe against the eager bf16 model (``quantize.compare``)."""

    forward_rel_l2: float
    latents_rel_l2: float
    image_psnr_db: float  # at least


# Each lossy option's stated bound on random weights, whatever the probe's size. Measured on one H100 at 1024x1024
# (docs/benchmarks.md, "Accuracy of each option"): compiled bf16 0.0141 / 0.0031 / 48.4 dB; fp8, every block 0.0635 /
# 0.0152 / 45.2 dB (the last 15 main blocks in bf16: 0.0554 / 0.0132 / 45.8). A bound is about twice the measured
# error and 6 dB of PSNR below it: room for another card, size and kernel choice, and tight enough that a broken
# path (a wrong scale, a block left out, a compiled graph that computes something else) fails it. Keeping blocks in
# bf16 only lowers fp8's error, so every fp8 option has fp8's bound.
BOUNDS = {"bf16": Bound(0.03, 0.01, 42.0), "fp8": Bound(0.13, 0.035, 39.0)}


def within(result: dict, bound: Bound) -> bool:
    """Whether a ``quantize.compare`` result is within ``bound``, with nothing non-finite."""
    return (result["nonfinite_fraction"] == 0 and result["forward_rel_l2"] <= bound.forward_rel_l2
            and result["latents_rel_l2"] <= bound.latents_rel_l2 and result["image_psnr_db"] >= bound.image_psnr_db)


def option_label(fp8: bool, bf16_blocks=(), n_layers: int = 30, compiled: bool = False) -> str:
    """A short name of a model state, as the start-up probe and the roofline's accuracy table print it."""
    parts = ["fp8" if fp8 else "bf16"]
    if fp8:
        parts.append(_blocks_label(list(bf16_blocks), n_layers))
    parts.append("compiled" if compiled else "eager")
    return ", ".join(parts)


def _blocks_label(blocks: list[int], n_layers: int) -> str:
    if not blocks:
        return "every block in fp8"
    if len(blocks) == 1:
        return f"main block {blocks[0]} in bf16"
    if blocks == list(range(n_layers - len(blocks), n_layers)):
        return f"main blocks {blocks[0]}-{blocks[-1]} (last {len(blocks)}) in bf16"
    if blocks == list(range(len(blocks))):
        return f"main blocks 0-{blocks[-1]} (first {len(blocks)}) in bf16"
    return f"main blocks {blocks} in bf16"


def apply_transformer_options(engine, cfg) -> dict:
    """fp8 on ``engine``'s transformer as ``cfg`` (a ``ModelConfig``) asks, in place, before any compile. With fp8,
    returns the accuracy of the configured option against the model before it (eager, bf16), with ``option``
    naming it, its stated ``bound`` and whether it is ``within_bound``; without fp8 (nothing lossy before the
    compile) an empty dict."""
    from .quantize import compare, quantize_fp8, reference_output, resolve_bf16_blocks

    transformer = engine.transformer
    fp8 = cfg.quantization == "fp8"
    n_layers = len(transformer.layers)
    blocks = resolve_bf16_blocks(cfg.fp8_bf16_blocks, n_layers) if fp8 else []
    reference = reference_output(engine) if fp8 else None
    if not fp8:
        return {}
    quantize_fp8(transformer, bf16_blocks=blocks)
    out = compare(reference, reference_output(engine))
    out["option"] = option_label(True, blocks, n_layers)
    out["bound"] = BOUNDS["fp8"]._asdict()
    out["within_bound"] = within(out, BOUNDS["fp8"])
    return out
