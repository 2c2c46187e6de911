"""Fused q/k/v and gate/up projections (actors/fused.py) against the unfused packed forward, with per-request LoRA
and with fp8; and the switch that keeps chosen main blocks out of fp8 (``model.fp8_bf16_blocks``)."""

import pytest
import torch

from actors.fused import fuse_projections, is_fused
from actors.lora import LoraStore, random_lora_state_dict, save_diffusers_lora
from actors.models import build_components
from actors.packed import PackedTransformer
from actors.quantize import Fp8Linear, resolve_bf16_blocks, swap_fp8
from zimage_common.config import config_from_dict
from zimage_common.errors import ConfigError


def _transformer(dtype=torch.float32, seed=5):
    return build_components("tiny", device={"transformer": "cpu"}, dtype=dtype, seed=seed)["transformer"]


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    sizes = [(8, 12), (2, 2), (6, 10)]
    caps = [torch.randn(n, 32, generator=g).to(dtype) for n in (5, 40, 33)]
    lat = [torch.randn(16, 1, h, w, generator=g).to(dtype) for h, w in sizes]
    return sizes, caps, lat, torch.tensor([0.3, 0.7, 0.5])


def _run(transformer, lora=None, dtype=torch.float32):
    packed = PackedTransformer(transformer)
    sizes, caps, lat, t = _inputs(dtype)
    layout = packed.layout([(1, h, w) for h, w in sizes], [len(c) for c in caps])
    layout.lora = lora
    with torch.no_grad():
        return [o.float() for o in packed(lat, t, caps, layout)]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_fused_forward_equals_unfused_and_shares_the_weights():
    tr = _transformer()
    ref = _run(tr)
    assert not is_fused(tr)
    # q/k/v and w1/w3 in 2 main blocks, 1 noise refiner and 1 context refiner block
    assert fuse_projections(tr) == 8 and is_fused(tr) and fuse_projections(tr) == 0
    for block in (tr.layers[0], tr.context_refiner[0]):
        attn, ff = block.attention, block.feed_forward
        assert attn.to_qkv.weight.shape == (3 * 64, 64) and ff.w13.weight.shape == (2 * ff.w1.out_features, 64)
        assert _storage(attn.to_k.weight) == _storage(attn.to_qkv.weight)  # views, not copies
        assert torch.equal(attn.to_k.weight, attn.to_qkv.weight[64:128])
        assert _storage(ff.w3.weight) == _storage(ff.w13.weight)
    out = _run(tr)
    for a, b in zip(out, ref):
        assert torch.allclose(a, b, rtol=0, atol=2e-6), float((a - b).abs().max())
    # diffusers' own forward still runs on the fused model (the parts are its modules)
    sizes, caps, lat, t = _inputs()
    with torch.no_grad():
        solo = tr([lat[0]], t[:1], [caps[0]], return_dict=False)[0][0]
    assert torch.allclose(solo, out[0], atol=1e-5)


def test_lora_deltas_apply_to_the_split_outputs(tmp_path):
    tr = _transformer()
    sd, meta = random_lora_state_dict(tr, 4, seed=1, std=0.15)
    store = LoraStore(tr, max_resident=2)
    store.add("a", save_diffusers_lora(tmp_path / "a", sd, meta).parent)
    per_sample = [[("a", 1.0)], [], [("a", 0.5)]]
    plain = _run(tr)
    ref = _run(tr, store.batch(per_sample))
    assert (ref[0] - plain[0]).abs().max() > 1e-3  # the adapter changes the output
    fuse_projections(tr)
    store.add("b", save_diffusers_lora(tmp_path / "b", sd, meta).parent)  # adapters still check against the parts
    out = _run(tr, store.batch(per_sample))
    for a, b in zip(out, ref):
        assert torch.allclose(a, b, rtol=0, atol=5e-6), float((a - b).abs().max())


def test_fp8_quantizes_the_fused_linear_and_its_parts_view_its_rows():
    """Per-row weight scales and per-token activation scales: the fused float8 matmul is the unfused ones side by
    side (the tiny feed-forward's 170 columns are no multiple of 16, so only attention is float8 here)."""
    plain, fused = _transformer(torch.bfloat16), _transformer(torch.bfloat16)
    fuse_projections(fused)
    n_plain, n_fused = swap_fp8(plain), swap_fp8(fused)
    assert n_plain == n_fused + 2 * 4  # q, k, v (3) became one (1) in each of 4 blocks
    attn = fused.layers[1].attention
    assert isinstance(attn.to_qkv, Fp8Linear) and isinstance(attn.to_v, Fp8Linear)
    assert _storage(attn.to_v.weight) == _storage(attn.to_qkv.weight)
    assert torch.equal(attn.to_v.weight_scale, attn.to_qkv.weight_scale[:, 128:])
    assert torch.equal(attn.to_v.weight.view(torch.uint8), plain.layers[1].attention.to_v.weight.view(torch.uint8))
    for a, b in zip(_run(fused, dtype=torch.bfloat16), _run(plain, dtype=torch.bfloat16)):
        assert torch.allclose(a, b, rtol=0, atol=2e-2), float((a - b).abs().max())  # a bf16 step at |x|~2


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_blocks_stay_unquantized(fused):
    tr = _transformer(torch.bfloat16)
    if fused:
        fuse_projections(tr)
    swap_fp8(tr, bf16_blocks=resolve_bf16_blocks("last:1", len(tr.layers)))
    kinds = {fqn: type(m).__name__ for fqn, m in tr.named_modules() if fqn.endswith(("to_q", "to_out.0", "to_qkv"))}
    assert {k: v for k, v in kinds.items() if k.startswith("layers.1.")} == {
        "layers.1.attention.to_q": "Linear", "layers.1.attention.to_out.0": "Linear",
        **({"layers.1.attention.to_qkv": "Linear"} if fused else {})}
    others = {k: v for k, v in kinds.items() if not k.startswith("layers.1.")}
    assert others and set(others.values()) == {"Fp8Linear"}  # block 0 and both refiners
    assert torch.isfinite(torch.stack([o.float().sum() for o in _run(tr, dtype=torch.bfloat16)])).all()


def test_block_choices_resolve_against_the_model():
    assert resolve_bf16_blocks("last:15", 30) == list(range(15, 30))
    assert resolve_bf16_blocks("first:2", 30) == [0, 1]
    assert resolve_bf16_blocks([29, 0], 30) == [0, 29] and resolve_bf16_blocks([], 30) == []
    with pytest.raises(ValueError, match=r"block\(s\) \[30\] do not exist; this transformer has 30 main blocks"):
        resolve_bf16_blocks([0, 30], 30)
    with pytest.raises(ValueError, match="asks for 3 blocks; this transformer has 2 main blocks"):
        resolve_bf16_blocks("last:3", 2)


@pytest.mark.parametrize("value,text", [
    ("last15", "'last15' is not a block choice: give a list of main-block indices"),
    ("middle:3", "'last:N' / 'first:N' such as 'last:15'"),
    ([3, 3], "repeated: [3]"),
    ([-1, 2], "negative: [-1]"),
    (7, "expected a list of main-block indices"),
])
def test_bad_block_choices_are_clear_config_errors(value, text):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": {"quantization": "fp8", "fp8_bf16_blocks": value}})
    assert "model.fp8_bf16_blocks" in str(e.value) and text in str(e.value)


def test_block_choice_needs_fp8_and_is_normalized():
    with pytest.raises(ConfigError, match="quantization is 'none'"):
        config_from_dict({"model": {"fp8_bf16_blocks": "last:15"}})
    assert config_from_dict({"model": {"quantization": "fp8", "fp8_bf16_blocks": " last:015"}}).model \
        .fp8_bf16_blocks == "last:15"
    assert config_from_dict({"model": {"quantization": "auto", "fp8_bf16_blocks": [4, 1]}}).model \
        .fp8_bf16_blocks == [1, 4]
    assert config_from_dict({}).model.fused_projections is True


def test_probe_is_the_pipelines_math_and_start_up_fuses_within_its_bound():
    """The accuracy probe (one forward, the 9-step loop, the decode) gives diffusers' ZImagePipeline image for its
    prompt and seed; the start-up options fuse the projections (no fp8: nothing lossy, no bound to report), and
    the fused model's probe stays within float32 rounding of the unfused one."""
    import numpy as np

    from actors.accuracy import apply_transformer_options
    from actors.engine import ZImageEngine
    from actors.models import build_pipeline
    from actors.quantize import CHECK_PROMPT, compare, reference_output

    pipe = build_pipeline("tiny", seed=3)
    eng = ZImageEngine(dict(pipe.components), dict.fromkeys(("transformer", "text_encoder", "vae"), "cpu"),
                       torch.float32)
    ref = reference_output(eng, size=64, steps=3, seed=11)
    img = pipe([CHECK_PROMPT], height=64, width=64, num_inference_steps=3, guidance_scale=0.0,
               generator=[torch.Generator().manual_seed(11)], output_type="np").images[0]
    assert np.abs((img * 255).round().clip(0, 255).astype(int) - ref.image.astype(int)).max() <= 1
    assert apply_transformer_options(eng, config_from_dict({}).model) == {} and is_fused(eng.transformer)
    bound = compare(ref, reference_output(eng, size=64, steps=3, seed=11))
    assert bound["forward_rel_l2"] < 1e-5 and bound["latents_rel_l2"] < 1e-5 and bound["image_psnr_db"] > 50
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):  # fp8 on the CPU: refused, as before
        apply_transformer_options(eng, config_from_dict({"model": {"quantization": "fp8"}}).model)


@pytest.mark.parametrize("fp8", [False, True])
def test_fused_blocks_compile_as_one_graph_and_cover_every_batch(fp8, tmp_path):
    """Dynamo traces the fused path without a graph break (the replica compiles with fullgraph), with and without
    per-sample LoRA, and after a warm-up one sample and several run on the graphs it made."""
    from actors.compiled import counted

    dtype = torch.bfloat16 if fp8 else torch.float32
    tr = _transformer(dtype)
    fuse_projections(tr)
    if fp8:
        swap_fp8(tr)
    sd, meta = random_lora_state_dict(tr, 4, seed=1, std=0.15)
    store = LoraStore(tr, max_resident=1, dtype=dtype)
    store.add("a", save_diffusers_lora(tmp_path / "a", sd, meta).parent)
    packed = PackedTransformer(tr)
    packed.compile(backend="eager")
    sizes, caps, lat, t = _inputs(dtype)

    def call(n, lora):
        layout = packed.layout([(1, h, w) for h, w in sizes[:n]], [len(c) for c in caps[:n]])
        layout.lora = store.batch([[("a", 1.0)]] * n) if lora else None
        with torch.no_grad():
            return packed(lat[:n], t[:n], caps[:n], layout)

    try:
        for n, lora in ((2, False), (2, True)):
            call(n, lora)
        with torch.compiler.set_stance("fail_on_recompile"), counted() as missed:
            out = call(3, False)
            call(1, True)
        assert not missed, missed
        ref = _run(tr, dtype=dtype)
        assert all(torch.equal(a.float(), b) for a, b in zip(out, ref))
    finally:
        torch._dynamo.reset()
