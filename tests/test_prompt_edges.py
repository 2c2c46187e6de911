"""Prompt edges: the router's token bound against text the tokenizer's NFC normalization makes longer, and ``usage``
with the empty negative prompt guidance encodes."""

import unicodedata

import pytest
import torch

from actors.engine import ZImageEngine
from actors.models import build_components
from actors.screening import screen
from zimage_common.messages import Batch, ImageRequest

CPU = dict.fromkeys(("transformer", "text_encoder", "vae"), "cpu")


@pytest.fixture(scope="module")
def engine():
    return ZImageEngine(build_components("tiny"), CPU, torch.float32)


def packed_tokens(engine, r: ImageRequest) -> int:
    """What the replica really adds to a packed transformer call for ``r``: its pieces (image + caption, each
    padded), and its negative pass's with guidance, from the captions the engine actually encoded."""
    enc = engine.encode([r.prompt], [r.negative_prompt], [r.guidance_scale])
    latents = engine.initial_latents([r])[0]
    negative = enc.negative[0] if r.guidance_scale > 0 else None
    return sum(p.x_len + p.cap_len for p in engine.pieces(latents, enc.positive[0], negative))


# U+1D160 (MUSICAL SYMBOL EIGHTH NOTE, 4 UTF-8 bytes) is a composition exclusion: the Qwen2 tokenizer's NFC
# normalizer rewrites it as U+1D158 U+1D165 U+1D16E (12 bytes) before byte-level BPE. U+FB2C (a Hebrew presentation
# form, 3 bytes) becomes U+05E9 U+05BC U+05C1 (6 bytes). "One token covers at least one byte" (placement/memory.py
# caption_tokens_bound) holds only for the bytes the tokenizer really sees: those of the normalized text.
EXPANDING = ["\U0001D160" * 20, "\uFB2C" * 20]


@pytest.mark.parametrize("text", EXPANDING, ids=["musical-note", "hebrew-shin"])
@pytest.mark.parametrize("where", ["prompt", "negative_prompt"])
def test_router_token_bound_covers_nfc_expanding_text(engine, text, where):
    assert len(unicodedata.normalize("NFC", text).encode()) > len(text.encode())  # the premise
    if where == "prompt":
        r = ImageRequest("a", text, 0, 32, 32, 1, 0.0)
    else:
        r = ImageRequest("a", "a red fox", 0, 32, 32, 1, 4.0, negative_prompt=text)
    real = packed_tokens(engine, r)
    assert r.tokens >= real, (f"ImageRequest.tokens {r.tokens} under-estimates the {real} tokens the replica packs "
                              f"for this {where}")
    assert Batch(1, (r,)).tokens >= real


def test_usage_counts_the_empty_negative_prompt_guidance_encodes(engine):
    """With guidance and no negative prompt the engine (like diffusers) encodes "" for the negative pass; README:
    usage.input_tokens is "the prompt's text tokens as the text encoder sees them ... plus the negative prompt's
    when guidance uses it"."""
    r = ImageRequest("a", "a red fox", 0, 32, 32, 1, 4.0, negative_prompt=None)
    enc = engine.encode([r.prompt], [r.negative_prompt], [r.guidance_scale])
    assert len(enc.negative) == 1  # the negative pass was encoded
    encoded = enc.positive[0].shape[0] + enc.negative[0].shape[0]
    counted = screen(engine, Batch(1, (r,))).prompt_tokens["a"]
    assert counted == encoded, f"usage counts {counted} text tokens; the encoder saw {encoded}"
