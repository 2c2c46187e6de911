"""ControlNet (diffusers 0.42's ``ZImageControlNetModel``, the Fun-ControlNet-Union family) on a packed batch.

``ZImageControlNetModel.from_transformer`` shares the transformer's embedders, refiners, RoPE and pad tokens, so the
control tokens follow the packed image tokens' layout (``layout.x``) and the unified sequence the transformer's
(``layout.uni``); a control block is a main block (``packed._block_forward``) between ``before_proj`` (block 0: ``c =
before_proj(c) + x``) and ``after_proj`` (the hint). ``controlled_forward`` is ``PackedTransformer.__call__`` with the
hints added after the layers of ``control_layers_places``, each times its sample's conditioning scale (0 for a sample
without a control image, which is then exactly unaffected). With ``add_control_noise_refiner`` set, control blocks
also run at the refiner level, their hints added inside the ControlNet's own noise-refiner pass, as diffusers does.
``tests/test_controlnet.py`` checks it against ``ZImageControlNetPipeline``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .packed import PackedLayout, PackedTransformer

# The full-size layout used for random weights (timing): ZImageControlNetModel's defaults with the 1.0 Union
# layout of control blocks after every fifth main layer.
FULL_CONTROLNET_CONFIG = {"control_layers_places": [0, 5, 10, 15, 20, 25], "control_in_dim": 16,
                          "n_refiner_layers": 2, "dim": 3840, "n_heads": 30, "n_kv_heads": 30}
TINY_CONTROLNET_CONFIG = {"control_layers_places": [0, 1], "control_in_dim": 16, "n_refiner_layers": 1, "dim": 64,
                          "n_heads": 2, "n_kv_heads": 2}


def build_controlnet(size: str, transformer, device="cpu", dtype=None, seed: int = 0, **overrides):
    """A ``ZImageControlNetModel`` with random weights, attached to ``transformer`` (``from_transformer``). The
    zero-initialised projections get small random values in the tiny one, so tests see real hints."""
    from diffusers import ZImageControlNetModel

    from .models import _default_dtype

    cfg = {**(TINY_CONTROLNET_CONFIG if size == "tiny" else FULL_CONTROLNET_CONFIG), **overrides}
    dtype = dtype or transformer.dtype
    torch.manual_seed(seed)
    with _default_dtype(dtype), torch.device(device):
        cn = ZImageControlNetModel(**cfg).eval().requires_grad_(False)
    if size == "tiny":
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for p in cn.parameters():
                if p.abs().sum() == 0:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.05)
    return ZImageControlNetModel.from_transformer(cn, transformer)


@dataclass
class PackedControl:
    """One step's ControlNet input for a packed batch, in the transformer call's sample order: per sample control
    latents ``[control_in_dim, 1, h, w]`` (zeros for a sample without control) and its scale (0 without)."""

    model: object
    latents: list
    scale: torch.Tensor  # [B] float
    # (layout, control tokens, per-token scales): the same every step of one layout, so computed at its first step
    embedded: tuple | None = field(default=None, repr=False)

    @classmethod
    def build(cls, controlnet, controls: list, scales: list, latent_hw: list, device, dtype) -> PackedControl | None:
        """The batch's input, in the call's sample order: ``controls`` per sample its control latents
        ``[C, 1, h, w]`` or None, ``scales`` its scale, ``latent_hw`` its latent (h, w); a sample without control
        gets zeros and scale 0. None when no sample has control."""
        if all(c is None for c in controls):
            return None
        if controlnet is None:
            raise ValueError("a control image was sent to an engine without a ControlNet")
        ref = next(c for c in controls if c is not None)
        ctl = [c if c is not None else ref.new_zeros(ref.shape[0], 1, *hw) for c, hw in zip(controls, latent_hw)]
        scale = torch.tensor([float(s) if c is not None else 0.0 for c, s in zip(controls, scales)])
        return cls(controlnet, [c.to(device, dtype) for c in ctl], scale.to(device))

    def embed(self, packed: PackedTransformer, layout: PackedLayout, dtype) -> tuple:
        """The control latents as tokens (``control_all_x_embedder``, pad rows as the pad token) and each token's
        scale on the image and the unified sequence."""
        if self.embedded is None or self.embedded[0] is not layout:
            m, cn = packed.model, self.model
            c = cn.control_all_x_embedder[packed.key](packed.patchify(layout, [lat.to(dtype) for lat in self.latents]))
            c = torch.where(layout.x_pad, m.x_pad_token, c).unsqueeze(0)
            scale = self.scale.to(c.device, dtype)
            self.embedded = (layout, c, scale[layout.x.seg].view(1, -1, 1), scale[layout.uni.seg].view(1, -1, 1))
        return self.embedded[1:]


def _mark(packed: PackedTransformer, segs, adaln) -> None:
    """As ``PackedTransformer._blocks``: under torch.compile no graph is specialized for one sample or one run."""
    if packed.compiled:
        torch._dynamo.decorators.mark_unbacked(segs.runs, 0)
        torch._dynamo.decorators.mark_unbacked(adaln, 0)


def _control_blocks(packed: PackedTransformer, blocks, c, x, adaln, segs):
    """Control blocks over ``c`` (block 0 adds ``before_proj(c)`` to ``x``): returns (hints, c)."""
    _mark(packed, segs, adaln)
    hints = []
    for block in blocks:
        if block.block_id == 0:
            c = block.before_proj(c) + x
        c = packed.block_fn(block, c, segs.seg, adaln, segs.freqs, segs.runs)
        hints.append(block.after_proj(c))
    return hints, c


@torch.no_grad()
def controlled_forward(packed: PackedTransformer, latents: list[torch.Tensor], t: torch.Tensor,
                       cap_feats: list[torch.Tensor], layout: PackedLayout, control: PackedControl):
    """``PackedTransformer.__call__`` with ControlNet hints (same arguments and result). Per-request LoRA
    (``layout.lora``) applies to the transformer's own blocks and caption refiner, as on the plain path; the
    ControlNet's own blocks carry no adapters."""
    m, cn = packed.model, control.model
    adaln = m.t_embedder(t * m.t_scale).type_as(latents[0])
    x0 = m.all_x_embedder[packed.key](packed.patchify(layout, latents))
    x0 = torch.where(layout.x_pad, m.x_pad_token, x0).unsqueeze(0)
    c, scale_x, scale_u = control.embed(packed, layout, x0.dtype)
    cap = packed.captions(layout, cap_feats)

    lora = layout.lora
    x = packed._blocks(m.noise_refiner, x0, adaln, layout.x, lora, "noise_refiner")  # the transformer's own
    variant = cn.add_control_noise_refiner
    if variant is None:
        c = packed._blocks(cn.control_noise_refiner, c, adaln, layout.x)
        cn_x = x
    else:
        blocks = cn.control_layers if variant == "control_layers" else cn.control_noise_refiner
        hints, c = _control_blocks(packed, blocks, c, x0, adaln, layout.x)
        refiner_hints = {idx: hints[k] for k, idx in enumerate(cn.control_refiner_layers_places)}
        cn_x = packed._blocks(m.noise_refiner, x0, adaln, layout.x, lora, "noise_refiner", refiner_hints, scale_x)
    unified = torch.cat([x, cap], dim=1).index_select(1, layout.uni_index)
    cn_unified = unified if cn_x is x else torch.cat([cn_x, cap], dim=1).index_select(1, layout.uni_index)
    c = torch.cat([c, cap], dim=1).index_select(1, layout.uni_index)
    hints, _ = _control_blocks(packed, cn.control_layers, c, cn_unified, adaln, layout.uni)
    main_hints = {idx: hints[k] for k, idx in enumerate(cn.control_layers_places)}
    unified = packed._blocks(m.layers, unified, adaln, layout.uni, lora, "layers", main_hints, scale_u)
    return packed.final(layout, unified, adaln)


def forward(packed: PackedTransformer, latents: list[torch.Tensor], t: torch.Tensor, cap_feats: list[torch.Tensor],
            layout: PackedLayout, control: PackedControl | None) -> list[torch.Tensor]:
    """One packed transformer call, with ControlNet hints when ``control`` is given."""
    if control is None:
        return packed(latents, t, cap_feats, layout)
    return controlled_forward(packed, latents, t, cap_feats, layout, control)
