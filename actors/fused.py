"""Fused projections: a block's q, k and v linears as one ``[3D, D]`` linear, and its feed-forward's w1 and w3 (the
SwiGLU gate and up projections) as one ``[2F, D]`` linear, so each reads its input once in one GEMM launch instead
of three or two.

The weights are concatenated once, after the transformer is on its device (``fuse_projections``). The original
linears stay in place as modules whose weights are row views of the fused one: nothing is held twice, diffusers'
own forward (tests, the reference probes) still runs, and per-request LoRA still finds each module by name and
shape (``actors/lora.py``). The packed forward (``actors/packed.py`` ``_attention``, ``_feed_forward``) uses the
fused linear where a module has one and applies LoRA's per-sample deltas to the split outputs.

Exactness: each output column of a fused GEMM is the same dot product as in the unfused one, so the results differ
only where the GEMM kernel sums in another order. fp8 (``actors/quantize.py``) quantizes the fused linear and
points the parts at its rows: its weight scales are per output row and its activation scales per token, so the
fused float8 matmul is the separate ones side by side, in one kernel.

A fused model must not be moved with ``.to()`` afterwards: each parameter would be copied on its own and the views
would become copies (the fused weights twice in memory).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

BLOCK_GROUPS = ("layers", "noise_refiner", "context_refiner")
# (child of the block, the fused linear's name on that child, the linears it replaces in output order)
FUSIONS = (("attention", "to_qkv", ("to_q", "to_k", "to_v")), ("feed_forward", "w13", ("w1", "w3")))


def _blocks(transformer):
    for group in BLOCK_GROUPS:
        yield from getattr(transformer, group, ())


def fuse_projections(transformer: torch.nn.Module) -> int:
    """Fuse q/k/v and w1/w3 in every block of ``transformer`` (a ``ZImageTransformer2DModel``), in place, one
    layer at a time (the peak is one fused layer's copy). Returns how many fused linears it made; 0 when already
    fused or when the linears are not plain ``nn.Linear`` (already quantized: fuse before quantizing)."""
    n = 0
    for block in _blocks(transformer):
        for child, name, parts in FUSIONS:
            parent = getattr(block, child, None)
            if parent is not None and _fuse(parent, name, parts):
                n += 1
    if n:
        log.info("fused projections: %d linears (q/k/v and w1/w3 of each block)", n)
    return n


def is_fused(transformer: torch.nn.Module) -> bool:
    return any(hasattr(getattr(b, child, None), name) for b in _blocks(transformer) for child, name, _ in FUSIONS)


def _fuse(parent: torch.nn.Module, name: str, parts: tuple[str, ...]) -> bool:
    if name in parent._modules:
        return False
    lins = [getattr(parent, p, None) for p in parts]
    if not all(type(m) is torch.nn.Linear for m in lins):
        return False
    if len({m.in_features for m in lins}) != 1 or len({m.bias is None for m in lins}) != 1:
        return False
    with torch.no_grad():
        weight = torch.cat([m.weight for m in lins])
        bias = None if lins[0].bias is None else torch.cat([m.bias for m in lins])
    fused = torch.nn.Linear(lins[0].in_features, weight.shape[0], bias=bias is not None, device="meta")
    fused.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = torch.nn.Parameter(bias, requires_grad=False)
    parent.add_module(name, fused)
    repoint(parent, name)
    return True


def fused_parts(parent: torch.nn.Module, name: str) -> tuple[str, ...] | None:
    """The names of the linears that ``parent.<name>`` fuses, or None when ``name`` is no fused linear there."""
    for _, fused, parts in FUSIONS:
        if fused == name and name in parent._modules:
            return parts
    return None


def is_part(parent: torch.nn.Module, child: str) -> bool:
    """Whether ``parent.<child>`` is a view of a fused linear on ``parent`` (quantizing it would copy its rows)."""
    return any(child in parts and fused in parent._modules for _, fused, parts in FUSIONS)


def repoint(parent: torch.nn.Module, name: str) -> None:
    """Make each part of ``parent.<name>`` a module over its rows of the fused linear (an ``nn.Linear`` or an
    ``actors.quantize.Fp8Linear``, which knows how to give its rows), sharing its storage."""
    fused = getattr(parent, name)
    start = 0
    for part in fused_parts(parent, name) or ():
        n = getattr(parent, part).out_features
        setattr(parent, part, rows_of(fused, start, start + n))
        start += n
    if start != fused.out_features:
        raise ValueError(f"fused linear {name!r}: its parts have {start} rows, it has {fused.out_features}")


def rows_of(fused: torch.nn.Module, start: int, stop: int) -> torch.nn.Module:
    if hasattr(fused, "rows"):
        return fused.rows(start, stop)
    if not isinstance(fused, torch.nn.Linear):
        raise TypeError(f"cannot take rows of a {type(fused).__name__}")
    lin = torch.nn.Linear(fused.in_features, stop - start, bias=fused.bias is not None, device="meta")
    lin.weight = torch.nn.Parameter(fused.weight[start:stop], requires_grad=False)
    if fused.bias is not None:
        lin.bias = torch.nn.Parameter(fused.bias[start:stop], requires_grad=False)
    return lin
