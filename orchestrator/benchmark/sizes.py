"""Sizes drawn at random over what users may send, and what each request costs the GPU, for ``zimage-orch bench``.

``random``: each request's size over the whole allowed range (multiples of 16, 256 to 2048 px a side, aspects 1:3
to 3:1, within ``limits.max_pixels``); ``random-1mp``: the same sides and aspects at 0.75-1.25 megapixels (an app's
aspect-ratio menu). No size comes from a list the deployment could be tuned on. Attention grows with the square of
an image's tokens, so megapixels/s cannot compare such phases with uniform ones: ``request_tflop`` counts each
request's arithmetic, and a phase's TFLOP/s over the uniform phase's says how well the GPU is used."""

from __future__ import annotations

import random

SIDE_MIN, SIDE_MAX, SIDE_STEP = 256, 2048, 16
MAX_ASPECT = 3.0
MENU_MP = (0.75, 1.25)

# Z-Image-Turbo (actors/models.py FULL_*_CONFIG): transformer width, FFN width, blocks, refiner blocks; the text
# encoder's parameters; the VAE decoder's arithmetic per output megapixel (about 10.5 TFLOP at 1024x1024)
DIM, FFN, MAIN_BLOCKS, REFINER_BLOCKS = 3840, 10240, 30, 2
TEXT_ENCODER_PARAMS = 4.02e9
VAE_TFLOP_PER_MP = 10.0
SEQ_MULTI_OF = 32


def draw_size(rng: random.Random, max_pixels: int, area_mp: tuple[float, float] | None = None) -> tuple[int, int]:
    """A (width, height): each side a multiple of 16 in [256, 2048], uniform over the sides that pass, with the
    longer side at most 3x the shorter, at most ``max_pixels``, and within ``area_mp`` megapixels when given."""
    lo, hi = SIDE_MIN // SIDE_STEP, SIDE_MAX // SIDE_STEP
    for _ in range(100_000):
        w, h = SIDE_STEP * rng.randint(lo, hi), SIDE_STEP * rng.randint(lo, hi)
        if max(w, h) > MAX_ASPECT * min(w, h) or w * h > max_pixels:
            continue
        if area_mp is not None and not area_mp[0] * 1e6 <= w * h <= area_mp[1] * 1e6:
            continue
        return w, h
    raise ValueError(f"no size within max_pixels={max_pixels} and area {area_mp} MP")


def _pad(n: int) -> int:
    return -(-n // SEQ_MULTI_OF) * SEQ_MULTI_OF


def request_tflop(width: int, height: int, prompt_tokens: int | None, steps: int) -> float:
    """The arithmetic of one text-to-image request (guidance 0), in TFLOP: ``steps`` transformer calls over its
    padded image tokens and caption (the main blocks over both, the noise refiner over the image, the context
    refiner once), the text encoder over the caption, one VAE decode."""
    n = _pad((width // 16) * (height // 16))
    c = _pad(prompt_tokens or 128)
    per_token = 2 * (4 * DIM * DIM + 3 * DIM * FFN)  # q, k, v, out and the SwiGLU feed-forward, per block

    def blocks(count: int, tokens: int) -> float:
        return count * (per_token * tokens + 4 * tokens * tokens * DIM)

    forward = blocks(MAIN_BLOCKS, n + c) + blocks(REFINER_BLOCKS, n)
    once = blocks(REFINER_BLOCKS, c) + 2 * TEXT_ENCODER_PARAMS * c
    return (steps * forward + once) / 1e12 + VAE_TFLOP_PER_MP * width * height / 1e6


def size_bucket(width: int, height: int) -> str:
    mp = width * height / 1e6
    for top, name in ((0.5, "<0.5MP"), (1.0, "0.5-1MP"), (2.0, "1-2MP")):
        if mp < top:
            return name
    return ">=2MP"


def bucket_stats(results, steps: int, percentile) -> dict:
    """Per size bucket of a phase: requests, mean megapixels, latency p50/p99 and their ratio, and seconds of
    latency per PFLOP of the request's own arithmetic (p50): equal across buckets where no size is served slower
    than its arithmetic says."""
    groups: dict[str, list] = {}
    for r in results:
        if r.ok:
            groups.setdefault(size_bucket(r.width, r.height), []).append(r)
    out = {}
    for name in ("<0.5MP", "0.5-1MP", "1-2MP", ">=2MP"):
        rs = groups.get(name)
        if not rs:
            continue
        lat = [r.latency_s for r in rs]
        per_pflop = [r.latency_s / (request_tflop(r.width, r.height, r.prompt_tokens, steps) / 1e3) for r in rs]
        p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
        out[name] = {"requests": len(rs), "mean_mp": round(sum(r.width * r.height for r in rs) / len(rs) / 1e6, 3),
                     "latency_p50_s": round(p50, 4), "latency_p99_s": round(p99, 4),
                     "p99_over_p50": round(p99 / p50, 3) if p50 else None,
                     "s_per_pflop_p50": round(percentile(per_pflop, 0.5), 4)}
    return out


def phase_tflop_s(results, elapsed: float, steps: int) -> float:
    """The phase's arithmetic per second of wall time (TFLOP/s)."""
    done = [r for r in results if r.ok]
    return round(sum(request_tflop(r.width, r.height, r.prompt_tokens, steps) for r in done) / elapsed, 2) \
        if elapsed > 0 else 0.0
