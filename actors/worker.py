"""The pipeline replica as a plain class: loads the model onto its devices, warms up, runs batches.

Ray wraps this class as an actor (orchestrator/ray_backend.py) without changing it, so it is tested directly,
without Ray. Every outcome of ``run_batch`` comes back as data: a failed batch returns one failed
``ImageResult`` per request with the reason, and the replica stays up.

``PipelineWorker`` holds the replica's state; each of its jobs lives in its own module, as a mixin over that state:

- ``actors/startup.py``: ``start`` (loading, speed options, warm-up; ``WarmupSpec``, ``choose_devices``);
- ``actors/health.py``: ``health``, ``pid``, ``check``;
- ``actors/lora_registry.py``: ``register_lora``, ``unregister_lora``, ``loras``;
- ``actors/serving.py``: ``run_batch``, ``run_batch_stream`` (each call through the step loop), ``cancel``,
  ``loop_stats``, ``encode`` (another replica's prompts);
- ``actors/intake.py``: around the serving paths, for a pool shared by several front doors: keyed images claimed
  in the pool's result store, admission within the replica's budget, encoding near the GPUs (``queue_len``,
  ``intake_stats``);
- here: ``inject_fault`` (tests and chaos drills).
"""

from __future__ import annotations

import os
import threading

from zimage_common.config import ModelConfig
from zimage_common.logging_setup import setup_replica_process, take_api_keys_from_env

from .health import HealthMixin, _graphs_compiled, bytecode_cache_note
from .intake import IntakeMixin, IntakeSpec
from .lora_registry import LoraRegistryMixin
from .serving import ServingMixin
from .stages import StageThreads
from .startup import StartupMixin, WarmupSpec, _process_age_s

# importable from here, where orchestrator/ray_backend.py, the tests and the benchmarks look for them
__all__ = ["IntakeSpec", "PipelineWorker", "WarmupSpec", "_graphs_compiled", "bytecode_cache_note"]


class PipelineWorker(StartupMixin, HealthMixin, LoraRegistryMixin, IntakeMixin, ServingMixin):
    """One replica. ``start()`` loads and warms up; ``run_batch()`` serves; ``health()`` reports."""

    def __init__(
        self,
        replica_id: str,
        model: ModelConfig,
        device_map: dict[str, int] | None = None,
        warmup: WarmupSpec | None = None,
        torch_threads: int | None = None,
        memory_fraction: float | None = None,
        encoder=None,
        max_batch_tokens: int | None = None,
        max_batch_size: int | None = None,
        env: dict[str, str] | None = None,
        intake: IntakeSpec | None = None,
        results=None,
    ):
        """``encoder``: for a replica without a text encoder of its own (component replication), a callable
        ``(prompts, negative_prompts, guidance) -> EncodedPrompts`` that asks the replica hosting the shared
        encoder. ``max_batch_tokens`` / ``max_batch_size``: the step loop's own limits on its running set
        (``actors/steploop.py``); the router keeps within them too. ``env``: environment variables for this
        process, set before anything else is imported (``logging_setup.replica_env``: the log format, no progress
        bars). ``intake``: the replica's admission limits and encoder threads; ``results``: the pool's store of
        keyed images (``actors/intake.py``; None: no idempotent images)."""
        os.environ.update(env or {})
        take_api_keys_from_env()  # a joined cluster's workers inherit whatever the node was started with
        setup_replica_process(replica_id)  # no progress bars; in a Ray actor, log lines name the replica
        process_s = _process_age_s()
        self.replica_id = replica_id
        self.model_cfg = model
        self.device_map = device_map
        self.warmup_spec = warmup
        self.torch_threads = torch_threads
        self.memory_fraction = memory_fraction
        self.encoder = encoder
        self.encodes_served = 0
        # each stage's GPU work on its own long-lived thread, the one the warm-up warmed (cuDNN's plans are cached
        # per thread); the encode stage on a CUDA stream of its own
        self._stages = StageThreads(str(replica_id))
        self.engine = None
        self.batches_run = 0
        self.images_run = 0
        self.load_s = 0.0
        self.warmup_s = 0.0
        # ReplicaHealth.startup_s: "process" is the seconds from this process's creation to here (the Ray worker's
        # own start and the imports of this module), the rest _start's phases in order
        self.startup_s: dict[str, float] = {} if process_s is None else {"process": round(process_s, 3)}
        self._fault = None  # test hook: see inject_fault
        self._fault_kind: str | None = None
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self._loop = None  # the step loop (actors/steploop.py), made on the first call
        self._loop_lock = threading.Lock()
        self._shared_encodes = None  # serving.SharedEncodes, made on the first call
        self._joined: dict[str, object] = {}  # request id -> ImageRequest, for calls in the step loop
        self._encoding: set[str] = set()  # request ids of calls still encoding (not in the loop yet)
        self._cancel_early: set[str] = set()  # of those, the ones cancelled meanwhile
        self._cancel_lock = threading.Lock()  # cancel() against a call's move from encoding into the loop
        self.numerics: dict = {}  # fp8 against the unquantized model, measured at start-up
        self.compiles_warmup = 0  # graphs compiled before ready
        self._compiles_at_ready = 0
        self._start_lock = threading.Lock()
        self._ready = False
        self._intake_setup(intake, results)

    # ---- fault injection (tests and chaos drills) ------------------------------------------------------
    def inject_fault(self, kind: str | None, **kw) -> None:
        """``kind``: None (clear), 'raise', 'oom_above' (calls and steps of more than ``max_batch`` samples raise an
        OOM), 'stall' (the loop's next step sleeps ``seconds`` once: a wedged GPU), 'exit' (the process dies
        mid-batch), 'poison' (a batch holding a prompt that contains ``marker`` raises as a whole)."""
        from .faults import make_fault

        self._fault = make_fault(kind, **kw)
        self._fault_kind = kind
