"""Model loading: find the weights (ModelScope, the Hugging Face cache, a local path, or the toy model) and load
them through diffusers' ``from_pretrained``, with the settings users otherwise tune by hand.

A cached snapshot is loaded without network access, and the log says it was a cache hit and where. A missing
snapshot on an offline machine fails with the directories searched and the command that fetches the model.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from zimage_common.config import ModelConfig
from zimage_common.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("ZIMAGE_CACHE", Path.home() / ".cache" / "zimage-orchestrator"))


class ModelNotFoundError(ConfigError):
    """The weights are not where the config says and cannot be fetched."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path | None  # None for random-full (nothing on disk)
    source: str
    cache_hit: bool
    detail: str


def resolve_model(cfg: ModelConfig) -> ResolvedModel:
    """Return the local directory holding the model in the diffusers layout, fetching it only when allowed."""
    if cfg.source == "random-full":
        return ResolvedModel(None, cfg.source, False, "full-size random weights built in place")
    if cfg.source == "local":
        return _resolve_local(Path(cfg.local_path).expanduser())
    if cfg.source == "tiny":
        return _resolve_tiny(cfg)
    if cfg.source in ("modelscope", "huggingface"):
        return _resolve_hub(cfg)
    raise ConfigError(f"model.source: unknown source {cfg.source!r}")


def _resolve_local(path: Path) -> ResolvedModel:
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"model.local_path: {path} does not hold a diffusers pipeline (no model_index.json). Point it at "
            f"the directory you downloaded, e.g. `modelscope download --model Tongyi-MAI/Z-Image-Turbo "
            f"--local_dir {path}`."
        )
    return ResolvedModel(path, "local", True, f"local directory {path}")


def _resolve_tiny(cfg: ModelConfig) -> ResolvedModel:
    from .models import save_tiny_model

    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else DEFAULT_CACHE
    path = root / f"tiny-zimage-seed{cfg.seed}"
    if (path / "model_index.json").is_file():
        log.debug("tiny model: cache hit at %s", path)  # the replica logs its load once, with this detail
        return ResolvedModel(path, "tiny", True, f"cache hit {path}")
    # Build into a temporary sibling and rename, so concurrent replicas never load a half-written model.
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_tiny_model(tmp, seed=cfg.seed)
    try:
        tmp.rename(path)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; its copy is identical
    log.info("tiny model: built and saved to %s", path)
    return ResolvedModel(path, "tiny", False, f"built {path}")


def _resolve_hub(cfg: ModelConfig) -> ResolvedModel:
    """A snapshot of ``model_id`` from ModelScope or Hugging Face: the cached one without network access, else
    downloaded, unless the machine is offline."""
    cache_dir = str(Path(cfg.cache_dir).expanduser()) if cfg.cache_dir else None
    hint = "(or set model.source: local with local_path)"
    if cfg.source == "modelscope":
        from modelscope import snapshot_download

        searched = cache_dir or os.environ.get("MODELSCOPE_CACHE") or str(Path.home() / ".cache" / "modelscope")
        hub, env = "ModelScope", "MODELSCOPE_CACHE"
        fetch = f"on a connected machine with `modelscope download --model {cfg.model_id}` {hint}, then copy the cache"
    else:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE

        searched = cache_dir or HF_HUB_CACHE
        hub, env = "Hugging Face", "HF_HUB_CACHE / HF_HOME"
        fetch = f"with `huggingface-cli download {cfg.model_id}` {hint}"
    try:
        path = snapshot_download(cfg.model_id, revision=cfg.revision, cache_dir=cache_dir, local_files_only=True)
        log.debug("%s %s: cache hit at %s (no network used)", cfg.source, cfg.model_id, path)
        return ResolvedModel(Path(path), cfg.source, True, f"cache hit {path}")
    except Exception as miss:  # each hub raises its own types for a cache miss
        if cfg.is_offline():
            shown = miss if cfg.source == "modelscope" else type(miss).__name__
            raise ModelNotFoundError(
                f"model: {cfg.model_id} is not in the {hub} cache and the machine is offline. Searched {searched} "
                f"(model.cache_dir / {env}). Fetch it {fetch}. ({shown})"
            ) from None
    log.info("%s %s: not cached under %s; downloading", cfg.source, cfg.model_id, searched)
    path = snapshot_download(cfg.model_id, revision=cfg.revision, cache_dir=cache_dir)
    return ResolvedModel(Path(path), cfg.source, False, f"downloaded to {path}")


def resolve_dtype(requested: str, device: str):
    """The dtype to run in on ``device``: the requested one, or a warned fallback where the device lacks it."""
    import torch

    want = getattr(torch, requested)
    if device.startswith("cuda"):
        if want == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            log.warning("%s has no bfloat16 support; falling back to float16", device)
            return torch.float16
        return want
    if want != torch.float32:
        log.warning("running on %s: %s is slow or unsupported there; falling back to float32", device, requested)
    return torch.float32


def load_components(cfg: ModelConfig, dtype, devices: dict[str, str]) -> tuple[dict, ResolvedModel, float]:
    """Load the five pipeline components on the CPU (random-full: build each directly on its device in
    ``devices``, so no full-size copy ever exists in RAM or on the wrong GPU).

    Returns the components, where they came from, and the load time in seconds.
    """
    t0 = time.perf_counter()
    resolved = resolve_model(cfg)
    if resolved.path is None:
        from .models import build_components

        comps = build_components("full", device=devices, dtype=dtype, seed=cfg.seed)
    elif set(devices) >= {"transformer", "text_encoder", "vae"}:
        from diffusers import ZImagePipeline

        pipe = ZImagePipeline.from_pretrained(
            str(resolved.path), dtype=dtype, low_cpu_mem_usage=cfg.low_cpu_mem_usage, local_files_only=True
        )
        comps = dict(pipe.components)
    else:
        comps = _load_some(resolved.path, cfg, dtype, set(devices))
    return comps, resolved, time.perf_counter() - t0


def _load_some(path: Path, cfg: ModelConfig, dtype, names: set[str]) -> dict:
    """Load only the named components from the repository layout (a replica that borrows another replica's
    text encoder never reads the 7.5 GiB of encoder weights)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

    common = {"local_files_only": True, "low_cpu_mem_usage": cfg.low_cpu_mem_usage}
    out: dict = {"scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(str(path), subfolder="scheduler")}
    if "transformer" in names:
        out["transformer"] = ZImageTransformer2DModel.from_pretrained(str(path), subfolder="transformer",
                                                                      dtype=dtype, **common)
    if "vae" in names:
        out["vae"] = AutoencoderKL.from_pretrained(str(path), subfolder="vae", dtype=dtype, **common)
    from transformers import AutoTokenizer

    if "text_encoder" in names:
        from transformers import Qwen3Model

        out["text_encoder"] = Qwen3Model.from_pretrained(str(path), subfolder="text_encoder", dtype=dtype,
                                                         local_files_only=True)
    # Always the tokenizer (a few MB): a replica that borrows another's encoder still checks and counts each of
    # its prompts itself, so one bad prompt never reaches the shared encoder's batch.
    out["tokenizer"] = AutoTokenizer.from_pretrained(str(path), subfolder="tokenizer", local_files_only=True)
    return out


def load_controlnet(cfg: ModelConfig, transformer, device: str, dtype):
    """The configured ControlNet (``model.controlnet``), attached to ``transformer`` (``from_transformer``), on
    ``device`` in ``dtype``. Hub snapshots are found in the base model's cache, offline as the base model is."""
    from diffusers import ZImageControlNetModel

    from .controlnet import build_controlnet

    cn_cfg = cfg.controlnet
    if cn_cfg.source in ("tiny", "random-full"):
        size = "tiny" if cn_cfg.source == "tiny" else "full"
        return build_controlnet(size, transformer, device=device, dtype=dtype, seed=cfg.seed)
    if cn_cfg.source == "local":
        path = Path(cn_cfg.local_path).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"model.controlnet.local_path: {path} does not exist")
    else:
        hub = cfg.model_copy(update={"source": cn_cfg.source, "model_id": cn_cfg.model_id,
                                     "revision": cn_cfg.revision, "local_path": None})
        root = _resolve_hub(hub).path
        path = root / cn_cfg.filename if cn_cfg.filename else root
    if path.is_file():
        cn = ZImageControlNetModel.from_single_file(str(path), torch_dtype=dtype)
    else:
        cn = ZImageControlNetModel.from_pretrained(str(path), subfolder=cn_cfg.subfolder, torch_dtype=dtype,
                                                   local_files_only=True)
    cn = cn.to(device).eval().requires_grad_(False)
    return ZImageControlNetModel.from_transformer(cn, transformer)
