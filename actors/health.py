"""What a replica reports about itself: its health (``ReplicaHealth``), a real small forward on every device
(``check``), and the process diagnostics start-up logs (bytecode, torch.compile's counters)."""

from __future__ import annotations

import os
import time

from zimage_common.messages import ReplicaHealth

from .compiled import FALLBACKS


class HealthMixin:
    """``PipelineWorker``'s ``health``, ``pid`` and ``check``."""

    def health(self) -> ReplicaHealth:
        import torch

        from .screening import max_image_side

        t0 = time.perf_counter()
        alloc, peak = {}, {}
        if self.engine is not None and torch.cuda.is_available():
            for d in set(self.engine.devices.values()):
                alloc[str(d)] = torch.cuda.memory_allocated(d)
                peak[str(d)] = torch.cuda.max_memory_allocated(d)
        return ReplicaHealth(
            replica_id=self.replica_id,
            ready=self._ready,
            device_map={k: str(v) for k, v in (self.engine.devices.items() if self.engine else [])},
            dtype=str(self.engine.dtype).removeprefix("torch.") if self.engine else "",
            batches_run=self.batches_run,
            images_run=self.images_run,
            check_s=time.perf_counter() - t0,
            memory_allocated_bytes=alloc,
            peak_memory_bytes=peak,
            load_s=self.load_s,
            encodes_served=self.encodes_served,
            pid=os.getpid(),
            warmup_s=self.warmup_s,
            numerics=dict(self.numerics),
            compiles_warmup=self.compiles_warmup,
            compiles_after_ready=_graphs_compiled() - self._compiles_at_ready if self._ready else 0,
            eager_fallbacks=FALLBACKS.counts(),
            encoder_graphs=len(self.engine.encoder_graphs.graphs) if self.engine and self.engine.encoder_graphs else 0,
            max_side=max_image_side(self.engine) if self.engine is not None else 0,
            startup_s=dict(self.startup_s),
        )

    def pid(self) -> int:
        return os.getpid()

    def check(self) -> float:
        """A real small forward on every device of the replica (text encoder on a short prompt, the
        transformer's timestep embedder), without the batch lock: a wedged GPU or process fails it, a long
        batch does not. Returns the seconds it took."""
        import torch

        if not self._ready:
            raise RuntimeError("replica is not started")
        def forward() -> bool:
            with torch.no_grad():
                enc = self.engine.encode(["health check"], max_sequence_length=32)
                dev = self.engine.devices["transformer"]
                emb = self.engine.transformer.t_embedder(torch.full((1,), 0.5, device=dev))
                return all(bool(torch.isfinite(t).all()) for t in (enc.positive[0], emb))

        t0 = time.perf_counter()
        ok = self._stages.run("encode", forward)  # (the tokenizer is not thread-safe: on the encode stage's thread)
        if not ok:
            raise RuntimeError("health forward produced non-finite values")
        return time.perf_counter() - t0


def bytecode_cache_note(module_file: str, dont_write_bytecode: bool | None = None) -> str | None:
    """Why a replica's imports are slow where Python keeps no bytecode for the libraries (about 10 s of every
    start): ``module_file`` (torch's ``__init__.py``) has no ``.pyc`` where this interpreter looks for one, and
    writing them is off (PYTHONDONTWRITEBYTECODE). None where that is not so."""
    import importlib.util
    import sys

    if dont_write_bytecode is None:
        dont_write_bytecode = bool(sys.flags.dont_write_bytecode)
    if not dont_write_bytecode or os.path.exists(importlib.util.cache_from_source(module_file)):
        return None
    return ("Python keeps no bytecode for torch here (PYTHONDONTWRITEBYTECODE is set and it has no .pyc): every "
            "replica process compiles the libraries' sources again, about 10 s of each start. Unset it, or set "
            "PYTHONPYCACHEPREFIX to a writable folder so the first start writes the bytecode for the next ones.")


def _compile_times() -> str:
    """torch.compile's own table of where its time went in this process (dynamo tracing, AOT, inductor, cache
    loads), for the start-up log."""
    try:
        from torch._dynamo.utils import compile_times

        return compile_times(repr="str", aggregate=True)
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        return f"(unavailable: {e})"


def _graphs_compiled() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except (ImportError, KeyError):
        return 0
