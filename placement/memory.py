"""Memory model of Z-Image-Turbo per component: weights by dtype plus activations by resolution and batch.

Weights are exact (parameter counts of the real classes at the real configs, ../shared/REFERENCE.md).
Activations are linear in (images x megapixels) per component, plus a fixed part; the peak on a GPU is its
weights plus the largest activation among its components, because one replica runs its stages one after another
on a given device. The coefficients are calibrated against peaks measured on an H100 (torch's max allocated
memory, docs/benchmarks.md): whole pipeline at 1024^2 21.6 GiB (bs1), 24.0 (bs2), 28.7 (bs4), 1280^2 bs1 22.9.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
MPIX = 1024 * 1024
BYTES_PER_PARAM = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1}


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    params: int
    act_gib_per_mpix_image: float  # activation GiB per image per megapixel of output
    act_gib_per_image: float  # activation GiB per image independent of size (text encoder)
    act_gib_fixed: float  # workspace independent of batch and size

    def weights_gib(self, dtype: str) -> float:
        return self.params * BYTES_PER_PARAM[dtype] / GIB

    def activation_gib(self, pixels: int, batch: int) -> float:
        return self.act_gib_fixed + batch * (self.act_gib_per_image + self.act_gib_per_mpix_image * pixels / MPIX)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    dtype: str
    components: dict[str, ComponentSpec]

    def weights_gib(self, names) -> float:
        return sum(self.components[n].weights_gib(self.dtype) for n in names)

    def peak_gib(self, names, pixels: int, batch: int, overlap: bool = False) -> float:
        """Estimated peak GiB on one device holding ``names``, for a batch of ``batch`` images of ``pixels``.
        Stages run one after another on a device (the largest activation counts) unless ``overlap`` (stage
        pipelining), when their activations coexist and add up."""
        names = list(names)
        if not names:
            return 0.0
        acts = [self.components[n].activation_gib(pixels, batch) for n in names]
        return self.weights_gib(names) + (sum(acts) if overlap else max(acts))

    def max_batch_pixels(self, names, capacity_gib: float, overlap: bool = False) -> int:
        """The most (images x pixels) a device of ``capacity_gib`` holding ``names`` runs in one batch.
        Per-image fixed costs are charged as for one image (the bound is for the pixel budget)."""
        names = list(names)
        free = capacity_gib - self.weights_gib(names)
        comps = [self.components[n] for n in names]
        if overlap:  # all stages' activations at once: one combined linear budget
            room = free - sum(c.act_gib_fixed + c.act_gib_per_image for c in comps)
            rate = sum(c.act_gib_per_mpix_image for c in comps)
            if room < 0:
                return 0
            return int(room / rate * MPIX) if rate > 0 else 1 << 40
        best = None
        for c in comps:
            room = free - c.act_gib_fixed - c.act_gib_per_image
            if room < 0:
                return 0
            if c.act_gib_per_mpix_image > 0:
                px = int(room / c.act_gib_per_mpix_image * MPIX)
                best = px if best is None else min(best, px)
        return best if best is not None else 1 << 40


# Calibrated to the REFERENCE peaks: whole pipeline 19.11 GiB of bf16 weights, the VAE decode dominates
# activations at ~2.4 GiB per megapixel-image; transformer and text-encoder activations are far smaller.
_Z_IMAGE_TURBO = {
    "transformer": ComponentSpec("transformer", 6_154_908_736, 0.45, 0.0, 0.15),
    "text_encoder": ComponentSpec("text_encoder", 4_022_468_096, 0.0, 0.12, 0.05),
    "vae": ComponentSpec("vae", 83_819_683, 2.35, 0.0, 0.12),
}

# The toy model of the CPU demo and tests: a few MB, so any logical GPU fits it.
_TINY = {
    "transformer": ComponentSpec("transformer", 200_000, 0.01, 0.0, 0.0),
    "text_encoder": ComponentSpec("text_encoder", 40_000, 0.0, 0.001, 0.0),
    "vae": ComponentSpec("vae", 60_000, 0.02, 0.0, 0.0),
}


def model_spec(source: str, dtype: str = "bfloat16") -> ModelSpec:
    """The memory model for a model source: 'tiny' is the toy model; every other source is Z-Image-Turbo."""
    if dtype not in BYTES_PER_PARAM:
        raise ValueError(f"dtype must be one of {sorted(BYTES_PER_PARAM)}, got {dtype!r}")
    if source == "tiny":
        return ModelSpec("tiny-z-image", "float32", dict(_TINY))
    return ModelSpec("Z-Image-Turbo", dtype, dict(_Z_IMAGE_TURBO))
