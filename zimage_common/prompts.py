"""Benchmark prompts, as pure data: the short uniform prompts ``zimage-orch bench`` sends, and the vocabulary its
varied-length prompts (3 to 160 words) are drawn from. The full-size random-weight model's tokenizer learns its
word merges from this text (``actors/models.py``), so these prompts cost as many tokens as with Qwen's tokenizer.
"""

from __future__ import annotations

import random

PROMPTS = [
    "a photograph of an astronaut riding a horse on mars, cinematic lighting",
    "a watercolor painting of a quiet harbor town at dawn, soft pastel colors",
    "a close-up portrait of an elderly fisherman with a weathered face, 85mm lens",
    "a futuristic city skyline at night with flying cars and neon signs in the rain",
    "a bowl of steaming ramen with a soft boiled egg, studio food photography",
    "an isometric illustration of a cozy library with floating books and warm lamps",
    "a red fox curled up asleep in fresh snow under a pine tree, morning light",
    "a vintage poster for a steam train journey through snowy mountains",
]

WORDS = ("a cinematic photograph of an old lighthouse keeper standing on wet rocks at dawn with waves crashing "
         "below soft golden light fog rolling in from the sea gulls circling overhead detailed texture on the "
         "weathered stone walls rusted iron railings a small red boat tied to the pier reflections in shallow "
         "tide pools distant mountains under pastel clouds shot on medium format film shallow depth of field "
         "natural colors high dynamic range wide angle composition leading lines towards the horizon quiet "
         "peaceful mood an illustration in the style of a vintage travel poster bold shapes limited palette").split()


def varied_prompt(rng: random.Random, lo: int = 3, hi: int = 160) -> str:
    """A prompt of ``lo`` to ``hi`` words (uniform), as real users write them: from three words to a paragraph."""
    n = rng.randint(lo, hi)
    start = rng.randrange(len(WORDS))
    return " ".join(WORDS[(start + k) % len(WORDS)] for k in range(n))
