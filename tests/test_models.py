"""Model definitions and the real loading code, exercised with the toy model saved in the real layout."""

import json
import shutil

import pytest
import torch

from actors.loading import ModelNotFoundError, load_components, resolve_dtype, resolve_model
from actors.models import build_components, save_tiny_model
from zimage_common.config import ModelConfig

CPU = dict.fromkeys(("transformer", "text_encoder", "vae"), "cpu")


def test_full_size_architecture_matches_the_planners_counts():
    """The planner (pure, no torch) states each component's parameters and quantizable weights once: check them
    against the real classes at the real configs."""
    import torch

    from actors.encoder_graphs import penultimate
    from actors.quantize import _quantizable
    from placement import model_spec

    comps = build_components("full", device="meta")
    comps["text_encoder"] = penultimate(comps["text_encoder"])  # what a replica places and keeps
    for name, spec in model_spec("modelscope").components.items():
        assert sum(p.numel() for p in comps[name].parameters()) == spec.params, name
    spec = model_spec("modelscope").components
    assert sum(m.weight.numel() for n, m in comps["transformer"].named_modules()
               if _quantizable(m, n)) == spec["transformer"].quantizable_params
    assert sum(m.weight.numel() for m in comps["text_encoder"].modules()
               if isinstance(m, torch.nn.Linear)) == spec["text_encoder"].quantizable_params
    assert comps["scheduler"].config.shift == 3.0
    assert comps["vae"].config.scaling_factor == 0.3611 and comps["vae"].config.shift_factor == 0.1159


def test_tokenizer_applies_chat_template_and_pads():
    tok = build_components("tiny", device="meta")["tokenizer"]
    text = tok.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    enc = tok([text], padding="max_length", max_length=64, truncation=True)
    assert len(enc.input_ids[0]) == 64 and sum(enc.attention_mask[0]) < 64


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "Z-Image-Turbo")


def test_tiny_saved_in_real_layout(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    for sub in ("transformer", "text_encoder", "vae", "tokenizer", "scheduler"):
        assert (tiny_dir / sub).is_dir(), sub
    assert (tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


def test_local_source_round_trip(tiny_dir):
    cfg = ModelConfig(source="local", local_path=tiny_dir, dtype="float32")
    comps, resolved, _ = load_components(cfg, torch.float32, CPU)
    assert resolved.source == "local" and resolved.path == tiny_dir
    fresh = build_components("tiny")
    for name in ("transformer", "text_encoder", "vae"):
        a = dict(comps[name].state_dict())
        b = dict(fresh[name].state_dict())
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} weights changed in the round trip"


def test_tiny_source_builds_once_then_hits_cache(tmp_path, caplog):
    cfg = ModelConfig(source="tiny", cache_dir=tmp_path, dtype="float32")
    first = resolve_model(cfg)
    assert not first.cache_hit and (first.path / "model_index.json").is_file()
    second = resolve_model(cfg)
    assert second.cache_hit and second.path == first.path


def test_modelscope_cache_found_offline(tiny_dir, tmp_path, monkeypatch):
    # ModelScope's cache layout: <cache>/models/<owner>/<name>; resolved through modelscope's own API.
    target = tmp_path / "ms" / "models" / "Tongyi-MAI" / "Z-Image-Turbo"
    shutil.copytree(tiny_dir, target)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    cfg = ModelConfig(source="modelscope", offline=True, dtype="float32")
    resolved = resolve_model(cfg)
    assert resolved.cache_hit and resolved.path.resolve() == target.resolve()
    comps, _, _ = load_components(cfg, torch.float32, CPU)
    assert type(comps["transformer"]).__name__ == "ZImageTransformer2DModel"


def test_huggingface_cache_found_offline(tiny_dir, tmp_path, monkeypatch):
    # The HF hub cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}.
    repo = tmp_path / "hf" / "models--Tongyi-MAI--Z-Image-Turbo"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(source="huggingface", cache_dir=tmp_path / "hf", dtype="float32")
    resolved = resolve_model(cfg)
    assert resolved.cache_hit and resolved.path.name == commit


@pytest.mark.parametrize("source", ["modelscope", "huggingface"])
def test_offline_miss_names_directories_and_fix(source, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "empty-ms"))
    cfg = ModelConfig(source=source, cache_dir=tmp_path / "empty", offline=True)
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model(cfg)
    msg = str(e.value)
    assert str(tmp_path / "empty") in msg and "offline" in msg and "download" in msg


def test_local_path_without_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        resolve_model(ModelConfig(source="local", local_path=tmp_path))


def test_dtype_fallback_on_cpu_warns(caplog):
    assert resolve_dtype("bfloat16", "cpu") == torch.float32
    assert "falling back to float32" in caplog.text
    assert resolve_dtype("float32", "cpu") == torch.float32


def test_full_model_tokenizer_gives_english_prompts_realistic_lengths():
    """The benchmark model's tokenizer has word merges (English words cost about one token, as with Qwen's) and
    still encodes any text losslessly; the toy model's stays byte-level."""
    import random

    from actors.models import build_tokenizer
    from zimage_common.prompts import varied_prompt

    words = build_tokenizer(english=True)
    prompt = varied_prompt(random.Random(1), 100, 100)
    assert len(words(prompt).input_ids) <= 110
    assert len(build_tokenizer()(prompt).input_ids) == len(prompt.encode())
    odd = "Zebra-ish prompt, with punctuation! 日本語 ✓"
    assert words.decode(words(odd).input_ids) == odd
