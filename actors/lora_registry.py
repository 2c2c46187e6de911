"""A replica's LoRA adapters (``actors/lora.py``): the configured ones read before ready, their graphs compiled at
warm-up, and adapters registered and removed at runtime, off the batch path."""

from __future__ import annotations

import logging

from zimage_common.config import ModelConfig

from .devices import sync_all
from .startup import WARMUP_PROMPT, WARMUP_PROMPTS, WarmupSpec

# The replica's log lines keep one logger name whichever part of it writes them: operators filter on it
# (docs/observability.md).
log = logging.getLogger("actors.worker")


class LoraRegistryMixin:
    """``PipelineWorker``'s per-request LoRA: ``register_lora``, ``unregister_lora``, ``loras``."""

    def _load_loras(self) -> None:
        """The configured adapters, read and converted before ready (never inside a batch)."""
        slots = self.model_cfg.lora_slots
        if slots <= 0:
            return
        from .lora import LoraStore

        self.engine.loras = LoraStore(self.engine.transformer, slots, dtype=self.engine.dtype)
        for spec in self.model_cfg.loras:  # the operator's choice: any local path (hub files stay in the snapshot)
            path, root = resolve_lora(spec, self.model_cfg)
            self.engine.loras.add(spec.name, path, max_rank=self.model_cfg.lora_max_rank, root=root)

    def _warm_up_loras(self, spec: WarmupSpec) -> None:
        """Compile the blocks' LoRA graphs before ready, with a throwaway random adapter: alone, and beside a
        sample without one (later adapter sets, ranks and mixes reuse these graphs: the rank is a dynamic size)."""
        from .engine import Sample
        from .lora import build_adapter, factors_from_state_dict, random_lora_state_dict
        from .steploop import generate

        store, name = self.engine.loras, "__warmup__"
        sd, meta = random_lora_state_dict(self.engine.transformer, 8, device=self.engine.devices["transformer"],
                                          dtype=self.engine.dtype)
        store.add_adapter(build_adapter(name, factors_from_state_dict(sd, meta, self.engine.dtype),
                                        self.engine.transformer, "warm-up"))
        sync_all(self.engine.devices.values())  # made on this thread's stream, read by the stages' threads
        try:
            w, h = spec.sizes[0]
            for batch in ([Sample(WARMUP_PROMPT, 0, w, h, loras=((name, 1.0),))],
                          [Sample(WARMUP_PROMPTS[0], 1, w, h, loras=((name, 0.5),)), Sample(WARMUP_PROMPT, 2, w, h)]):
                generate(self.engine, batch, spec.num_inference_steps, run=self._stages.run)
        finally:
            store.remove(name)
            store.prefetch([s.name for s in self.model_cfg.loras])  # what the warm-up adapter pushed out

    def register_lora(self, spec: dict) -> dict:
        """Load an adapter registered at runtime (a ``LoraSpec`` as a dict), off the batch path: batches keep
        running meanwhile. Local paths must resolve inside ``model.lora_dir``, hub sources need
        ``model.lora_runtime_hub`` (``resolve_lora(runtime=True)``). Returns ``{"ok": True, "info": ...}`` or
        ``{"ok": False, "error": why}``: whatever goes wrong reading or converting it is the adapter's fault (data,
        never a replica fault), said without the host's paths outside the adapter directory."""
        from pydantic import ValidationError

        from zimage_common.config import LoraSpec

        from .lora import LoraError

        if self.engine is None or self.engine.loras is None:
            return {"ok": False, "error": "per-request LoRA is off (set model.lora_max_resident above 0)"}
        try:
            lora = LoraSpec.model_validate(spec)
            path, root = resolve_lora(lora, self.model_cfg, runtime=True)
            info = self.engine.loras.add(lora.name, path, max_rank=self.model_cfg.lora_max_rank, root=root,
                                         max_bytes=self.model_cfg.lora_max_file_bytes)
        except (LoraError, ValidationError) as e:
            log.warning("replica %s: LoRA %r not registered: %s", self.replica_id, spec.get("name"), e)
            return {"ok": False, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - a hub fetch or an odd file: refused, the details stay in the log
            log.exception("replica %s: LoRA %r not registered", self.replica_id, spec.get("name"))
            return {"ok": False, "error": f"the adapter could not be read ({type(e).__name__}; the replica's log "
                                          f"has the details)"}
        return {"ok": True, "info": info}

    def unregister_lora(self, name: str) -> bool:
        return bool(self.engine is not None and self.engine.loras is not None and self.engine.loras.remove(name))

    def loras(self) -> list[dict]:
        """The adapters this replica holds: name, rank, modules, bytes, whether resident on the GPU."""
        return [] if self.engine is None or self.engine.loras is None else self.engine.loras.info()


def resolve_lora(spec, model_cfg: ModelConfig, runtime: bool = False) -> tuple[str, str | None]:
    """Where a ``LoraSpec``'s file is, and the directory it must stay in (``lora.read_state_dict``'s ``root``):
    a local path (configured: as given, no root; runtime: inside ``model.lora_dir``, refused when that is unset),
    or the file in a hub snapshot fetched with the base model's cache and offline rules (``actors/loading.py``;
    runtime: only with ``model.lora_runtime_hub``), kept inside the snapshot."""
    from pathlib import Path

    from .lora import LoraError

    if spec.source == "local":
        if not runtime:
            return spec.path, None
        if model_cfg.lora_dir is None:
            raise LoraError("runtime registration of adapter files is off on this deployment: the operator sets "
                            "model.lora_dir (the directory they may be read from) to enable it")
        return spec.path, str(model_cfg.lora_dir)
    if runtime and not model_cfg.lora_runtime_hub:
        raise LoraError(f"runtime registration of {spec.source} adapters is off on this deployment (the operator "
                        f"enables it with model.lora_runtime_hub)")
    from .loading import resolve_model

    hub = model_cfg.model_copy(update={"source": spec.source, "model_id": spec.model_id, "revision": spec.revision,
                                       "local_path": None})
    snapshot = Path(resolve_model(hub).path)
    # A Hugging Face snapshot's files are links into the repository's blobs/: the repository folder is the root.
    root = snapshot.parent.parent if snapshot.parent.name == "snapshots" else snapshot
    return str(snapshot / spec.path) if spec.path else str(snapshot), str(root)
