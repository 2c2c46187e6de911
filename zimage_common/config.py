"""Validated configuration: one small pydantic model per concern, loaded from YAML.

Every field has bounds and a description; unknown keys are rejected; any error (YAML syntax or validation)
becomes one ``ConfigError`` that names the file and the dotted path of the field, e.g.
``clusters/x.yaml: router.max_batch_size: Input should be less than or equal to 64 (got 100)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from placement.planner import COMPONENTS  # defined once, in the pure planner

from .cluster_config import ClusterConfig
from .config_http import LimitsConfig, RequestDefaults, ServerConfig, _Strict
from .config_text import UniqueKeyLoader, is_text_field
from .errors import ConfigError
from .frontdoor_config import FrontDoorConfig
from .jobs_config import BatchesConfig, OutputsConfig

__all__ = ["Config", "ConfigError", "LimitsConfig", "RequestDefaults", "ServerConfig", "config_from_dict",
           "load_config"]

DEFAULT_MODEL_ID = "Tongyi-MAI/Z-Image-Turbo"


class ControlNetConfig(_Strict):
    """A ControlNet for the transformer (diffusers' ``ZImageControlNetModel``, e.g. the Fun-ControlNet-Union weights),
    loaded on each replica beside its transformer, with the base model's cache and offline settings."""

    source: Literal["modelscope", "huggingface", "local", "tiny", "random-full"] = Field(
        description="modelscope / huggingface: a snapshot of model_id (in the base model's cache_dir); local: "
        "local_path; tiny: a toy-size ControlNet for the tiny model (tests); random-full: full-size random weights "
        "(timing; six control blocks, the 1.0 Union layout).")
    model_id: str | None = Field(default=None, description="Repository id (modelscope / huggingface).")
    revision: str | None = Field(default=None, description="Hub revision.")
    local_path: Path | None = Field(
        default=None, description="source=local: a diffusers directory (config.json) or a single .safetensors file.")
    filename: str | None = Field(
        default=None, description="Inside a hub snapshot: the single .safetensors file to load (from_single_file); "
        "None: the snapshot (or its subfolder) is a diffusers directory.")
    subfolder: str | None = Field(default=None, description="Subfolder of the diffusers directory, if any.")
    conditioning_scale: float = Field(
        default=0.75, ge=0, le=4, description="controlnet_conditioning_scale when a request sends none (diffusers' "
        "default).")

    @model_validator(mode="after")
    def _source_fields(self) -> ControlNetConfig:
        if self.source == "local" and self.local_path is None:
            raise ValueError("controlnet source='local' needs local_path")
        if self.source in ("modelscope", "huggingface") and not self.model_id:
            raise ValueError(f"controlnet source={self.source!r} needs model_id")
        return self


LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class LoraSpec(_Strict):
    """One LoRA adapter a replica loads at start-up (or ``POST /v1/loras`` registers at runtime)."""

    name: str = Field(
        pattern=LORA_NAME_PATTERN, description="What requests call it (``loras: [{name, scale}]``): letters, digits, "
        ". _ -.")
    path: str | None = Field(
        default=None, description="source=local: a .safetensors file, or a directory holding one. For a hub source: "
        "the file inside the snapshot (optional when it holds one).")
    source: Literal["local", "modelscope", "huggingface"] = Field(
        default="local", description="local: ``path`` on every replica's machine. modelscope / huggingface: a "
        "snapshot of ``model_id``, with model.cache_dir and model.offline's rules (cache first, no network offline).")
    model_id: str | None = Field(default=None, description="Hub repository id of the adapter (hub sources).")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit); None = default.")

    @model_validator(mode="after")
    def _where(self) -> LoraSpec:
        if self.source == "local" and not self.path:
            raise ValueError(f"LoRA {self.name!r}: source 'local' needs path (a .safetensors file or a directory)")
        if self.source != "local" and not self.model_id:
            raise ValueError(f"LoRA {self.name!r}: source {self.source!r} needs model_id")
        if self.source != "local" and (problem := hub_path_problem(self.path)):
            raise ValueError(f"LoRA {self.name!r}: {problem}")
        return self


def hub_path_problem(path: str | None) -> str | None:
    """Why ``path`` cannot name a file inside a hub snapshot (None when it can): it must be relative, without
    '..' (``actors/lora.py`` also checks the resolved file stays inside the snapshot)."""
    if path and (path.startswith(("/", "\\", "~")) or ".." in path.replace("\\", "/").split("/")):
        return "path names a file inside the hub snapshot: relative, without '..'"
    return None


class ModelConfig(_Strict):
    """Which weights to load and how."""

    source: Literal["modelscope", "huggingface", "local", "tiny", "random-full"] = Field(
        default="modelscope", description="modelscope / huggingface: a snapshot of model_id in that hub's cache "
        "(downloaded if missing and online). local: local_path in the diffusers layout. tiny: a toy-size model built "
        "from the real classes, saved and loaded back like real weights (CPU demo, tests). random-full: the real "
        "architecture at full size with random weights, built on the GPU (timing without weights).")
    model_id: str = Field(default=DEFAULT_MODEL_ID, description="Repository id on ModelScope / Hugging Face.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit); None = default.")
    local_path: Path | None = Field(default=None, description="source=local: directory with model_index.json.")
    cache_dir: Path | None = Field(
        default=None, description="Persistent model cache. None: the hub's own (MODELSCOPE_CACHE, HF_HUB_CACHE / "
        "HF_HOME); for source=tiny, ~/.cache/zimage-orchestrator.")
    offline: bool | None = Field(
        default=None, description="Never touch the network. None: offline when HF_HUB_OFFLINE=1 or "
        "MODELSCOPE_OFFLINE=1. A cached snapshot is always loaded without network access either way.")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="Weights dtype. Where the device lacks it, fall back with a warning (fp16 on "
        "pre-Ampere GPUs, fp32 on CPU).")
    low_cpu_mem_usage: bool = Field(default=True, description="Load weights without a full fp32 copy in RAM.")
    attention: Literal["runs"] = Field(
        default="runs", description="Attention over a packed batch: runs, one dense SDPA call (cuDNN on Hopper) per "
        "sample, no mask, each sequence length's plan built at warm-up; the only kernel the replica runs.")
    compile: bool = Field(
        default=False, description="torch.compile of the transformer blocks with dynamic shapes (GPU only): every "
        "graph is compiled during warm-up, none after ready.")
    compile_cpp_wrapper: bool = Field(
        default=False, description="With compile: the compiled transformer blocks launch their kernels from "
        "inductor's C++ wrapper instead of Python. Aimed at small images, where a step is paced by the host's ~500 "
        "launches rather than the GPU (512x512 on an H100, docs/benchmarks.md); the first compile takes longer (C++ "
        "builds, kept by compile_cache_dir). Opt-in: not yet run on a GPU (tests/test_gpu.py checks it there).")
    quantization: Literal["none", "fp8", "auto"] = Field(
        default="none", description="fp8: dynamic per-row float8 of the transformer blocks' linear layers (Ada/Hopper "
        "GPUs). The replica checks its output against bf16 at start-up and reports the error. auto: the planner "
        "chooses bf16 or fp8, whichever plan it estimates faster (fp8 only where it buys throughput, and never where "
        "a node's declared gpu_type has no fp8 tensor cores, e.g. A100; fp8 there is refused at plan time).")
    text_encoder_quantization: Literal["none", "int8", "fp8", "auto"] = Field(
        default="none", description="Weight-only quantization of the text encoder's linear layers (per-row scales; "
        "7.3 -> 4.0 GiB). Opt-in: int8 changes the caption embeddings by 8.8% (relative L2; the final 512^2 image by "
        "48 dB PSNR) on the full-size architecture with random weights (H200, 2026-11-27); each replica measures its "
        "own at start-up. auto: the planner uses int8 only where it is what makes a plan fit or batch more.")
    text_encoder_graphs: bool = Field(
        default=True, description="CUDA graphs of the text encoder at 48 (prompts, padded length) buckets, captured "
        "at the end of the warm-up on the encode stage's thread (GPU and deployment.warmup only): an encode launches "
        "its kernels in one call instead of from Python (on an H100 at 512x512, a lone request's encode went from 75 "
        "to 10 ms and the mean latency at half load fell 16%; docs/benchmarks.md). Off, or where nothing is captured "
        "(CPU, no warm-up, a remote encoder, a failed capture): the encoder runs eager.")
    fp8_backend: Literal["native"] = Field(
        default="native", description="How fp8 is done; native is the only one: plain-tensor float8 linears on "
        "torch._scaled_mm (first compile about 25 s on an H100). torchao's version of the same scheme is no longer "
        "offered: its first compile took 194 s.")
    fp8_bf16_blocks: list[int] | str = Field(
        default_factory=list,
        description="With fp8: main transformer blocks (0-29 on Z-Image-Turbo) kept in bf16, the rest in fp8. A "
        "list of block indices ([0, 1, 29]), or 'last:N' / 'first:N' (the N blocks at that end: vLLM-Omni keeps "
        "'last:15' because Z-Image under fp8 in every block turns to noise with real weights). Empty: every block "
        "in fp8. The replica's start-up probe reports the error of what is configured.",
    )
    compile_cache_dir: Path | None = Field(
        default=None, description="Persistent compile cache (TORCHINDUCTOR_CACHE_DIR); None: "
        "~/.cache/zimage-orchestrator/inductor.")
    seed: int = Field(default=0, ge=0, description="Weight seed for source=tiny and random-full.")
    controlnet: ControlNetConfig | None = Field(
        default=None, description="A ControlNet beside the transformer on every replica (request extensions "
        "control_image, controlnet_conditioning_scale); None: requests with a control image are refused.")
    loras: list[LoraSpec] = Field(
        default_factory=list, description="LoRA adapters every replica loads at start-up; requests pick theirs per "
        "request (``loras`` extension field), several per batch (actors/lora.py).")
    lora_max_resident: int | None = Field(
        default=None, ge=0, le=64, description="Adapters kept on each replica's transformer GPU (least recently used "
        "leave first; the others stay in host memory and are copied in for the batch that needs them). The planner "
        "counts their memory. None: min(4, number of model.loras), 0 without any; set it (and model.lora_dir) to "
        "register adapters at runtime (POST /v1/loras) when none are configured. 0: LoRA off.")
    lora_max_rank: int = Field(
        default=64, ge=1, le=1024, description="The largest adapter rank accepted, and what the planner counts per "
        "resident adapter.")
    lora_dir: Path | None = Field(
        default=None, description="The directory adapters registered at runtime (POST /v1/loras, "
        "Deployment.register_lora) are read from, on every replica's machine: their path is relative to it (or "
        "absolute inside it); symlinks are resolved and must stay inside. None: runtime registration of local files "
        "is refused. model.loras is not limited to it.")
    lora_max_runtime: int = Field(
        default=16, ge=0, le=4096, description="Adapters registered at runtime (POST /v1/loras) at most, beside "
        "model.loras; past it a registration is refused (409) until one is removed.")
    lora_max_runtime_bytes: int = Field(
        default=4 * 1024**3, ge=0, le=1024**4, description="Host memory all runtime adapters together may take on "
        "each replica (their factors, as the replica holds them); a registration past it is refused (409).")
    lora_max_file_bytes: int = Field(
        default=2 * 1024**3, ge=1024, le=1024**4, description="Largest adapter file read (checked before it is "
        "opened); larger is a 400 naming path.")
    lora_runtime_hub: bool = Field(
        default=False, description="Let runtime registration name hub adapters (source huggingface / modelscope): "
        "every replica then fetches the repository a client names (unless model.offline). Off: only model.loras may "
        "use hub sources.")

    @model_validator(mode="after")
    def _source_fields(self) -> ModelConfig:
        if self.source == "local" and self.local_path is None:
            raise ValueError("source='local' needs local_path: the directory that holds model_index.json")
        if self.source != "local" and self.local_path is not None:
            raise ValueError(f"local_path is only used with source='local' (source is {self.source!r})")
        if self.fp8_bf16_blocks and self.quantization == "none":
            raise ValueError("fp8_bf16_blocks chooses blocks to keep out of fp8, but quantization is 'none': set "
                             "quantization to 'fp8' (or 'auto'), or remove fp8_bf16_blocks")
        if self.compile_cpp_wrapper and not self.compile:
            raise ValueError("compile_cpp_wrapper changes how the compiled blocks launch, but compile is false: set "
                             "compile to true, or remove compile_cpp_wrapper")
        return self

    @field_validator("attention", mode="before")
    @classmethod
    def _retired_attention(cls, v: Any) -> Any:
        if v in ("varlen", "flex"):  # 1.3-2.2x slower than runs on an H200 (benchmarks/probe_packed.py attn)
            raise ValueError(f"attention {v!r} is no longer offered: 'runs' is the only kernel (set it, or remove "
                             f"the setting)")
        return v

    @field_validator("fp8_backend", mode="before")
    @classmethod
    def _retired_fp8_backend(cls, v: Any) -> Any:
        if v == "torchao":  # its first compile took 194 s against native's 25 (docs/benchmarks-history.md)
            raise ValueError("fp8 backend 'torchao' is no longer offered: 'native' is the only one (set it, or remove "
                             "the setting)")
        return v

    @field_validator("fp8_bf16_blocks", mode="before")
    @classmethod
    def _bf16_blocks(cls, v: Any) -> Any:
        form = "a list of main-block indices such as [0, 1, 29], or 'last:N' / 'first:N' such as 'last:15'"
        if isinstance(v, str):
            end, sep, n = v.strip().partition(":")
            if not sep or end not in ("last", "first") or not n.isdigit():
                raise ValueError(f"{v!r} is not a block choice: give {form}")
            return f"{end}:{int(n)}"
        if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            raise ValueError(f"expected {form}")
        bad = sorted({i for i in v if i < 0})
        dup = sorted({i for i in v if v.count(i) > 1})
        if bad or dup:
            what = "; ".join(x for x in (f"negative: {bad}" if bad else "", f"repeated: {dup}" if dup else "") if x)
            raise ValueError(f"block indices count from 0 and appear once each; {what}")
        return sorted(v)

    @field_validator("loras")
    @classmethod
    def _unique_loras(cls, v: list[LoraSpec]) -> list[LoraSpec]:
        names = [x.name for x in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"LoRA names must be unique; repeated: {', '.join(dup)}")
        return v

    @property
    def lora_slots(self) -> int:
        """Adapters resident per replica (``lora_max_resident`` resolved); 0 means LoRA is off."""
        return self.lora_max_resident if self.lora_max_resident is not None else min(4, len(self.loras))

    def is_offline(self) -> bool:
        if self.offline is not None:
            return self.offline
        env = lambda k: os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")  # noqa: E731
        return env("HF_HUB_OFFLINE") or env("MODELSCOPE_OFFLINE")


class DeploymentConfig(_Strict):
    """How many replicas and where their components live."""

    mode: Literal["replicate", "split", "auto", "shared-encoder"] = Field(
        default="replicate", description="replicate: one whole pipeline per GPU. split: each replica spans "
        "gpus_per_replica GPUs with the device_map below. auto: the planner chooses. shared-encoder (experimental: "
        "slower than replicate where measured, see docs/benchmarks.md): one text encoder per node, in a whole "
        "pipeline on its first GPU, serves transformer + VAE replicas on the node's other GPUs.")
    replicas: int | None = Field(
        default=None, ge=1, le=4096, description="Number of replicas. None: as many as the inventory fits.")
    gpus_per_replica: int = Field(default=1, ge=1, le=8, description="GPUs each replica holds (split mode).")
    device_map: dict[str, int] | None = Field(
        default=None, description="split mode: component -> GPU index within the replica, e.g. {text_encoder: 0, "
        "transformer: 1, vae: 1}.")
    cpu_per_replica: float = Field(default=1.0, ge=0, le=256, description="Ray CPUs reserved per replica.")
    torch_threads: int | None = Field(
        default=None, ge=1, le=256, description="torch.set_num_threads inside a CPU replica; None: torch's default.")
    warmup: bool = Field(
        default=True, description="Before reporting ready, run the batches that compile every graph serving needs "
        "(model.compile): one image alone, several of one size, several of mixed sizes and prompt lengths at "
        "warmup_sizes, and attention's plans for every length within limits.max_pixels. After ready nothing compiles: "
        "a call no graph covers runs eager and is counted (zimage_eager_fallbacks_total).")
    warmup_sizes: list[str] = Field(
        default_factory=lambda: ["512x512", "1024x1024", "768x1344", "1344x768", "1024x768"],
        description="Image sizes (WxH) of the warm-up batches, which show the replica serves before it reports ready. "
        "Speed does not depend on them: the transformer's and the VAE decoder's graphs have dynamic shapes and cover "
        "every size. Sizes larger than a replica's plan allows are skipped.")
    start_timeout_s: float = Field(
        default=1800.0, gt=0, le=86_400, description="Longest a replica may take to load and warm up.")
    health_interval_s: float = Field(
        default=15.0, gt=0, le=3600, description="Seconds between health checks (a real small forward) per replica.")
    health_timeout_s: float = Field(
        default=60.0, gt=0, le=3600, description="A health check slower than this counts as a failed check.")
    unresponsive_after_s: float = Field(
        default=10.0, gt=0, le=3600, description="A live replica whose health check has waited this long for an "
        "answer is reported as not answering on /readyz (503 when no live replica answers), before its checks time "
        "out and it is recycled.")
    health_failures_before_restart: int = Field(
        default=3, ge=1, le=100, description="Failed (or timed-out) health checks in a row before a replica counts as "
        "hung and is recycled. A check that cannot reach the replica's process takes it out of rotation at once.")
    gpu_memory_limit_gib: float | None = Field(
        default=None, gt=0, le=1024, description="Cap each replica's allocator at this many GiB per GPU (plans with "
        "it too), e.g. 23.5 to emulate 24 GB cards on an 80 GB GPU.")

    @field_validator("warmup_sizes")
    @classmethod
    def _sizes(cls, v: list[str]) -> list[str]:
        for size in v:
            parts = size.lower().split("x")
            if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 and int(p) % 16 == 0 for p in parts):
                raise ValueError(f"{size!r} is not WIDTHxHEIGHT with both sides positive multiples of 16, "
                                 f"e.g. '1024x768'")
        return v

    @field_validator("device_map")
    @classmethod
    def _known_components(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        if v is None:
            return v
        unknown = sorted(set(v) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"unknown component(s) {unknown}; allowed: {list(COMPONENTS)}")
        missing = sorted(set(COMPONENTS) - set(v))
        if missing:
            raise ValueError(f"device_map must place every component; missing {missing}")
        bad = {k: i for k, i in v.items() if i < 0}
        if bad:
            raise ValueError(f"GPU indices must be >= 0, got {bad}")
        return v

    @model_validator(mode="after")
    def _mode_fields(self) -> DeploymentConfig:
        if self.mode != "split":  # the other modes choose their own layout: a set value would be ignored
            if self.device_map is not None:
                raise ValueError(f"device_map is only used with mode 'split' (mode is {self.mode!r}); remove it, or "
                                 f"set mode: split")
            if self.gpus_per_replica != 1:
                raise ValueError(
                    f"mode {self.mode!r} chooses how many GPUs a replica holds (gpus_per_replica must be 1, got "
                    f"{self.gpus_per_replica}); use mode 'split' for replicas of a fixed number of GPUs"
                )
        if self.mode == "split" and self.device_map is not None:
            top = max(self.device_map.values())
            if top >= self.gpus_per_replica:
                raise ValueError(
                    f"device_map uses GPU index {top} but gpus_per_replica is {self.gpus_per_replica}; "
                    f"indices are 0..{self.gpus_per_replica - 1}"
                )
            empty = sorted(set(range(self.gpus_per_replica)) - set(self.device_map.values()))
            if empty:  # the replica would hold them (its placement group reserves every one) and use none
                raise ValueError(
                    f"device_map places nothing on replica-local GPU(s) {empty}, which each replica would hold "
                    f"unused; set gpus_per_replica to {len(set(self.device_map.values()))} and renumber the map")
        if self.mode == "split" and self.device_map is None and self.gpus_per_replica > len(COMPONENTS):
            raise ValueError(f"gpus_per_replica {self.gpus_per_replica}: a replica has {len(COMPONENTS)} components, "
                             f"so the GPUs past {len(COMPONENTS)} would be held unused; use at most {len(COMPONENTS)}")
        return self


@dataclass(frozen=True)
class JoinPolicy:
    """When a waiting sample joins a replica's running set at the next step (``router.scheduling`` and the
    ``router.step_*`` fields; ``actors/steploop.py``). Joining is never free: every running sample's steps slow down
    by about the joiner's share of the packed tokens, so once the GPU is busy a join only pays where it shortens
    more waiting than it adds. Within the replica's hard limits (tokens, samples, adapters), the head of the waiting
    queue joins a running set that has run steps when any of these holds (unless ``never``):

    - ``free_tokens``: the running set's tokens with it stay within this (small images, where the GPU is
      expected not to be saturated yet, so the step takes little longer with it; not measured);
    - ``window``: every running sample has run at most this many steps (a set that just started takes late
      arrivals);
    - ``short_ratio``: its work (tokens x steps to run) is at most this fraction of every running sample's
      remaining work (a short request does not wait behind a long one; the long ones slow down briefly).

    Otherwise it waits for room: when the running set empties, everything waiting starts together, within the
    limits. ``never``: a running set takes no newcomer until it ends (``router.scheduling = "batch"``).

    These rules decide only where the replica has not measured the step costs involved: a replica times its own
    steps and, where it knows what the sets in question cost, joins exactly where that lowers the summed completion
    times of the running samples and the newcomer (``actors/step_cost.py``); ``never`` holds either way."""

    free_tokens: int = 4096
    window: int = 1
    short_ratio: float = 0.5
    never: bool = False


class RouterConfig(_Strict):
    """Dynamic batching and admission control."""

    max_batch_size: int = Field(default=16, ge=1, le=256, description="Most images in one pipeline call.")
    max_batch_tokens: int = Field(
        default=18_432, ge=64, le=1_000_000, description="Token budget of one packed batch (image tokens + caption "
        "tokens, twice with guidance; a 1024x1024 image is 4,096 image tokens). Batches fill up to it whatever their "
        "mix of sizes; the plan's memory budget lowers it where a GPU holds less. The default, about four 1024x1024 "
        "images with long prompts, is where a step's time on an H100 grows in proportion to its tokens.")
    max_wait_ms: float = Field(
        default=10.0, ge=0, le=60_000, description="scheduling=batch: how long the oldest request may wait for "
        "batch-mates while a replica has room. Under scheduling=step a request is sent at once: the replica's loop "
        "takes later arrivals at its next step.")
    queue_limit: int = Field(default=256, ge=1, le=1_000_000, description="Requests waiting before 429.")
    request_timeout_s: float = Field(default=600.0, gt=0, le=86_400, description="Queue + run time limit.")
    max_attempts: int = Field(
        default=3, ge=1, le=10, description="Tries per request when its replica dies (seeded, so idempotent).")
    hang_factor: float = Field(
        default=5.0, gt=1, le=100, description="A batch running this many times longer than expected (learned per "
        "replica from the time per token-step of its finished batches) counts as hung: its requests are re-dispatched "
        "and the replica is recycled.")
    hang_min_s: float = Field(
        default=180.0, gt=0, le=86_400, description="Never call a batch hung before this many seconds (covers "
        "compiling a new shape).")
    first_batch_timeout_s: float = Field(
        default=900.0, gt=0, le=86_400, description="Hang limit for a replica's batches before it has history.")
    scheduling: Literal["batch", "step"] = Field(
        default="step", description="How requests join a replica's denoising loop (every replica runs one, "
        "actors/steploop.py; requests join it at its next step, whatever their step count, size and guidance, within "
        "max_batch_tokens and max_batch_size, and leave it when done; hang detection counts from each step). step: a "
        "waiting request joins a running set where joining pays: by the replica's measured step times where it has "
        "them, else by the step_* rules below. batch: a running set "
        "takes no newcomer until it ends (whole batches one after another; the next one waits at the replica, "
        "encoded).")
    step_free_tokens: int = Field(
        default=JoinPolicy.free_tokens, ge=0, le=1_000_000, description="scheduling=step: a waiting sample joins a "
        "running set at any step while the set's packed tokens with it stay within this (small images, where a step's "
        "time is expected to grow little with its tokens). On an H100 a step's time grows in proportion to its tokens "
        "from one 1024x1024 image (4,096 tokens) up.")
    step_join_window: int = Field(
        default=JoinPolicy.window, ge=0, le=50, description="scheduling=step: a waiting sample joins while every "
        "running sample has run at most this many steps (a batch that just started takes late arrivals).")
    step_short_ratio: float = Field(
        default=JoinPolicy.short_ratio, ge=0, le=1, description="scheduling=step: a waiting sample joins at once "
        "where its work (tokens x steps) is at most this fraction of every running sample's remaining work (short "
        "requests do not wait behind long ones). Other samples wait for room: joining a busy GPU slows every running "
        "sample.")

    def join_policy(self) -> JoinPolicy:
        """What the router tells each replica about joining, for every call it sends."""
        return JoinPolicy(self.step_free_tokens, self.step_join_window, self.step_short_ratio,
                          never=self.scheduling == "batch")


class Config(_Strict):
    """The whole deployment."""

    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    defaults: RequestDefaults = Field(default_factory=RequestDefaults)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)
    batches: BatchesConfig = Field(default_factory=BatchesConfig)
    frontdoor: FrontDoorConfig = Field(default_factory=FrontDoorConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        d, lim = self.defaults, self.limits
        if self.frontdoor.pool is not None and self.cluster.address is None:
            raise ValueError(
                f"frontdoor.pool = {self.frontdoor.pool!r} keeps replicas that outlive this process, which a local Ray "
                f"started by it does not: set cluster.address to a running cluster ('auto' after `ray start --head`), "
                f"or remove frontdoor.pool")
        if d.width * d.height > lim.max_pixels:
            raise ValueError(
                f"defaults.width*height = {d.width}x{d.height} = {d.width * d.height} pixels exceeds "
                f"limits.max_pixels = {lim.max_pixels}; lower the default size or raise the limit"
            )
        if d.num_inference_steps > lim.max_steps:
            raise ValueError(
                f"defaults.num_inference_steps = {d.num_inference_steps} exceeds limits.max_steps = {lim.max_steps}"
            )
        over = {q: n for q, n in d.quality_steps.items() if n > lim.max_steps}
        if over:
            raise ValueError(f"defaults.quality_steps {over} exceed limits.max_steps = {lim.max_steps}")
        return self


# The embedded default the demo runs on: a tiny model on the CPU under a local Ray with two logical GPUs.
# clusters/local-cpu.yaml spells out the same thing (a test keeps them equal).
LOCAL_CPU_DEFAULT: dict[str, Any] = {
    "cluster": {"num_cpus": 2, "num_gpus": 2},
    "model": {"source": "tiny", "dtype": "float32"},
    "deployment": {"mode": "replicate", "replicas": 2, "cpu_per_replica": 1, "torch_threads": 1},
    "router": {"max_batch_size": 4, "max_wait_ms": 50, "queue_limit": 256, "request_timeout_s": 120},
    "defaults": {"width": 128, "height": 128, "num_inference_steps": 4, "guidance_scale": 0.0},
}


# Keys that configs may still carry from older versions: what to do instead (any other unknown key is a typo).
RETIRED = {
    ("deployment", "pipeline_stages"): "removed: every replica's step loop overlaps encode, denoise and decode "
    "(callers encode and decode beside the loop's steps); delete the key",
    ("deployment", "max_inflight_batches"): "removed: the router keeps up to two running sets' worth of requests at "
    "each replica (router.max_batch_tokens and router.max_batch_size), so the next work is encoded before the "
    "replica has room for it; delete the key",
}


SECRET_FIELDS = {"signing_secret", "api_keys"}  # a rejected value of these is never echoed into logs


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] in ("model_type", "model_attributes_type") and e.get("input") is None and len(e["loc"]) == 1:
            msg = "the section is empty (its keys commented out?): remove it for the defaults, or add keys"
        elif e["type"] == "extra_forbidden":
            msg = RETIRED.get(tuple(e["loc"]),
                              "unknown key (check the spelling; see the config reference in README.md)")
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
            secret = any(str(part) in SECRET_FIELDS for part in e["loc"])
            msg = f"{msg} (got {'a value not shown: it is a secret' if secret else repr(e['input'])})"
        lines.append(f"{source}: {path}: {msg}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(source, e)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """``["model.compile=true", "router.max_batch_size=8"]`` -> a copy of ``data`` with those fields set.
    Values are parsed as YAML scalars, so ``true``, ``8`` and ``[1, 2]`` get their natural types."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path.strip():
            raise ConfigError(f"{source}: --set {item!r}: expected dotted.path=value, e.g. model.compile=true")
        node = out
        parts = path.strip().split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: --set {item!r}: {p} is not a section")
            node = child
        shown = item if parts[-1] not in SECRET_FIELDS else f"{path.strip()}=..."
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: --set {shown!r}: the value is not valid YAML ({getattr(e, 'problem', e)}); "
                              f"quote it, e.g. --set '{path.strip()}=\"...\"'") from None
        if value is not None and not isinstance(value, str) and is_text_field(Config, parts):
            value = raw.strip()  # a text field keeps what was typed: a revision 0123, a host ::, a name 1.0
        node[parts[-1]] = value
    return out


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Load and validate a YAML config (``None``: the embedded local-CPU default), with ``--set`` overrides."""
    if path is None:
        source = "<embedded local-cpu default>"
        return config_from_dict(apply_overrides(LOCAL_CPU_DEFAULT, overrides or [], source), source)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a UTF-8 text file; a config is YAML text") from None
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader that refuses repeated keys
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        # PyYAML splits its message: a context ("expected a single document in the stream") and the problem
        problem = "; ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or e
        hint = " (a config is one YAML document: remove the '---' and merge the sections)" \
            if "another document" in str(problem) else ""
        raise ConfigError(f"{p}: invalid YAML{where}: {problem}{hint}") from None
    if data is None:
        data = {}
    if isinstance(data, dict):  # a section whose keys are all commented out means its defaults, as an empty file
        data = {k: ({} if v is None else v) for k, v in data.items()}
    if overrides and isinstance(data, dict):  # any other top level is refused by config_from_dict
        data = apply_overrides(data, overrides, str(p))
    return config_from_dict(data, str(p))
