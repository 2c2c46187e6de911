"""Z-Image-Turbo component definitions: the real configs, a toy-size variant, and builders.

The real configs are the ones published with ``Tongyi-MAI/Z-Image-Turbo`` (its ``*/config.json`` files).
The toy-size variant keeps every structural property the orchestrator relies on (same classes, a VAE with
four blocks so the 16-pixel size rule is the same, a chat-templated Qwen2 tokenizer, variable-length
caption embeddings) so that the CPU tests exercise the real code paths.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

FULL_TRANSFORMER_CONFIG: dict[str, Any] = {}  # ZImageTransformer2DModel's defaults are the real config.

FULL_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 2560,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 9728,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_theta": 1_000_000.0,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "hidden_act": "silu",
}

FULL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}

SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}

TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "dim": 64,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "cap_feat_dim": 32,
    "axes_dims": [8, 12, 12],
    "axes_lens": [1024, 512, 512],
}

TINY_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    **FULL_TEXT_ENCODER_CONFIG,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "intermediate_size": 64,
    "max_position_embeddings": 1024,
    # vocab_size is filled in from the tokenizer.
}

TINY_VAE_CONFIG: dict[str, Any] = {
    **FULL_VAE_CONFIG,
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
}

# Qwen3's chat template, reduced to what ZImagePipeline uses (user turn, generation prompt, thinking switch).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def build_tokenizer(english: bool = False):
    """A Qwen2 tokenizer built offline (the real one cannot be downloaded here): the same class, special tokens,
    padding and chat template, so the pipeline's text path runs unchanged. Without ``english``: no merges (one token
    per byte). With ``english`` (the full-size model the benchmarks time): BPE merges learnt from the benchmark's
    prompts (``zimage_common/prompts.py``), so common English words are single tokens and captions have the lengths
    real prompts have; other text still encodes, byte by byte."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2TokenizerFast

    if english:
        vocab, merges = _english_bpe()
    else:
        vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        for ch in sorted(ByteLevel.alphabet()):
            vocab.setdefault(ch, len(vocab))
        merges = []
    tok = Qwen2TokenizerFast(vocab=vocab, merges=merges, model_max_length=131072)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _english_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a byte-level BPE trained (deterministically, in about 50 ms) on English prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from zimage_common.prompts import PROMPTS, WORDS

    corpus = [*PROMPTS, " ".join(WORDS), "user\nassistant\n<think>\n\n</think>\n\n"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=4096, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_components(size: str, device: str | dict[str, str] = "cpu", dtype=None, seed: int = 0) -> dict[str, Any]:
    """The five pipeline components from the real classes, random weights; ``size``: ``"tiny"`` or ``"full"``. Built
    directly on ``device`` in ``dtype`` (the default dtype switched meanwhile: a full-size model never has an fp32
    copy); ``"meta"`` builds without memory; a dict maps each component to its own device."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    dtype = dtype or torch.float32
    tokenizer = build_tokenizer(english=size == "full")
    if size == "tiny":
        t_cfg, te_cfg, vae_cfg = TINY_TRANSFORMER_CONFIG, dict(TINY_TEXT_ENCODER_CONFIG), TINY_VAE_CONFIG
        te_cfg["vocab_size"] = len(tokenizer)
    else:
        t_cfg, te_cfg, vae_cfg = FULL_TRANSFORMER_CONFIG, FULL_TEXT_ENCODER_CONFIG, FULL_VAE_CONFIG

    devices = device if isinstance(device, dict) else dict.fromkeys(("transformer", "text_encoder", "vae"), device)
    if "meta" not in devices.values():
        torch.manual_seed(seed)
    builders = {
        "transformer": lambda: ZImageTransformer2DModel(**t_cfg),
        "text_encoder": lambda: Qwen3Model(Qwen3Config(**te_cfg)),
        "vae": lambda: AutoencoderKL(**vae_cfg),
    }
    out: dict[str, Any] = {"tokenizer": tokenizer, "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)}
    with _default_dtype(dtype):
        for name, build in builders.items():
            if name in devices:  # a replica that borrows another's text encoder builds none of its own
                with torch.device(devices[name]):
                    out[name] = build().eval().requires_grad_(False)
    if size == "tiny" and devices.get("transformer", "meta") != "meta":
        _reinit_tiny(out["transformer"], seed)
    return out


def _reinit_tiny(transformer, seed: int) -> None:
    """Give the parameters the transformer initialises to zero (its image and caption pad-token embeddings) small
    random values, so padding is not a silent no-op in the toy model's outputs that tests compare."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in transformer.parameters():
            if p.abs().sum() == 0 and p.dim() >= 1:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.02)


def build_pipeline(size: str, device: str = "cpu", dtype=None, seed: int = 0):
    from diffusers import ZImagePipeline

    return ZImagePipeline(**build_components(size, device=device, dtype=dtype, seed=seed))


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    """Build the toy-size pipeline and ``save_pretrained`` it in the real repository layout."""
    path = Path(path)
    pipe = build_pipeline("tiny", seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(path), safe_serialization=True)
    (path / "zimage_orchestrator.json").write_text(json.dumps({"kind": "tiny", "seed": seed}))
    return path
