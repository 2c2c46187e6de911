"""Memory model of Z-Image-Turbo per component: weights by dtype plus activations by what a batch holds.

Weights are exact (parameter counts of the real classes at the real configs). The transformer runs a batch as one
token sequence, so its activations grow with the batch's tokens (image plus caption tokens, each padded to 32,
twice with guidance), whatever the mix of sizes; the VAE decodes one image at a time (activations by the largest
image's pixels); the text encoder's grow with the number of prompts. The peak on a GPU is its weights plus the
largest activation among its components (an encode or decode beside a step is not added).

Coefficients measured on an H200 with the full-size model in bf16 (``benchmarks/probe_packed.py``, torch's max
allocated memory above the weights): a packed transformer forward 155 KiB per token, flat from 4,224 to 33,792
tokens; a VAE decode 2.37 GiB per megapixel."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

GIB = 1024**3
MPIX = 1024 * 1024
BYTES_PER_PARAM = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1}
# Quantized precisions: the quantizable linears take 1 byte a weight, everything else stays in 16 bits.
QUANTIZED = ("fp8", "int8")

# ---- which GPUs have fp8 tensor cores (Ada sm89, Hopper sm90, Blackwell; not Ampere, Turing, Volta) -------------
_FP8 = re.compile(r"\b(H100|H200|H800|H20|GH200|L4|L40S?|B100|B200|GB200|B300|ADA)\b|RTX ?[45]0[5-9]0")
_NO_FP8 = re.compile(r"\b(A100|A800|A10G?|A16|A2|A30|A40|RTX ?A[2-6]000|V100|T4|P100|P40|K80|TITAN)\b"
                     r"|RTX ?[23]0[5-9]0|GTX")


def fp8_capable(gpu_type: str) -> bool | None:
    """Whether a GPU model name (a node's free-form ``gpu_type``) has fp8 tensor cores: True for Ada, Hopper and
    Blackwell names, False for older ones, None when the name is empty or not recognised."""
    name = gpu_type.upper()
    if _FP8.search(name):
        return True
    if _NO_FP8.search(name):
        return False
    return None


# ---- tokens: what one image adds to a packed transformer call (the same rules as the transformer's) -------------
SIZE_MULTIPLE = 16  # VAE downsampling (8) x the transformer's 2x2 patches: one image token per 16x16 pixels
SEQ_MULTI_OF = 32  # the transformer pads image and caption tokens to a multiple of this
MAX_CAPTION_TOKENS = 512  # the pipeline's max_sequence_length
CAPTION_OVERHEAD_TOKENS = 24  # the chat template around a prompt (at most, in byte-level tokens)
TYPICAL_CAPTION_TOKENS = 128  # for plans stated as "a batch of N images at the target size"


def _round_up(n: int, m: int = SEQ_MULTI_OF) -> int:
    return -(-n // m) * m


def image_tokens(width: int, height: int) -> int:
    return (width // SIZE_MULTIPLE) * (height // SIZE_MULTIPLE)


def caption_tokens_bound(prompt_bytes: int) -> int:
    """An upper bound of a prompt's caption tokens without its tokenizer: a byte-level BPE token covers at least
    one byte of the text as the tokenizer normalizes it (NFC, which can lengthen it: ``prompt_bytes`` counts that
    form), and the caption is truncated at MAX_CAPTION_TOKENS."""
    return min(MAX_CAPTION_TOKENS, prompt_bytes + CAPTION_OVERHEAD_TOKENS)


def sample_tokens(width: int, height: int, caption_tokens: int = TYPICAL_CAPTION_TOKENS, cfg: bool = False,
                  negative_caption_tokens: int = CAPTION_OVERHEAD_TOKENS) -> int:
    """Tokens one image adds to the packed main-layer sequence (a second, negative pass with guidance)."""
    img = _round_up(image_tokens(width, height))
    n = img + _round_up(max(1, caption_tokens))
    if cfg:
        n += img + _round_up(max(1, negative_caption_tokens))
    return n


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    params: int
    quantizable_params: int = 0  # weights of the linears quantization applies to (actors/quantize.py)
    act_gib_fixed: float = 0.0  # workspace independent of the batch
    act_gib_per_token: float = 0.0  # per token of the packed batch (transformer)
    act_gib_per_mpix: float = 0.0  # per megapixel of the largest image (VAE: one image at a time)
    act_gib_per_prompt: float = 0.0  # per prompt of the batch (text encoder)
    resident_gib: float = 0.0  # held beside the weights for good (the text encoder's CUDA graph pool)

    def weights_gib(self, dtype: str, base: str = "bfloat16") -> float:
        """``dtype`` a torch dtype name, or 'fp8'/'int8' (the quantizable linears in one byte, the rest in
        ``base``)."""
        if dtype in QUANTIZED:
            rest = self.params - self.quantizable_params
            return (self.quantizable_params + rest * BYTES_PER_PARAM[base]) / GIB
        return self.params * BYTES_PER_PARAM[dtype] / GIB

    def activation_gib(self, tokens: int, largest_pixels: int, prompts: int) -> float:
        return (self.act_gib_fixed + tokens * self.act_gib_per_token + largest_pixels / MPIX * self.act_gib_per_mpix
                + prompts * self.act_gib_per_prompt)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    dtype: str
    components: dict[str, ComponentSpec]
    quantized: tuple[tuple[str, str], ...] = ()  # (component, "fp8" | "int8"): weights in 1 byte where quantizable
    lora_gib: float = 0.0  # per-request LoRA on the transformer's device (``with_loras``)
    lora_text: str = ""  # what lora_gib counts, for the plan's notes

    def precision(self, name: str) -> str:
        return dict(self.quantized).get(name, self.dtype)

    @property
    def precisions(self) -> dict[str, str]:
        return {n: self.precision(n) for n in self.components}

    def weights_gib(self, names) -> float:
        """Resident memory of ``names``: their weights and what each holds for good beside them, plus the LoRA
        adapters with the transformer."""
        names = list(names)
        lora = self.lora_gib if "transformer" in names else 0.0
        return sum(self.components[n].weights_gib(self.precision(n), self.dtype) + self.components[n].resident_gib
                   for n in names) + lora

    def load_peak_gib(self, names) -> float:
        """The peak while a device holding ``names`` starts: components load in the base dtype and are quantized
        on the device afterwards (one layer at a time), after a 512x512 reference run whose output the quantized
        model is checked against. Without quantization, just the weights."""
        names = list(names)
        if not any(self.precision(n) != self.dtype for n in names):
            return self.weights_gib(names)
        base = sum(self.components[n].weights_gib(self.dtype, self.dtype) for n in names)
        base += self.lora_gib if "transformer" in names else 0.0
        probe = max(self.components[n].activation_gib(sample_tokens(512, 512), 512 * 512, 1) for n in names)
        return base + probe

    def batch_peak_gib(self, names, tokens: int, largest_pixels: int, prompts: int) -> float:
        """Estimated peak GiB on one device holding ``names`` for one packed batch: the weights and the largest of
        its components' activations (an encode or decode beside a step is not added)."""
        names = list(names)
        if not names:
            return 0.0
        acts = [self.components[n].activation_gib(tokens, largest_pixels, prompts) for n in names]
        return self.weights_gib(names) + max(acts)

    def peak_gib(self, names, pixels: int, batch: int, size: tuple[int, int] | None = None) -> float:
        """The peak for ``batch`` images of ``size`` (width, height; without one, square-ish of ``pixels``), typical
        captions."""
        if size is None:
            side = int(pixels**0.5)
            size = (side, pixels // max(1, side))
        return self.batch_peak_gib(names, batch * sample_tokens(*size), pixels, batch)

    def max_batch_tokens(self, names, capacity_gib: float, largest_pixels: int, prompts: int) -> int:
        """The most packed tokens a device of ``capacity_gib`` holding ``names`` runs in one batch (very large
        when no component there grows with tokens; 0 when not even the rest fits)."""
        names = list(names)
        if self.load_peak_gib(names) > capacity_gib:
            return 0
        free = capacity_gib - self.weights_gib(names)
        comps = [self.components[n] for n in names]
        if any(c.activation_gib(0, largest_pixels, prompts) > free for c in comps):
            return 0
        growing = [c for c in comps if c.act_gib_per_token > 0]
        room = min((free - c.act_gib_fixed - largest_pixels / MPIX * c.act_gib_per_mpix
                    - prompts * c.act_gib_per_prompt for c in growing), default=free)
        rate = max((c.act_gib_per_token for c in growing), default=0.0)
        if room < 0:
            return 0
        return int(room / rate) if rate > 0 else 1 << 40

    def max_image_pixels(self, names, capacity_gib: float) -> int:
        """The largest single image a device holding ``names`` can take part in (alone in its batch)."""
        lo, hi = 0, 1 << 26  # 64 megapixels: far beyond the model's position table
        while lo < hi:  # every component's need grows with pixels: bisect
            mid = (lo + hi + 1) // 2
            side = int(mid**0.5)
            tokens = sample_tokens(side, mid // max(1, side), MAX_CAPTION_TOKENS)
            if self.batch_peak_gib(names, tokens, mid, 1) <= capacity_gib:
                lo = mid
            else:
                hi = mid - 1
        return lo


# The full-size model (weights exact; activations measured, see the module docstring). The text encoder's figure is
# per prompt padded to the longest of the batch (at most 512 tokens).
_Z_IMAGE_TURBO = {
    "transformer": ComponentSpec("transformer", 6_154_908_736, 6_016_204_800, act_gib_per_token=155 / 2**20),
    # Qwen3-4B without its last layer and final norm, which a replica never runs nor keeps (actors/engine.py)
    "text_encoder": ComponentSpec("text_encoder", 3_921_534_720, 3_532_390_400, act_gib_fixed=0.05,
                                  act_gib_per_prompt=0.12),
    "vae": ComponentSpec("vae", 83_819_683, act_gib_per_mpix=2.375),
}

# The text encoder's CUDA graphs (``model.text_encoder_graphs``, captured at warm-up): their memory pool, held for
# good. Measured on an H100 with the full-size encoder at its 48 buckets (tests/test_gpu.py, 464 MiB); the toy model
# runs on the CPU, where nothing is captured.
ENCODER_GRAPHS_GIB = {"full": 464 / 1024, "tiny": 0.0}

# The toy model of the CPU demo and tests: a few MB, so any logical GPU fits it.
_TINY = {
    "transformer": ComponentSpec("transformer", 200_000, act_gib_per_token=1e-6),
    "text_encoder": ComponentSpec("text_encoder", 40_000, act_gib_per_prompt=0.001),
    "vae": ComponentSpec("vae", 60_000, act_gib_per_mpix=0.02),
}


# A ControlNet lives beside the transformer (actors/controlnet.py) and is counted with it. Weights: the full-size
# random layout's own parameters (actors/controlnet.py FULL_CONTROLNET_CONFIG, counted on the meta device: 1.55 B;
# the embedders and refiners it shares with the transformer are not counted twice); never quantized. Activations:
# an estimate, not a measurement: six hints and two extra streams of [tokens, 3840] bf16 per token.
CONTROLNET_PARAMS = {"tiny": 150_000, "full": 1_550_778_368}
CONTROLNET_ACT_GIB_PER_TOKEN = {"tiny": 1e-6, "full": 8 * 3840 * 2 / 2**30}


# ---- per-request LoRA (actors/lora.py) ----------------------------------------------------------------------------
# The linears a LoRA applies to in each transformer block (q, k, v, out, w1, w2, w3; adaLN in the modulated blocks),
# from the architectures' configs: (dim, feed-forward dim, adaLN input dim, modulated blocks, unmodulated blocks).
LORA_SHAPES = {"Z-Image-Turbo": (3840, 10240, 256, 30 + 2, 2), "tiny-z-image": (64, 170, 64, 2 + 1, 1)}


def lora_adapter_gib(rank: int, model: str = "Z-Image-Turbo", bytes_per_value: int = 2) -> float:
    """Device memory of one adapter of ``rank`` on every linear it can target (``actors.lora.adapter_nbytes``)."""
    dim, ffn, adaln, modulated, plain = LORA_SHAPES[model]
    per_rank = 4 * 2 * dim + 3 * (dim + ffn)
    return rank * bytes_per_value * (modulated * (per_rank + adaln + 4 * dim) + plain * per_rank) / GIB


def with_loras(spec: ModelSpec, max_resident: int, max_rank: int) -> ModelSpec:
    """``spec`` with room for per-request LoRA on the transformer's device: ``max_resident`` adapters of rank up to
    ``max_rank``, and once more for the stacked copy a batch of that many distinct adapters builds."""
    if max_resident <= 0:
        return spec
    bytes_per_value = BYTES_PER_PARAM.get(spec.dtype, 2)
    one = lora_adapter_gib(max_rank, spec.name.split(" + ")[0], bytes_per_value)  # the base model's shapes
    total = 2 * max_resident * one
    text = (f"LoRA: {max_resident} resident adapter(s) of rank <= {max_rank} per replica, {one:.2f} GiB each, "
            f"{total:.2f} GiB with a batch's stacked copy, counted on the transformer's GPU")
    return replace(spec, lora_gib=total, lora_text=text)


# The transformer's blocks whose linears fp8 quantizes, all of one size: main blocks plus the 2 noise-refiner and 2
# context-refiner blocks (the toy model: 2 main, 1 + 1). ``model.fp8_bf16_blocks`` keeps some main blocks in bf16.
MAIN_BLOCKS = {"full": 30, "tiny": 2}
REFINER_BLOCKS = {"full": 4, "tiny": 2}


def model_spec(source: str, dtype: str = "bfloat16", transformer: str = "none",
               text_encoder: str = "none", controlnet: bool = False, bf16_blocks: int = 0,
               encoder_graphs: bool = False) -> ModelSpec:
    """The memory model for a model source: 'tiny' is the toy model; every other source is Z-Image-Turbo.
    ``transformer`` ('none' | 'fp8') and ``text_encoder`` ('none' | 'int8' | 'fp8') quantize those components'
    linear weights to one byte (the transformer's blocks; the text encoder's layers, weight-only). ``controlnet``:
    a ControlNet on the transformer's GPU, counted with the transformer (weights and activations). ``bf16_blocks``:
    with fp8, how many main blocks stay in 16 bits (their linears' weights count two bytes). ``encoder_graphs``: the
    text encoder's device also holds its CUDA graphs' pool."""
    if dtype not in BYTES_PER_PARAM:
        raise ValueError(f"dtype must be one of {sorted(BYTES_PER_PARAM)}, got {dtype!r}")
    if transformer not in ("none", "fp8") or text_encoder not in ("none", *QUANTIZED):
        raise ValueError(f"quantization: transformer none|fp8, text_encoder none|int8|fp8; got {transformer!r}, "
                         f"{text_encoder!r}")
    quantized = tuple((c, q) for c, q in (("transformer", transformer), ("text_encoder", text_encoder)) if q != "none")
    size = "tiny" if source == "tiny" else "full"
    comps = dict(_TINY if size == "tiny" else _Z_IMAGE_TURBO)
    if bf16_blocks:
        t, blocks = comps["transformer"], MAIN_BLOCKS[size] + REFINER_BLOCKS[size]
        if bf16_blocks > MAIN_BLOCKS[size]:
            raise ValueError(f"model.fp8_bf16_blocks keeps {bf16_blocks} main blocks in bf16; this model has "
                             f"{MAIN_BLOCKS[size]}")
        comps["transformer"] = replace(t, quantizable_params=t.quantizable_params * (blocks - bf16_blocks) // blocks)
    if controlnet:
        t = comps["transformer"]
        comps["transformer"] = replace(t, params=t.params + CONTROLNET_PARAMS[size],
                                       act_gib_per_token=t.act_gib_per_token + CONTROLNET_ACT_GIB_PER_TOKEN[size])
    if encoder_graphs:
        comps["text_encoder"] = replace(comps["text_encoder"], resident_gib=ENCODER_GRAPHS_GIB[size])
    name = ("tiny-z-image" if size == "tiny" else "Z-Image-Turbo") + (" + ControlNet" if controlnet else "")
    return ModelSpec(name, "float32" if size == "tiny" else dtype, comps, quantized)


# Relative throughput of a replica, for choosing among plans that fit (``planner.plan_best``).
# fp8 transformer against bf16: 1.323 / 0.986 img/s, compiled, uniform 1024^2 traffic at concurrency 8 on one H100
# (docs/benchmarks-history.md, calls s3-3 and s3-4). Batch size: a batch of one image ran at 0.914 of a batch of
# four (compiled, 1024^2, 0.866 at concurrency 1 vs 0.947 img/s at concurrency 8, call 3); 2 and 3 are
# interpolated, not measured. Text-encoder quantization changes memory, not speed (encoding is ~2% of a batch).
FP8_TRANSFORMER_SPEEDUP = 1.323 / 0.986
BATCH_EFFICIENCY = {1: 0.914, 2: 0.943, 3: 0.971}


def relative_throughput(transformer_precision: str, batch: int) -> float:
    speed = FP8_TRANSFORMER_SPEEDUP if transformer_precision == "fp8" else 1.0
    return speed * BATCH_EFFICIENCY.get(batch, 1.0)
