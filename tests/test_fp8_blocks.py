"""The switch that keeps chosen main blocks out of fp8 (``model.fp8_bf16_blocks``), the accuracy probe the replica
reports at start-up, and the fp8 blocks compiling as one graph with per-request LoRA."""

import pytest
import torch
from conftest import needs_cpu_fp8

from actors.lora import LoraStore, random_lora_state_dict, save_diffusers_lora
from actors.models import build_components
from actors.packed import PackedTransformer
from actors.quantize import resolve_bf16_blocks, swap_fp8
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


@needs_cpu_fp8
def test_bf16_blocks_stay_unquantized():
    tr = _transformer(torch.bfloat16)
    swap_fp8(tr, bf16_blocks=resolve_bf16_blocks("last:1", len(tr.layers)))
    kinds = {fqn: type(m).__name__ for fqn, m in tr.named_modules() if fqn.endswith(("to_q", "to_out.0"))}
    assert {k: v for k, v in kinds.items() if k.startswith("layers.1.")} == {
        "layers.1.attention.to_q": "Linear", "layers.1.attention.to_out.0": "Linear"}
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


def test_probe_is_the_pipelines_math():
    """The accuracy probe (one forward, the 9-step loop, the decode) gives diffusers' ZImagePipeline image for its
    prompt and seed; without fp8 the start-up options change nothing (no bound to report), and fp8 on the CPU is
    refused."""
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
    assert apply_transformer_options(eng, config_from_dict({}).model) == {}
    bound = compare(ref, reference_output(eng, size=64, steps=3, seed=11))
    assert bound["forward_rel_l2"] == 0 and bound["latents_rel_l2"] == 0 and bound["image_psnr_db"] == float("inf")
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):  # fp8 on the CPU: refused, as before
        apply_transformer_options(eng, config_from_dict({"model": {"quantization": "fp8"}}).model)


@pytest.mark.parametrize("fp8", [False, pytest.param(True, marks=needs_cpu_fp8)])
def test_blocks_compile_as_one_graph_and_cover_every_batch(fp8, tmp_path):
    """Dynamo traces the blocks (bf16, or float8 linears) without a graph break (the replica compiles with
    fullgraph), with and without per-sample LoRA, and after a warm-up one sample and several run on the graphs it
    made."""
    from actors.compiled import counted

    dtype = torch.bfloat16 if fp8 else torch.float32
    tr = _transformer(dtype)
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


def test_the_stated_bounds_hold_what_was_measured_and_refuse_a_broken_path():
    from actors.accuracy import BOUNDS, within

    def result(fwd, lat, psnr, nonfinite=0.0):
        return {"forward_rel_l2": fwd, "latents_rel_l2": lat, "image_psnr_db": psnr, "nonfinite_fraction": nonfinite}

    assert within(result(0.0141, 0.0031, 48.4), BOUNDS["bf16"])  # compiled bf16, one H100, 1024x1024
    assert within(result(0.0635, 0.0152, 45.2), BOUNDS["fp8"])  # fp8, every block
    assert not within(result(0.0635, 0.0152, 45.2), BOUNDS["bf16"])  # fp8's error is not a bf16 path's
    assert not within(result(0.5, 0.2, 20.0), BOUNDS["fp8"])  # e.g. a wrong scale
    assert not within(result(0.01, 0.003, 48.0, nonfinite=1e-4), BOUNDS["bf16"])  # an overflow anywhere fails it
