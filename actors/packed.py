"""One transformer call for any mix of image sizes and caption lengths: samples packed into one token sequence.

``ZImageTransformer2DModel.forward`` pads every sample to the longest one, with a key-padding mask (slow) where
lengths differ. Here the tokens are concatenated into one sequence ``[1, T, D]`` with per-sample boundaries, and
attention runs per sample on exactly its tokens (``run_attention``), so nothing depends on the batch-mates. The math
is the diffusers forward's step for step, with the model's own modules; what differs is what is computed once:
each sample's RoPE tables and pad masks when it joins (``Piece``), a batch's layout by concatenating pieces
(``PackedLayout``), and its caption path (embedder and the unmodulated context refiner, which sees no timestep and
no other sample) once per sample (``Piece.caption``). Each sample has its own timestep; a block's adaLN output is
computed per sample and gathered per token by segment id. ``tests/test_packed.py`` checks every sample against its
solo run through the unmodified diffusers forward."""

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
    freqs: torch.Tensor  # float32 [1, T, head_dim/2, 2]: RoPE per token, (cos, sin) (``_rope``)
    runs: torch.Tensor  # int64 [R, 3] on the CPU: runs of consecutive equal lengths (``equal_runs``)

    @property
    def total(self) -> int:
        return sum(self.lens)


@dataclass(eq=False)
class Piece:
    """One entry of a packed call (a sample, or its negative pass) as far as its shapes decide: built once when it
    joins (``PackedTransformer.piece``), so a new running set only concatenates pieces. Its caption, once refined
    (``PackedTransformer.captions``), is kept too: the context refiner sees no timestep and no other sample."""

    size: tuple[int, int, int]  # latent (F, H, W)
    n_img: int  # image tokens before padding
    x_len: int  # image tokens, padded
    cap_len: int  # caption tokens, padded
    x_freqs: torch.Tensor  # float32 [x_len, head_dim/2, 2], on the device
    cap_freqs: torch.Tensor  # float32 [cap_len, head_dim/2, 2]
    x_pad: torch.Tensor  # bool [x_len]
    cap_pad: torch.Tensor  # bool [cap_len]
    caption: torch.Tensor | None = None  # context-refined caption tokens [cap_len, D]


@dataclass
class PackedLayout:
    """Everything about a packed batch that depends only on its shapes (built once, used at every step).

    Samples are packed longest first, so samples of equal length sit next to each other and attention runs one
    dense call per run of them; ``order`` maps packing position -> the caller's sample index."""

    order: list[int]
    pieces: list[Piece]  # in packing order
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

    def forget_captions(self) -> None:
        """Drop the refined captions, so the next call refines them again (timing probes)."""
        self.caption_cache = None
        for p in self.pieces:
            p.caption = None


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
    def piece(self, latent_shape: tuple[int, int, int], caption_len: int) -> Piece:
        """One entry's positions, RoPE tables and pad masks, as ``ZImageTransformer2DModel.patchify_and_embed`` /
        ``_pad_with_ids`` build them (the image's positions start after its padded caption's)."""
        pH = pW = self.patch
        pF = self.f_patch
        grid = self.model.create_coordinate_grid
        f, h, w = latent_shape
        n = (f // pF) * (h // pH) * (w // pW)
        c_len, n_pad = _round_up(caption_len), _round_up(n)
        ids = grid((f // pF, h // pH, w // pW), (c_len + 1, 0, 0)).flatten(0, 2)
        if n_pad > n:
            ids = torch.cat([ids, grid((1, 1, 1), (0, 0, 0)).flatten(0, 2).repeat(n_pad - n, 1)])
        ids = torch.cat([ids, grid((c_len, 1, 1), (1, 0, 0)).flatten(0, 2)])
        pads = torch.cat([torch.arange(n_pad) >= n, torch.arange(c_len) >= caption_len])
        # (pageable host memory: the copy is staged at once and waits for no stream)
        freqs = torch.view_as_real(self.model.rope_embedder(ids.to(self.device, non_blocking=True)))
        pads = pads.to(self.device, non_blocking=True)
        return Piece(tuple(latent_shape), n, n_pad, c_len, freqs[:n_pad], freqs[n_pad:], pads[:n_pad], pads[n_pad:])

    def pack(self, pieces: list[Piece]) -> PackedLayout:
        """The layout of a call of ``pieces`` (the caller's order): device tensors concatenated, the index tensors
        made on the host and copied in one transfer, so building it waits for no GPU work."""
        order = sorted(range(len(pieces)), key=lambda i: (-(pieces[i].x_len + pieces[i].cap_len),
                                                          -pieces[i].x_len, i))
        ps = [pieces[i] for i in order]
        x_lens, cap_lens = [p.x_len for p in ps], [p.cap_len for p in ps]
        uni_lens = [a + b for a, b in zip(x_lens, cap_lens)]
        tx = sum(x_lens)
        index, out_starts, xo, co, pos = [], [0] * len(order), 0, 0, 0
        for k, (xl, cl) in enumerate(zip(x_lens, cap_lens)):  # unified order: [image, caption] per sample
            out_starts[order[k]] = pos
            index += [torch.arange(xo, xo + xl), torch.arange(tx + co, tx + co + cl)]
            xo, co, pos = xo + xl, co + cl, pos + xl + cl
        ids = torch.tensor(order)
        host = [torch.repeat_interleave(ids, torch.tensor(lens)) for lens in (x_lens, cap_lens, uni_lens)]
        dev = torch.cat(host + index).to(self.device, non_blocking=True).split([len(t) for t in host] + [tx + co])

        def segments(lens, seg, freqs) -> Segments:
            return Segments(lens, seg, torch.cat(freqs).unsqueeze(0), equal_runs(lens))

        return PackedLayout(
            order=order, pieces=ps, out_starts=out_starts,
            x=segments(x_lens, dev[0], [p.x_freqs for p in ps]),
            cap=segments(cap_lens, dev[1], [p.cap_freqs for p in ps]),
            uni=segments(uni_lens, dev[2], [f for p in ps for f in (p.x_freqs, p.cap_freqs)]),
            x_pad=torch.cat([p.x_pad for p in ps]).unsqueeze(-1),
            cap_pad=torch.cat([p.cap_pad for p in ps]).unsqueeze(-1), uni_index=dev[3],
        )

    def layout(self, latent_shapes: list[tuple[int, int, int]], caption_lens: list[int]) -> PackedLayout:
        """``latent_shapes``: per sample (F, H, W) of its latent; ``caption_lens``: its caption's token count."""
        return self.pack([self.piece(s, c) for s, c in zip(latent_shapes, caption_lens)])

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

    def captions(self, layout: PackedLayout, cap_feats: list[torch.Tensor] | None) -> torch.Tensor:
        """The caption path (embedder + context refiner): independent of the timestep and of the other samples, so
        computed once per piece (``cap_feats``, the caller's order, is read only for pieces not refined yet)."""
        if layout.caption_cache is None:
            todo = [k for k, p in enumerate(layout.pieces) if p.caption is None]
            if todo:
                self._refine([layout.pieces[k] for k in todo], [cap_feats[layout.order[k]] for k in todo],
                             [layout.order[k] for k in todo], layout.lora)
            layout.caption_cache = torch.cat([p.caption for p in layout.pieces]).unsqueeze(0)
        return layout.caption_cache

    def _refine(self, pieces: list[Piece], cap_feats: list[torch.Tensor], ids: list[int], lora) -> None:
        """Refine the captions of ``pieces`` in one call; ``ids``: each one's sample index (its ``lora`` rows)."""
        m = self.model
        dim = cap_feats[0].shape[-1]
        lens = [p.cap_len for p in pieces]
        padded = [torch.cat([c, c.new_zeros(p.cap_len - len(c), dim)]) if p.cap_len > len(c) else c
                  for p, c in zip(pieces, cap_feats)]
        seg = torch.repeat_interleave(torch.tensor(ids), torch.tensor(lens)).to(self.device, non_blocking=True)
        segs = Segments(lens, seg, torch.cat([p.cap_freqs for p in pieces]).unsqueeze(0), equal_runs(lens))
        cap = m.cap_embedder(torch.cat(padded, dim=0))
        cap = torch.where(torch.cat([p.cap_pad for p in pieces]).unsqueeze(-1), m.cap_pad_token, cap).unsqueeze(0)
        out = self._blocks(m.context_refiner, cap, None, segs, lora, "context_refiner")[0]
        for p, part in zip(pieces, out.split(lens)):
            p.caption = part

    def patchify(self, layout: PackedLayout, latents: list[torch.Tensor]) -> torch.Tensor:
        pH = pW = self.patch
        pF = self.f_patch
        parts = []
        for i, p in zip(layout.order, layout.pieces):
            img, n = latents[i], p.n_img
            c, f, h, w = img.shape
            part = img.view(c, f // pF, pF, h // pH, pH, w // pW, pW).permute(1, 3, 5, 2, 4, 6, 0).reshape(n, -1)
            parts.append(part)
            if p.x_len > n:  # the pad rows are replaced by the pad token after embedding; their values do not matter
                parts.append(part[-1:].expand(p.x_len - n, -1))
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
        res: list = [None] * len(layout.order)
        for i, p in zip(layout.order, layout.pieces):
            (f, h, w), start = p.size, layout.out_starts[i]
            res[i] = (out[start:start + p.n_img].view(f // pF, h // pH, w // pW, pF, pH, pW, c)
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
        """Run attention once at every length of ``sample_lengths``, so cuDNN's per-shape plans are built on this
        thread during warm-up, not in the serving path, whatever size a request has. Only on CUDA; returns how many
        lengths it ran."""
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
        if kw.get("backend", "inductor") == "inductor" and "mode" not in kw:
            # The generated wrapper would check buffers' shapes, strides and alignment on the host in every block
            # call (about 35 checks), and a 512x512 step is paced by the host. A graph that broke them would be
            # an inductor bug, which the compiled-against-eager equality tests (CPU and GPU) catch once.
            import torch._inductor.config as inductor_config

            checks = {k: False for k in ("size_asserts", "alignment_asserts") if hasattr(inductor_config, k)}
            kw["options"] = {**checks, **(kw.get("options") or {})}
        torch.fx.experimental._config.use_duck_shape = False  # unrelated sizes that happen to be equal stay apart
        # The blocks are inputs, so their norms' eps would reach the graph as unspecialized floats: a 0-d tensor
        # made and read back on the host for each, in every block call. Every block has the same eps, so
        # specializing them adds no graph. (Global, as the settings above: no other compiled code of the replica
        # takes a Python float that varies between calls.)
        torch._dynamo.config.specialize_float = True
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 1024)
        from .compiled import guarded

        self.block_fn = guarded("denoise", torch.compile(_block_forward, **kw), _block_forward)
        self.compiled = True


# ---- the block, mirroring ZImageTransformerBlock.forward + ZSingleStreamAttnProcessor on a packed sequence --
def _rope(x_in: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """diffusers' complex RoPE (``x * freqs_cis`` on interleaved pairs; ``freqs`` holds (cos, sin) as
    ``view_as_real`` gives them). Compiled, it is written in real arithmetic: inductor generates no code for
    complex tensors, so the complex product ran as an eager kernel for q and for k in every block (12 ms of a
    272 ms fp8 step at batch 4 on an H100, ``benchmarks/roofline.py``), while the real form fuses with the QK norm
    and the cast. Eager, the complex product is one kernel where the real form is several, so eager keeps it. The
    two agree bit for bit in float32 on the CPU."""
    if not torch.compiler.is_compiling():
        x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
        return torch.view_as_real(x * torch.view_as_complex(freqs).unsqueeze(2)).flatten(3).type_as(x_in)
    x = x_in.float().unflatten(-1, (-1, 2))
    f = freqs.unsqueeze(2)
    x0, x1, cos, sin = x[..., 0], x[..., 1], f[..., 0], f[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(3).type_as(x_in)


def _run_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: torch.Tensor) -> torch.Tensor:
    """Attention within each sample of a packed ``[1, T, H, d]`` sequence, one dense SDPA call per sample
    (``runs``: a CPU int64 tensor of rows ``(start, samples, length)`` for the runs of equal lengths). Dense SDPA
    keeps the unmasked kernel's speed, well above varlen flash attention, flex_attention or a padded, masked batch
    (``benchmarks/probe_packed.py``). An opaque op (``run_attention``), so ``torch.compile`` neither specializes on
    the lengths nor recompiles for new ones: the lengths are data read on the CPU."""
    out = torch.empty_like(q)
    for start, count, length in runs.tolist():
        _attend_run(q, k, v, out, start, count, length)
    return out


def _attend_run(q, k, v, out, start: int, count: int, length: int) -> None:
    """One dense SDPA call per sample of the run, as fast as one call of all of them: cuDNN builds an execution plan
    per new shape (tens of ms; docs/benchmarks-history.md, "attention plans built in the serving path"), and
    per-sample calls keep the shapes one per sample length, few enough to build them all at warm-up
    (``PackedTransformer.prewarm``)."""
    for i in range(count):
        a = start + i * length
        # [1, H, L, d] with strides that depend on L alone (cuDNN's plan cache keys on strides too)
        qs, ks, vs = (t[0, a:a + length].unsqueeze(0).transpose(1, 2) for t in (q, k, v))
        out[0, a:a + length] = F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1)


# The op is registered through the dispatcher's own API, not ``torch.library.custom_op``: that wrapper adds an
# autograd layer and a Python aliasing check to every call (9.1 against 2.6 us a call on the CPU), and a block
# calls the op once per step. The replica only runs it under no_grad, so it needs no autograd formula. Defined
# once per process: a second import of this module (a reload) finds it and keeps the first definition.
_LIB = torch.library.Library("zimage", "FRAGMENT")
if not hasattr(torch.ops.zimage, "run_attention"):
    _LIB.define("run_attention(Tensor q, Tensor k, Tensor v, Tensor runs) -> Tensor")
    _LIB.impl("run_attention", _run_attention, "CompositeExplicitAutograd")
    torch.library.register_fake("zimage::run_attention", lambda q, k, v, runs: torch.empty_like(q), lib=_LIB)


run_attention = torch.ops.zimage.run_attention.default


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
