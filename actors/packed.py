"""One transformer call for any mix of image sizes and caption lengths: samples packed into one token sequence.

``ZImageTransformer2DModel.forward`` pads every sample of a batch to the longest one and, when lengths differ,
gives attention a key-padding mask (slow) and the refiners a padded batch. Here the samples' tokens are
concatenated into one sequence ``[1, T, D]`` with per-sample boundaries: attention runs per sample on exactly that
sample's tokens (one dense call per sample, ``run_attention``), so no sample attends to another, no padding is
computed, and nothing depends on the batch-mates.

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
from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF  # padding multiple of both parts


def _round_up(n: int, m: int = SEQ_MULTI_OF) -> int:
    return -(-n // m) * m


@dataclass
class Segments:
    """Per-sample boundaries of one packed sequence (in packing order)."""

    lens: list[int]
    seg: torch.Tensor  # int64 [T]: the sample (in the caller's order) each token belongs to
    freqs: torch.Tensor  # complex64 [1, T, head_dim/2]: RoPE per token
    runs: torch.Tensor  # int64 [R, 3] on the CPU: runs of consecutive equal lengths (``equal_runs``)

    @property
    def total(self) -> int:
        return sum(self.lens)


@dataclass
class PackedLayout:
    """Everything about a packed batch that depends only on its shapes (built once, used at every step).

    Samples are packed longest first, so samples of equal length sit next to each other and attention runs one
    dense call per run of them; ``order`` maps packing position -> the caller's sample index."""

    order: list[int]
    sizes: list[tuple[int, int, int]]  # per sample (caller's order) latent (F, H, W)
    x_ori: list[int]  # image tokens per sample (caller's order) before padding
    x: Segments
    cap: Segments
    uni: Segments
    x_pad: torch.Tensor  # bool [Tx, 1]
    cap_pad: torch.Tensor  # bool [Tc, 1]
    uni_index: torch.Tensor  # int64 [Tu]: rows of cat([x, cap]) in unified order ([image_i, caption_i] per sample)
    out_starts: list[int]  # per sample (caller's order): where its image tokens start in the unified sequence
    caption_cache: torch.Tensor | None = field(default=None)  # context-refined captions [1, Tc, D]
    lora: object | None = field(default=None)  # ``actors.lora.BatchLora``: each sample's adapters, or None

    @property
    def tokens(self) -> int:
        return self.uni.total


class PackedTransformer:
    """Runs ``transformer`` (a ``ZImageTransformer2DModel``, possibly with fp8 linears) on packed batches, attention
    one dense SDPA call per sample (``run_attention``)."""

    def __init__(self, transformer, patch_size: int = 2, f_patch_size: int = 1):
        self.model = transformer
        self.patch = patch_size
        self.f_patch = f_patch_size
        self.key = f"{patch_size}-{f_patch_size}"
        self.block_fn = _block_forward  # replaced by a compiled version by ``compile()``
        self.compiled = False

    @property
    def device(self) -> torch.device:
        return self.model.x_pad_token.device

    # ---- layout -----------------------------------------------------------------------------------------
    def _segments(self, pos_ids: list[torch.Tensor], lens: list[int], order: list[int]) -> Segments:
        device = self.device
        seg = torch.repeat_interleave(torch.tensor(order), torch.tensor(lens))
        freqs = self.model.rope_embedder(torch.cat(pos_ids, dim=0).to(device)).unsqueeze(0)
        return Segments(lens, seg.to(device), freqs, equal_runs(lens))

    def layout(self, latent_shapes: list[tuple[int, int, int]], caption_lens: list[int]) -> PackedLayout:
        """``latent_shapes``: per sample (F, H, W) of its latent; ``caption_lens``: its caption's token count."""
        pH = pW = self.patch
        pF = self.f_patch
        grid = self.model.create_coordinate_grid
        n_img = [(f // pF) * (h // pH) * (w // pW) for f, h, w in latent_shapes]
        order = sorted(range(len(n_img)), key=lambda i: (-(_round_up(n_img[i]) + _round_up(caption_lens[i])),
                                                         -_round_up(n_img[i]), i))
        x_pos, cap_pos, x_lens, cap_lens, x_pad, cap_pad = [], [], [], [], [], []
        for i in order:
            (f, h, w), c, n = latent_shapes[i], caption_lens[i], n_img[i]
            c_len, n_pad = _round_up(c), _round_up(n)
            # positions exactly as ZImageTransformer2DModel.patchify_and_embed / _pad_with_ids build them
            cap_pos.append(grid((c_len, 1, 1), (1, 0, 0)).flatten(0, 2))
            cap_pad.append(torch.arange(c_len) >= c)
            ids = grid((f // pF, h // pH, w // pW), (c_len + 1, 0, 0)).flatten(0, 2)
            if n_pad > n:
                ids = torch.cat([ids, grid((1, 1, 1), (0, 0, 0)).flatten(0, 2).repeat(n_pad - n, 1)])
            x_pos.append(ids)
            x_pad.append(torch.arange(n_pad) >= n)
            x_lens.append(n_pad)
            cap_lens.append(c_len)
        tx = sum(x_lens)
        # unified order: [image, caption] per sample, as rows of cat([x, cap])
        index, out_starts, xo, co, pos = [], [0] * len(order), 0, 0, 0
        for k, (xl, cl) in enumerate(zip(x_lens, cap_lens)):
            out_starts[order[k]] = pos
            index.append(torch.arange(xo, xo + xl))
            index.append(torch.arange(tx + co, tx + co + cl))
            xo, co, pos = xo + xl, co + cl, pos + xl + cl
        uni_pos = [torch.cat([a, b]) for a, b in zip(x_pos, cap_pos)]
        device = self.device
        return PackedLayout(
            order=order, sizes=list(latent_shapes), x_ori=n_img,
            x=self._segments(x_pos, x_lens, order), cap=self._segments(cap_pos, cap_lens, order),
            uni=self._segments(uni_pos, [a + b for a, b in zip(x_lens, cap_lens)], order),
            x_pad=torch.cat(x_pad).unsqueeze(-1).to(device), cap_pad=torch.cat(cap_pad).unsqueeze(-1).to(device),
            uni_index=torch.cat(index).to(device), out_starts=out_starts,
        )

    # ---- forward -----------------------------------------------------------------------------------------
    def _blocks(self, blocks, x, adaln, segs: Segments, lora=None, group: str = "", hints: dict | None = None,
                hint_scale: torch.Tensor | None = None):
        """``blocks`` over the packed ``x``; ``lora``/``group``: the layout's per-sample adapters; ``hints``: block
        index -> a ControlNet hint added (times ``hint_scale``) after that block (actors/controlnet.py)."""
        if lora is not None:  # per-sample LoRA (actors/lora.py): the rows' scales, and the adaLN input with them
            rows = lora.rows(segs.seg)
            adaln_lora = None if adaln is None else torch.cat([adaln, lora.scales], dim=1)
        if self.compiled:  # no graph specialized for one sample or one run: sizes of 1 are ordinary sizes
            torch._dynamo.decorators.mark_unbacked(segs.runs, 0)
            for a in (adaln, adaln_lora if lora is not None else None):
                if a is not None:
                    torch._dynamo.decorators.mark_unbacked(a, 0)
        for i, block in enumerate(blocks):
            factors = None if lora is None else lora.blocks.get(f"{group}.{i}")
            if factors is None:
                x = self.block_fn(block, x, segs.seg, adaln, segs.freqs, segs.runs)
            else:
                x = self.block_fn(block, x, segs.seg, adaln_lora, segs.freqs, segs.runs, (rows, factors))
            if hints is not None and i in hints:
                x = x + hints[i] * hint_scale
        return x

    def captions(self, layout: PackedLayout, cap_feats: list[torch.Tensor]) -> torch.Tensor:
        """The caption path (embedder + context refiner): independent of the timestep, so computed once."""
        if layout.caption_cache is None:
            m = self.model
            dim = cap_feats[0].shape[-1]
            padded = []
            for i, cl in zip(layout.order, layout.cap.lens):
                c = cap_feats[i]
                padded.append(torch.cat([c, c.new_zeros(cl - len(c), dim)]) if cl > len(c) else c)
            cap = m.cap_embedder(torch.cat(padded, dim=0))
            cap = torch.where(layout.cap_pad, m.cap_pad_token, cap).unsqueeze(0)
            layout.caption_cache = self._blocks(m.context_refiner, cap, None, layout.cap, layout.lora,
                                                "context_refiner")
        return layout.caption_cache

    def patchify(self, layout: PackedLayout, latents: list[torch.Tensor]) -> torch.Tensor:
        pH = pW = self.patch
        pF = self.f_patch
        parts = []
        for i, n_pad in zip(layout.order, layout.x.lens):
            img, n = latents[i], layout.x_ori[i]
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
        x = self._blocks(m.noise_refiner, x, adaln, layout.x, layout.lora, "noise_refiner")
        cap = self.captions(layout, cap_feats)
        unified = torch.cat([x, cap], dim=1).index_select(1, layout.uni_index)
        unified = self._blocks(m.layers, unified, adaln, layout.uni, layout.lora, "layers")
        return self.final(layout, unified, adaln)

    def final(self, layout: PackedLayout, unified: torch.Tensor, adaln: torch.Tensor) -> list[torch.Tensor]:
        """The final layer on the unified sequence, unpatchified per sample."""
        final = self.model.all_final_layer[self.key]
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

    # ---- warm-up -----------------------------------------------------------------------------------------
    def sample_lengths(self, max_image_tokens: int, max_caption: int = 512) -> set[int]:
        """Every sequence length attention can see for a sample of at most ``max_image_tokens`` image tokens and a
        caption of at most ``max_caption`` tokens: the image segment, the caption segment and the two together (the
        noise refiner, the context refiner and the main blocks), each padded as ``layout`` pads them. Image sizes
        are multiples of 16 on each side, so nearly every padded image length up to the limit is some size's:
        the set is every multiple of the padding up to the longest unified sequence."""
        top = _round_up(max(1, max_image_tokens)) + _round_up(max(1, max_caption))
        return set(range(SEQ_MULTI_OF, top + 1, SEQ_MULTI_OF))

    def prewarm(self, max_image_tokens: int, max_caption: int = 512) -> int:
        """Run attention once at every length of ``sample_lengths``, so cuDNN's per-shape execution plans (about
        49 ms each the first time on an H100) are built on this thread during warm-up, not in the serving path,
        whatever size a request has. Only on CUDA; returns how many lengths it ran."""
        if self.device.type != "cuda":
            return 0
        heads = self.model.n_heads
        dim = self.model.dim // heads
        lengths = sorted(self.sample_lengths(max_image_tokens, max_caption))
        q = torch.zeros(1, max(lengths), heads, dim, device=self.device, dtype=self.model.x_pad_token.dtype)
        with torch.no_grad():
            for n in lengths:
                x = q[:, :n]
                run_attention(x, x, x, equal_runs([n]))
        torch.cuda.synchronize(self.device)
        return len(lengths)

    # ---- compile -----------------------------------------------------------------------------------------
    def compile(self, **kw) -> None:
        """Compile the block function once for every block (the blocks share code; parameters are inputs) with
        dynamic shapes, so any packed length runs the same graphs: a modulated and an unmodulated block, each
        for one sample and for several (dynamo specializes sizes of 1)."""
        import torch._dynamo
        import torch.fx.experimental._config

        kw.setdefault("fullgraph", True)
        kw.setdefault("dynamic", True)
        torch.fx.experimental._config.use_duck_shape = False  # unrelated sizes that happen to be equal stay apart
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 1024)
        from .compiled import guarded

        self.block_fn = guarded("denoise", torch.compile(_block_forward, **kw), _block_forward)
        self.compiled = True


# ---- the block, mirroring ZImageTransformerBlock.forward + ZSingleStreamAttnProcessor on a packed sequence --
def _rope(x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
    return torch.view_as_real(x * freqs_cis.unsqueeze(2)).flatten(3).type_as(x_in)


@torch.library.custom_op("zimage::run_attention", mutates_args=())
def run_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: torch.Tensor) -> torch.Tensor:
    """Attention within each sample of a packed ``[1, T, H, d]`` sequence, one dense SDPA call per sample
    (``runs``: a CPU int64 tensor of rows ``(start, samples, length)`` for the runs of equal lengths).

    Measured on an H200 (``benchmarks/probe_packed.py``): dense SDPA (cuDNN) per run keeps the unmasked kernel's
    speed (675 TFLOP/s on 4 equal samples, 535 on four different ones) where torch's varlen flash attention reaches
    341-350, flex_attention 309-399 and a padded, masked batch 268. An opaque op, so ``torch.compile`` neither
    specializes on the lengths nor recompiles for new ones: the lengths are data read on the CPU."""
    out = torch.empty_like(q)
    for start, count, length in runs.tolist():
        _attend_run(q, k, v, out, start, count, length)
    return out


def _attend_run(q, k, v, out, start: int, count: int, length: int) -> None:
    """One dense SDPA call per sample of the run: on an H100 (``benchmarks/probe_packed.py varied``, s5-1) four
    calls of one 1024^2 sample ran at 542 TFLOP/s against 524 for one call of four, and cuDNN builds an execution
    plan for every new shape (45-65 ms the first time, ``benchmarks/probe_attn_shapes.py``): per-sample calls make
    the shapes one per sample length, few enough to build them all at warm-up (``PackedTransformer.prewarm``)
    instead of one per (samples, length) pair, built in the serving path."""
    for i in range(count):
        a = start + i * length
        # [1, H, L, d] with strides that depend on L alone (cuDNN's plan cache keys on strides too)
        qs, ks, vs = (t[0, a:a + length].unsqueeze(0).transpose(1, 2) for t in (q, k, v))
        out[0, a:a + length] = F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1)


@run_attention.register_fake
def _(q, k, v, runs):
    return torch.empty_like(q)


def equal_runs(lens: list[int]) -> torch.Tensor:
    """``(start, samples, length)`` rows for the runs of consecutive equal lengths in ``lens``."""
    rows: list[list[int]] = []
    start = 0
    for n in lens:
        if rows and rows[-1][2] == n:
            rows[-1][1] += 1
        else:
            rows.append([start, 1, n])
        start += n
    return torch.tensor(rows, dtype=torch.int64)


def _lora_h(x, a, rows):
    """The low-rank activations of every row, each scaled by its sample's scale per adapter column:
    ``(x @ A^T) * rows`` with ``A`` stacking ``k`` inputs' factors ([k*R, in]) -> ``[..., k, R]``."""
    h = x @ a.t()
    return h.unflatten(-1, (-1, rows.shape[-1])) * rows.unsqueeze(-2)


def _attention(attn, x, freqs, runs, lora=None):
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    if lora is not None:  # per-sample LoRA: (rows [T, R], factors) -- actors/lora.py
        rows, f = lora
        h = _lora_h(x, f[0], rows)
        q, k, v = q + h[..., 0, :] @ f[1].t(), k + h[..., 1, :] @ f[2].t(), v + h[..., 2, :] @ f[3].t()
    q = q.unflatten(-1, (attn.heads, -1))
    k = k.unflatten(-1, (attn.heads, -1))
    v = v.unflatten(-1, (attn.heads, -1))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if freqs is not None:
        q, k = _rope(q, freqs), _rope(k, freqs)
    dtype = q.dtype
    out = run_attention(q, k.to(dtype), v, runs).flatten(2, 3).to(dtype)
    if lora is None:
        return attn.to_out[0](out)
    rows, f = lora
    return attn.to_out[0](out) + _lora_h(out, f[4], rows)[..., 0, :] @ f[5].t()


def _feed_forward(ff, x, lora=None):
    """``FeedForward.forward`` (w2(silu(w1 x) * w3 x)) with the per-sample LoRA terms."""
    if lora is None:
        return ff(x)
    rows, f = lora
    h = _lora_h(x, f[6], rows)
    g = F.silu(ff.w1(x) + h[..., 0, :] @ f[7].t()) * (ff.w3(x) + h[..., 1, :] @ f[8].t())
    return ff.w2(g) + _lora_h(g, f[9], rows)[..., 0, :] @ f[10].t()


def _block_forward(block, x, seg, adaln, freqs, runs, lora=None):
    """One ``ZImageTransformerBlock`` on a packed sequence. ``lora``: None, or ``(rows, factors)`` from
    ``actors/lora.py``; then ``adaln`` carries each sample's LoRA scales after its own columns."""
    if block.modulation:
        if lora is None:
            mod = block.adaLN_modulation(adaln)  # [B, 4D]: per sample
        else:
            lin, f = block.adaLN_modulation[0], lora[1]
            adaln, scales = adaln[:, :lin.in_features], adaln[:, lin.in_features:]
            mod = lin(adaln) + ((adaln @ f[11].t()) * scales) @ f[12].t()
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=1)
        scale_msa, gate_msa = (1.0 + scale_msa)[seg], gate_msa.tanh()[seg]
        scale_mlp, gate_mlp = (1.0 + scale_mlp)[seg], gate_mlp.tanh()[seg]
        attn_out = _attention(block.attention, block.attention_norm1(x) * scale_msa, freqs, runs, lora)
        x = x + gate_msa * block.attention_norm2(attn_out)
        return x + gate_mlp * block.ffn_norm2(_feed_forward(block.feed_forward, block.ffn_norm1(x) * scale_mlp,
                                                            lora))
    attn_out = _attention(block.attention, block.attention_norm1(x), freqs, runs, lora)
    x = x + block.attention_norm2(attn_out)
    return x + block.ffn_norm2(_feed_forward(block.feed_forward, block.ffn_norm1(x), lora))
