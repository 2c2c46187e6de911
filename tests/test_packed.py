"""The packed transformer against diffusers' own forward, and the constants the planner shares with diffusers."""

import pytest
import torch

from actors.models import build_components
from actors.packed import PackedTransformer, equal_runs


@pytest.fixture(scope="module")
def transformer():
    return build_components("tiny", device="cpu", dtype=torch.float32, seed=5)["transformer"]


def test_each_packed_sample_equals_diffusers_forward_alone(transformer):
    """Three sizes (one with image tokens that need padding) and three caption lengths, one call."""
    packed = PackedTransformer(transformer)
    g = torch.Generator().manual_seed(0)
    sizes = [(8, 12), (2, 2), (6, 10)]  # latent h, w: 24, 1 (padded to 32) and 15 image tokens
    caps = [torch.randn(n, 32, generator=g) for n in (5, 40, 33)]
    lat = [torch.randn(16, 1, h, w, generator=g) for h, w in sizes]
    t = torch.tensor([0.3, 0.7, 0.5])
    layout = packed.layout([(1, h, w) for h, w in sizes], [len(c) for c in caps])
    with torch.no_grad():
        out = packed(lat, t, caps, layout)
        for i in range(3):
            ref = transformer([lat[i]], t[i:i + 1], [caps[i]], return_dict=False)[0][0]
            assert out[i].shape == ref.shape
            assert torch.allclose(out[i], ref, atol=1e-5), float((out[i] - ref).abs().max())
    assert layout.order == [2, 1, 0] or layout.uni.lens == sorted(layout.uni.lens, reverse=True)


def test_equal_lengths_run_as_one_dense_call():
    assert equal_runs([64, 64, 64]).tolist() == [[0, 3, 64]]
    assert equal_runs([96, 64, 64, 32]).tolist() == [[0, 1, 96], [96, 2, 64], [224, 1, 32]]


def test_planner_token_rules_match_diffusers():
    """placement/ is pure (no torch, no diffusers), so it states the transformer's rules itself: check them."""
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

    from actors.models import FULL_VAE_CONFIG
    from placement import memory

    assert memory.SEQ_MULTI_OF == SEQ_MULTI_OF
    assert memory.SIZE_MULTIPLE == 2 ** (len(FULL_VAE_CONFIG["block_out_channels"]) - 1) * 2  # VAE x 2x2 patches
    assert memory.image_tokens(1024, 768) == (1024 // 16) * (768 // 16)


def test_prewarm_covers_every_length_a_sample_within_the_limit_can_have(transformer):
    """The lengths attention sees (image, caption, both; padded to 32) for any size up to the token limit and any
    caption up to its limit, named in no list; on the CPU there is no plan cache to fill."""
    packed = PackedTransformer(transformer)
    lengths = packed.sample_lengths(128 * 128, max_caption=512)
    assert lengths == set(range(32, 128 * 128 + 512 + 1, 32))
    for sizes, caption_lens in (([(1, 128, 128)], [77]), ([(1, 8, 12), (1, 128, 128)], [512, 3]),
                                ([(1, 90, 46), (1, 34, 102), (1, 126, 4)], [1, 200, 511])):
        lay = packed.layout(sizes, caption_lens)
        assert set(lay.uni.lens) | set(lay.x.lens) | set(lay.cap.lens) <= lengths
    assert packed.prewarm(128 * 128) == 0


@pytest.mark.slow
def test_cpp_wrapper_blocks_equal_eager_and_compile_nothing_for_a_new_mix(transformer, tmp_path, monkeypatch):
    """``model.compile_cpp_wrapper``'s mechanism, on the CPU: the blocks compiled with inductor's C++ wrapper (which
    calls the custom attention op back through Python) give the eager packed call's outputs, and once a lone sample
    and a mixed batch have compiled the graphs, a new mix of sizes and caption lengths runs without compiling."""
    from torch._inductor.graph import GraphLowering

    from actors.compiled import counted

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    wrapped = []  # graphs whose wrapper inductor generated in C++ (the option reached the compile)
    cpp = GraphLowering.codegen_with_cpp_wrapper
    monkeypatch.setattr(GraphLowering, "codegen_with_cpp_wrapper", lambda self: wrapped.append(1) or cpp(self))
    eager, compiled = PackedTransformer(transformer), PackedTransformer(transformer)
    compiled.compile(options={"cpp_wrapper": True})
    g = torch.Generator().manual_seed(1)

    def same(sizes, lens):
        caps = [torch.randn(n, 32, generator=g) for n in lens]
        lat = [torch.randn(16, 1, h, w, generator=g) for h, w in sizes]
        t = torch.rand(len(sizes), generator=g)
        shapes = [(1, h, w) for h, w in sizes]
        want = eager(lat, t, caps, eager.layout(shapes, lens))
        got = compiled(lat, t, caps, compiled.layout(shapes, lens))
        for a, b in zip(got, want):
            assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())

    try:
        with torch.no_grad():
            same([(8, 12)], [5])
            same([(8, 12), (2, 2)], [5, 40])
            with torch.compiler.set_stance("fail_on_recompile"), counted() as missed:
                same([(6, 10), (4, 4), (2, 6)], [33, 7, 64])
        assert not missed, missed  # every call had its graph
        assert wrapped
    finally:
        torch._dynamo.reset()


def test_compiled_block_calls_make_no_host_scalars(transformer):
    """A compiled block call passes nothing through the host as a 0-d tensor: the norms' eps are specialized
    (``PackedTransformer.compile``), and the attention op is called without ``custom_op``'s wrapper. On a GPU each
    such scalar is a host tensor made and read back in every block of every step."""
    import cProfile
    import pstats

    packed = PackedTransformer(transformer)
    packed.compile()
    g = torch.Generator().manual_seed(2)
    lat, caps = [torch.randn(16, 1, 8, 12, generator=g)], [torch.randn(20, 32, generator=g)]
    t, layout = torch.rand(1, generator=g), packed.layout([(1, 8, 12)], [20])
    try:
        with torch.no_grad():
            packed(lat, t, caps, layout)
            prof = cProfile.Profile()
            prof.runcall(packed, lat, t, caps, layout)
        calls = {f"{file}:{fn}": n[0] for (file, _, fn), n in pstats.Stats(prof).stats.items()}
        assert any("_block_forward" in k or "compile_wrapper" in k for k in calls)  # the compiled blocks ran
        host_scalars = {k: n for k, n in calls.items() if "as_tensor" in k or "backend_impl" in k}
        assert not host_scalars, host_scalars
    finally:
        torch._dynamo.reset()
