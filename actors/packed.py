"""One transformer call for any mix of image sizes and caption lengths: samples packed into one token sequence.

``ZImageTransformer2DModel.forward`` pads every sample of a batch to the longest one and, when lengths differ,
gives attention a key-padding mask (slow) and the refiners a padded batch. Here the samples' tokens are
concatenated into one sequence ``[1, T, D]`` with per-sample boundaries (``cu_seqlens``): attention runs per sample
on exactly that sample's tokens (a variable-length kernel, or one dense call when every sample has the same
length), so no sample attends to another, no padding is computed, and nothing depends on the batch-mates.

The math is the diffusers forward's, step for step (patchify -> x embed + pad token -> noise refiner ->
caption embed + pad token -> context refiner -> [image, caption] per sample -> main layers -> final layer ->
unpatchify), using the model's own modules and parameters. What differs is only what is computed once:

- everything that depends on shapes alone (segment ids, RoPE tables, gather indices, boundaries) is built once per
  batch (``PackedLayout``), not at every step;
- the caption path (caption embedder and the unmodulated context refiner) does not depend on the timestep, so it
  runs once per batch (``PackedLayout.caption_cache``) instead of at every step;
- each sample has its own timestep (``t`` has one entry per sample): samples of different sizes follow their own
  sigma schedules (the shift ``mu`` depends on the image's token count).

Per-sample modulation: a block's adaLN output is computed per sample ``[B, 4D]`` and gathered per token by segment
id; under ``torch.compile`` the gather fuses into the elementwise kernels around it.

``tests/test_packed.py`` checks every sample against its solo run through the unmodified diffusers forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

SEQ_MULTI_OF = 32  # the transformer pads captions and image tokens to a multiple of this (diffusers' constant)
ATTENTION_IMPLS = ("auto", "segments", "varlen", "cudnn", "flex", "dense")


def _round_up(n: int, m: int = SEQ_MULTI_OF) -> int:
    return -(-n // m) * m


@dataclass
class Segments:
    """Per-sample boundaries of one packed sequence."""

    lens: list[int]
    cu: torch.Tensor  # int32 [B+1] on the device
    seg: torch.Tensor  # int64 [T]: the sample each token belongs to
    freqs: torch.Tensor  # complex64 [1, T, head_dim/2]: RoPE per token

    @property
    def total(self) -> int:
        return sum(self.lens)

    @property
    def max_len(self) -> int:
        return max(self.lens)

    @property
    def uniform(self) -> bool:
        return len(set(self.lens)) == 1


@dataclass
class PackedLayout:
    """Everything about a packed batch that depends only on its shapes (built once, used at every step)."""

    sizes: list[tuple[int, int, int]]  # per sample latent (F, H, W)
    x_ori: list[int]  # image tokens per sample before padding
    cap_ori: list[int]  # caption tokens per sample before padding
    x: Segments
    cap: Segments
    uni: Segments
    x_pad: torch.Tensor  # bool [Tx, 1]
    cap_pad: torch.Tensor  # bool [Tc, 1]
    uni_index: torch.Tensor  # int64 [Tu]: rows of cat([x, cap]) in unified order ([image_i, caption_i] per sample)
    out_starts: list[int]  # where each sample's image tokens start in the unified sequence
    caption_cache: torch.Tensor | None = field(default=None)  # context-refined captions [1, Tc, D]

    @property
    def tokens(self) -> int:
        return self.uni.total


def packed_tokens(image_tokens: int, caption_tokens: int) -> int:
    """Tokens one sample adds to the packed main-layer sequence (both parts padded to SEQ_MULTI_OF)."""
    return _round_up(image_tokens) + _round_up(caption_tokens)


class PackedTransformer:
    """Runs ``transformer`` (a ``ZImageTransformer2DModel``, possibly with fp8 linears) on packed batches.

    ``attention``: ``segments`` (one SDPA call per sample; the reference, and the CPU path), ``varlen`` (torch's
    variable-length flash attention), ``cudnn`` (cuDNN's ragged SDPA), ``flex`` (flex_attention with a document
    mask), ``dense`` (SDPA over ``[B, L]`` when every sample has the same length, else ``varlen``), or ``auto``
    (``dense`` for equal lengths and ``varlen`` otherwise on CUDA; ``segments`` on the CPU)."""

    def __init__(self, transformer, attention: str = "auto", patch_size: int = 2, f_patch_size: int = 1):
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
        self.model = transformer
        self.attention = attention
        self.patch = patch_size
        self.f_patch = f_patch_size
        self.key = f"{patch_size}-{f_patch_size}"
        self.block_fn = _block_forward  # replaced by a compiled version by ``compile()``
        self.compiled = False

    @property
    def device(self) -> torch.device:
        return self.model.x_pad_token.device

    # ---- layout -----------------------------------------------------------------------------------------
    def _segments(self, pos_ids: list[torch.Tensor], lens: list[int]) -> Segments:
        device = self.device
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
        seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        freqs = self.model.rope_embedder(torch.cat(pos_ids, dim=0).to(device)).unsqueeze(0)
        return Segments(lens, cu.to(device), seg.to(device), freqs)

    def layout(self, latent_shapes: list[tuple[int, int, int]], caption_lens: list[int]) -> PackedLayout:
        """``latent_shapes``: per sample (F, H, W) of its latent; ``caption_lens``: its caption's token count."""
        pH = pW = self.patch
        pF = self.f_patch
        grid = self.model.create_coordinate_grid
        x_pos, cap_pos, x_lens, cap_lens, x_ori = [], [], [], [], []
        x_pad, cap_pad = [], []
        for (f, h, w), c in zip(latent_shapes, caption_lens):
            c_len = _round_up(c)
            # positions exactly as ZImageTransformer2DModel.patchify_and_embed / _pad_with_ids build them
            cap_pos.append(grid((c_len, 1, 1), (1, 0, 0)).flatten(0, 2))
            cap_pad.append(torch.arange(c_len) >= c)
            ft, ht, wt = f // pF, h // pH, w // pW
            n = ft * ht * wt
            n_pad = _round_up(n)
            ids = grid((ft, ht, wt), (c_len + 1, 0, 0)).flatten(0, 2)
            if n_pad > n:
                ids = torch.cat([ids, grid((1, 1, 1), (0, 0, 0)).flatten(0, 2).repeat(n_pad - n, 1)])
            x_pos.append(ids)
            x_pad.append(torch.arange(n_pad) >= n)
            x_lens.append(n_pad)
            cap_lens.append(c_len)
            x_ori.append(n)
        tx = sum(x_lens)
        # unified order: [image_0, caption_0, image_1, caption_1, ...] as rows of cat([x, cap])
        index, out_starts, xo, co, pos = [], [], 0, 0, 0
        for xl, cl in zip(x_lens, cap_lens):
            out_starts.append(pos)
            index.append(torch.arange(xo, xo + xl))
            index.append(torch.arange(tx + co, tx + co + cl))
            xo, co, pos = xo + xl, co + cl, pos + xl + cl
        uni_pos = [torch.cat([a, b]) for a, b in zip(x_pos, cap_pos)]
        device = self.device
        return PackedLayout(
            sizes=list(latent_shapes), x_ori=x_ori, cap_ori=list(caption_lens),
            x=self._segments(x_pos, x_lens), cap=self._segments(cap_pos, cap_lens),
            uni=self._segments(uni_pos, [a + b for a, b in zip(x_lens, cap_lens)]),
            x_pad=torch.cat(x_pad).unsqueeze(-1).to(device), cap_pad=torch.cat(cap_pad).unsqueeze(-1).to(device),
            uni_index=torch.cat(index).to(device), out_starts=out_starts,
        )

    # ---- forward -----------------------------------------------------------------------------------------
    def _impl(self, segs: Segments) -> str:
        impl = self.attention
        if impl == "auto":
            impl = "dense" if self.device.type == "cuda" else "segments"
        if impl == "dense" and not segs.uniform:
            impl = "varlen" if self.device.type == "cuda" else "segments"
        return impl

    def _blocks(self, blocks, x, adaln, segs: Segments):
        impl = self._impl(segs)
        lens = segs.lens if impl == "segments" else None
        mask = _flex_mask(segs) if impl == "flex" else None
        for block in blocks:
            x = self.block_fn(block, x, segs.seg, adaln, segs.freqs, segs.cu, segs.max_len, len(segs.lens), impl,
                              lens, mask)
        return x

    def captions(self, layout: PackedLayout, cap_feats: list[torch.Tensor]) -> torch.Tensor:
        """The caption path (embedder + context refiner): independent of the timestep, so computed once."""
        if layout.caption_cache is None:
            m = self.model
            dim = cap_feats[0].shape[-1]
            padded = [torch.cat([c, c.new_zeros(cl - len(c), dim)]) if cl > len(c) else c
                      for c, cl in zip(cap_feats, layout.cap.lens)]
            cap = m.cap_embedder(torch.cat(padded, dim=0))
            cap = torch.where(layout.cap_pad, m.cap_pad_token, cap).unsqueeze(0)
            layout.caption_cache = self._blocks(m.context_refiner, cap, None, layout.cap)
        return layout.caption_cache

    def patchify(self, layout: PackedLayout, latents: list[torch.Tensor]) -> torch.Tensor:
        pH = pW = self.patch
        pF = self.f_patch
        parts = []
        for img, n, n_pad in zip(latents, layout.x_ori, layout.x.lens):
            c, f, h, w = img.shape
            p = img.view(c, f // pF, pF, h // pH, pH, w // pW, pW).permute(1, 3, 5, 2, 4, 6, 0).reshape(n, -1)
            parts.append(p)
            if n_pad > n:  # the pad rows are replaced by the pad token after embedding; their values do not matter
                parts.append(p[-1:].expand(n_pad - n, -1))
        return torch.cat(parts, dim=0)

    def __call__(self, latents: list[torch.Tensor], t: torch.Tensor, cap_feats: list[torch.Tensor],
                 layout: PackedLayout) -> list[torch.Tensor]:
        """``latents``: per sample ``[C, F, H, W]`` in the transformer's dtype; ``t``: ``[B]`` (diffusers'
        normalized timestep, before ``t_scale``); ``cap_feats``: per sample ``[L_i, cap_feat_dim]``. Returns the
        per-sample outputs ``[C, F, H, W]``, as ``ZImageTransformer2DModel.forward`` does."""
        m = self.model
        adaln = m.t_embedder(t * m.t_scale).type_as(latents[0])
        x = m.all_x_embedder[self.key](self.patchify(layout, latents))
        x = torch.where(layout.x_pad, m.x_pad_token, x).unsqueeze(0)
        x = self._blocks(m.noise_refiner, x, adaln, layout.x)
        cap = self.captions(layout, cap_feats)
        unified = torch.cat([x, cap], dim=1).index_select(1, layout.uni_index)
        unified = self._blocks(m.layers, unified, adaln, layout.uni)
        final = m.all_final_layer[self.key]
        scale = (1.0 + final.adaLN_modulation(adaln))[layout.uni.seg].unsqueeze(0)
        out = final.linear(final.norm_final(unified) * scale)[0]
        return self.unpatchify(layout, out)

    def unpatchify(self, layout: PackedLayout, out: torch.Tensor) -> list[torch.Tensor]:
        pH = pW = self.patch
        pF = self.f_patch
        c = self.model.out_channels
        res = []
        for (f, h, w), start, n in zip(layout.sizes, layout.out_starts, layout.x_ori):
            res.append(out[start:start + n].view(f // pF, h // pH, w // pW, pF, pH, pW, c)
                       .permute(6, 0, 3, 1, 4, 2, 5).reshape(c, f, h, w))
        return res

    # ---- compile -----------------------------------------------------------------------------------------
    def compile(self, **kw) -> None:
        """Compile the block function once for every block (the blocks share code; parameters are inputs) with
        dynamic shapes, so any packed length runs the same graphs."""
        kw.setdefault("fullgraph", True)
        kw.setdefault("dynamic", True)
        self.block_fn = torch.compile(_block_forward, **kw)
        self.compiled = True


# ---- the block, mirroring ZImageTransformerBlock.forward + ZSingleStreamAttnProcessor on a packed sequence --
def _rope(x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
    return torch.view_as_real(x * freqs_cis.unsqueeze(2)).flatten(3).type_as(x_in)


def _attend(q, k, v, cu, max_len: int, n: int, impl: str, lens, mask):
    """q, k, v: [1, T, H, d] -> [1, T, H, d]; attention within each sample's segment."""
    if impl == "dense":  # every segment has the same length: [B, L] without a mask
        b = n
        qd, kd, vd = (t.reshape(b, -1, *t.shape[2:]).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qd, kd, vd).transpose(1, 2).reshape(q.shape)
    if impl == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q[0], k[0], v[0], cu, cu, max_len, max_len).unsqueeze(0)
    if impl == "cudnn":
        out = torch.ops.aten._cudnn_attention_forward(q[0], k[0], v[0], None, cu, cu, max_len, max_len, False, 0.0,
                                                      False, False)[0]
        return out.unsqueeze(0)
    if impl == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              block_mask=mask).transpose(1, 2)
    # segments: one SDPA per sample (exactly a solo run's attention)
    outs, s = [], 0
    for n_tok in lens:
        qs, ks, vs = (t[:, s:s + n_tok].transpose(1, 2) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2))
        s += n_tok
    return torch.cat(outs, dim=1)


def _flex_mask(segs: Segments):
    from torch.nn.attention.flex_attention import create_block_mask

    seg = segs.seg

    def same_sample(b, h, q_idx, kv_idx):
        return seg[q_idx] == seg[kv_idx]

    return create_block_mask(same_sample, None, None, segs.total, segs.total, device=seg.device)


def _attention(attn, x, freqs, cu, max_len, n, impl, lens, mask):
    q = attn.to_q(x).unflatten(-1, (attn.heads, -1))
    k = attn.to_k(x).unflatten(-1, (attn.heads, -1))
    v = attn.to_v(x).unflatten(-1, (attn.heads, -1))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if freqs is not None:
        q, k = _rope(q, freqs), _rope(k, freqs)
    dtype = q.dtype
    out = _attend(q, k.to(dtype), v, cu, max_len, n, impl, lens, mask).flatten(2, 3).to(dtype)
    return attn.to_out[0](out)


def _block_forward(block, x, seg, adaln, freqs, cu, max_len: int, n: int, impl: str, lens, mask):
    if block.modulation:
        mod = block.adaLN_modulation(adaln)  # [B, 4D]: per sample
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=1)
        scale_msa, gate_msa = (1.0 + scale_msa)[seg], gate_msa.tanh()[seg]
        scale_mlp, gate_mlp = (1.0 + scale_mlp)[seg], gate_mlp.tanh()[seg]
        attn_out = _attention(block.attention, block.attention_norm1(x) * scale_msa, freqs, cu, max_len, n, impl,
                              lens, mask)
        x = x + gate_msa * block.attention_norm2(attn_out)
        return x + gate_mlp * block.ffn_norm2(block.feed_forward(block.ffn_norm1(x) * scale_mlp))
    attn_out = _attention(block.attention, block.attention_norm1(x), freqs, cu, max_len, n, impl, lens, mask)
    x = x + block.attention_norm2(attn_out)
    return x + block.ffn_norm2(block.feed_forward(block.ffn_norm1(x)))
