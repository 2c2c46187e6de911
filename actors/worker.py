"""The pipeline replica as a plain class: loads the model onto its devices, warms up, runs batches.

Ray wraps this class as an actor (orchestrator/ray_backend.py) without changing it, so it is tested directly,
without Ray. Every outcome of ``run_batch`` comes back as data: a failed batch returns one failed
``ImageResult`` per request with the reason, and the replica stays up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace

from orchestrator.config import COMPONENTS, ModelConfig
from orchestrator.errors import ReplicaUnavailableError
from orchestrator.logging_setup import logs_batch, setup_replica_process, take_api_keys_from_env
from orchestrator.messages import Batch, BatchResult, FailureKind, ImageResult, ReplicaHealth, StageTimes

from .compiled import FALLBACKS
from .stages import StageThreads

log = logging.getLogger(__name__)


# Prompts of different lengths, so warm-up runs batches whose captions differ (several attention runs).
WARMUP_PROMPT = ("a detailed photograph of a quiet harbor town at dawn, fishing boats, soft pastel light, "
                 "mist over the water, seagulls, wide angle lens")
WARMUP_PROMPTS = ("a red fox", WARMUP_PROMPT, WARMUP_PROMPT + ", " + WARMUP_PROMPT.replace("dawn", "dusk") * 2)


@dataclass(frozen=True)
class WarmupSpec:
    """What a replica runs before it reports ready: batches that compile every graph serving will need (one image
    alone; several of one size; several of mixed sizes and prompt lengths), and one decode per size in ``sizes``
    (the VAE decoder is compiled per size). Sizes above ``max_pixels`` (the replica's plan) are skipped, and
    batches stay within ``max_batch_tokens``."""

    sizes: tuple[tuple[int, int], ...]  # (width, height); the first is the deployment's default size
    num_inference_steps: int = 2
    max_pixels: int = 1 << 40
    max_batch_tokens: int = 1 << 40
    max_batch_size: int = 16  # most requests in one batch (the router's max_batch_size)

    def planned_sizes(self) -> list[tuple[int, int]]:
        """The sizes within the replica's plan (``max_pixels``), in order; the first size if none is."""
        return [s for s in self.sizes if s[0] * s[1] <= self.max_pixels] or [self.sizes[0]]

    def batches(self) -> list[list[tuple[int, int, str]]]:
        """The warm-up batches as lists of (width, height, prompt)."""
        from orchestrator.messages import ImageRequest

        sizes = self.planned_sizes()
        first = sizes[0]
        plan = [[(*first, WARMUP_PROMPTS[1])], [(*first, WARMUP_PROMPTS[1])] * 2]
        mixed = [(w, h, WARMUP_PROMPTS[i % len(WARMUP_PROMPTS)]) for i, (w, h) in enumerate(sizes)]
        plan.append(mixed)
        out = []
        for batch in plan:  # split what would exceed the token budget
            cur, tokens = [], 0
            for w, h, p in batch:
                t = ImageRequest("warmup", p, 0, w, h, self.num_inference_steps, 0.0).tokens
                if cur and tokens + t > self.max_batch_tokens:
                    out.append(cur)
                    cur, tokens = [], 0
                cur.append((w, h, p))
                tokens += t
            out.append(cur)
        return out

    def encoder_shapes(self, lengths: tuple[int, ...] = (64, 128, 256, 512)) -> list[tuple[int, int]]:
        """The ``(prompts, padded length)`` shapes the text encoder runs at warm-up
        (``ZImageEngine.prewarm_encoder``): one prompt, four, a full batch and twice that (guidance's negative
        prompts), each at padded lengths from short to the longest caption the engine keeps (512 tokens), where a
        batch of that many prompts of that length at the smallest warm-up size fits the token budget."""
        from placement.memory import sample_tokens

        w, h = min(self.planned_sizes(), key=lambda s: s[0] * s[1])
        counts = sorted({1, 4, self.max_batch_size, 2 * self.max_batch_size})
        return [(b, n) for b in counts for n in lengths
                if b == 1 or b * sample_tokens(w, h, n) <= self.max_batch_tokens]


def choose_devices(device_map: dict[str, int] | None) -> dict[str, str]:
    """Component -> torch device string, for the components this replica holds (a replica that borrows a
    shared text encoder has none of its own). GPU indices are local to the replica (Ray sets
    CUDA_VISIBLE_DEVICES); without CUDA (CPU machines, logical GPUs) every component runs on the CPU."""
    import torch

    device_map = device_map or dict.fromkeys(COMPONENTS, 0)
    if not torch.cuda.is_available():
        return dict.fromkeys(device_map, "cpu")
    n = torch.cuda.device_count()
    bad = {c: i for c, i in device_map.items() if i >= n}
    if bad:
        raise ValueError(f"device_map {bad} names GPUs this replica does not have (it sees {n})")
    return {c: f"cuda:{i}" for c, i in device_map.items()}


class PipelineWorker:
    """One replica. ``start()`` loads and warms up; ``run_batch()`` serves; ``health()`` reports."""

    def __init__(
        self,
        replica_id: str,
        model: ModelConfig,
        device_map: dict[str, int] | None = None,
        warmup: WarmupSpec | None = None,
        torch_threads: int | None = None,
        memory_fraction: float | None = None,
        pipeline_stages: bool = False,
        encoder=None,
        max_batch_tokens: int | None = None,
        max_batch_size: int | None = None,
        step_join=None,
        env: dict[str, str] | None = None,
    ):
        """``encoder``: for a replica without a text encoder of its own (component replication), a callable
        ``(prompts, negative_prompts, guidance) -> EncodedPrompts`` that asks the replica hosting the shared
        encoder. ``max_batch_tokens`` / ``max_batch_size``: the step loop's own limits on its running set
        (step-level batching, ``actors/steploop.py``); the router keeps within them too. ``step_join``: when
        waiting samples join the loop's running set (``messages.JoinPolicy``). ``env``: environment variables
        for this process, set before anything else is imported (``logging_setup.replica_env``: the log format, no
        progress bars)."""
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
        self.pipeline_stages = pipeline_stages
        self.encoder = encoder
        self.encodes_served = 0
        # each stage's GPU work on its own long-lived thread, the one the warm-up warmed (cuDNN's plans are cached
        # per thread); with stage pipelining, on the stage's CUDA stream
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
        self.step_join = step_join  # messages.JoinPolicy for the step loop; None: its defaults
        self._loop = None  # the step loop (actors/steploop.py), made on the first joinable batch
        self._loop_lock = threading.Lock()
        self._joined: dict[str, object] = {}  # request id -> ImageRequest, for calls in the step loop
        self._encoding: set[str] = set()  # request ids of joinable calls still encoding (not in the loop yet)
        self._cancel_early: set[str] = set()  # of those, the ones cancelled meanwhile
        self._cancel_lock = threading.Lock()  # cancel() against a call's move from encoding into the loop
        self.numerics: dict = {}  # fp8 against the unquantized model, measured at start-up
        self.compiles_warmup = 0  # graphs compiled before ready
        self._compiles_at_ready = 0
        # One batch at a time on the devices (from its denoise stage on: its encode runs before, beside the batch
        # in flight); a second run_batch (Ray max_concurrency=2) waits here, so its GPU work starts the moment this
        # one's ends, while this one's result is still being shipped to the router.
        self._device_lock = threading.Lock()
        self._released_at: float | None = None  # when the last whole batch let the devices go (perf_counter)
        self._start_lock = threading.Lock()
        self._ready = False

    # ---- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> ReplicaHealth:
        """Load and warm up. Idempotent: a second call (the deployment re-asking after a timeout) waits for the
        first and returns the same health."""
        with self._start_lock:
            if not self._ready:
                self._start()
                self._ready = True
            return self.health()

    def _start(self) -> None:
        mark = [time.perf_counter()]

        def phase(name: str) -> None:  # the seconds since the last phase ended, as this phase's
            now = time.perf_counter()
            self.startup_s[name] = round(now - mark[0], 3)
            mark[0] = now

        import torch

        from .engine import ZImageEngine
        from .loading import load_components, resolve_dtype

        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        # No algorithm search per convolution shape: with it, the first decode at a size no warm-up ran searched for
        # 0.5-3.9 s, and the heuristics' choices decoded as fast afterwards (H100, benchmarks/probe_any_size.py).
        torch.backends.cudnn.benchmark = False
        devices = choose_devices(self.device_map)
        if self.memory_fraction and torch.cuda.is_available():
            for d in set(devices.values()):
                torch.cuda.set_per_process_memory_fraction(self.memory_fraction, torch.device(d))
        if torch.cuda.is_available():
            for d in set(devices.values()):
                torch.zeros(1, device=d)  # the CUDA context, timed with the imports rather than inside the load
        phase("imports")
        note = bytecode_cache_note(torch.__file__)
        if note:
            log.warning("replica %s: %s", self.replica_id, note)
        dtype = resolve_dtype(self.model_cfg.dtype, devices["transformer"])
        comps, resolved, self.load_s = load_components(self.model_cfg, dtype, devices)
        if self.model_cfg.controlnet is not None:  # [controlnet] beside the transformer (actors/controlnet.py)
            from .loading import load_controlnet

            comps["controlnet"] = load_controlnet(self.model_cfg, comps["transformer"], devices["transformer"], dtype)
        log.info("replica %s: model from %s (%s) in %.1fs", self.replica_id, resolved.source, resolved.detail,
                 self.load_s)
        self.engine = ZImageEngine(comps, devices, dtype, remote_encode=self.encoder,
                                   attention=self.model_cfg.attention)
        phase("load")
        self.make_stage_streams()
        plans = self._start_attention_plans() if self.warmup_spec is not None else None
        # the text encoder's shapes beside the speed options, unless those quantize its weights
        te_quantized = self.model_cfg.text_encoder_quantization in ("int8", "fp8")
        encoder_shapes = self._start_encoder_warmup() if self.warmup_spec is not None and not te_quantized else None
        self._apply_speed_options()
        self._load_loras()
        if self.warmup_spec is not None and encoder_shapes is None:
            encoder_shapes = self._start_encoder_warmup()
        phase("speed_options")
        if self.warmup_spec is not None:
            from .engine import Sample

            _sync_devices(devices)  # what loading made on this thread's stream, before the stages use it on theirs
            t0 = time.perf_counter()
            spec = self.warmup_spec
            batches = spec.batches()
            if not (self.model_cfg.compile and torch.cuda.is_available()):
                batches = batches[:1]  # nothing to compile: one image shows the replica works
            for batch in batches:
                _, st = self.engine.generate([Sample(p, i, w, h) for i, (w, h, p) in enumerate(batch)],
                                             spec.num_inference_steps, stage_run=self._warmup_run)
                # where a warm start goes: the denoise holds the transformer's graphs (traced, then compiled or
                # loaded from the cache), the decode the VAE decoder's graph for each new size
                log.info("replica %s: warm-up batch %s: encode %.1fs, denoise %.1fs, decode %.1fs", self.replica_id,
                         ", ".join(f"{w}x{h}" for w, h, _ in batch), st.encode_s, st.denoise_s, st.decode_s)
            phase("warmup_batches")
            if self.engine.controlnet is not None:  # [controlnet] its blocks' graphs, and the control path
                import numpy as np

                w, h, p = batches[0][0]
                self.engine.generate([Sample(p, 0, w, h), Sample(p, 1, w, h, control_image=np.full((h, w, 3), 127,
                                                                                                  np.uint8))],
                                     spec.num_inference_steps, stage_run=self._warmup_run)
            if self.engine.loras is not None and self.model_cfg.compile and torch.cuda.is_available():
                self._warm_up_loras(spec)
            phase("warmup_extra")
            n, plans_s = plans.result()  # this phase is what is left of them after the warm-up batches
            if n:
                log.info("replica %s: attention plans for %d sequence lengths in %.1fs (beside the speed options "
                         "and the warm-up batches)", self.replica_id, n, plans_s)
            phase("attention_plans")
            shapes = encoder_shapes.result()
            if shapes:
                slow = max(shapes, key=lambda x: x[2])
                log.info("replica %s: text encoder run at %d (prompts, length) shapes in %.1fs on its stage's thread "
                         "(slowest %dx%d: %.2fs): %s", self.replica_id, len(shapes), sum(x[2] for x in shapes),
                         slow[0], slow[1], slow[2], ", ".join(f"{b}x{n} {t:.2f}s" for b, n, t in shapes))
            phase("encoder_shapes")
            self.warmup_s = time.perf_counter() - t0
            log.info("replica %s: warmed up in %.1fs (%d batches)", self.replica_id, self.warmup_s, len(batches))
            if self.model_cfg.compile:
                log.info("replica %s: torch.compile's time by phase during start-up:\n%s", self.replica_id,
                         _compile_times())
        self.compiles_warmup = _graphs_compiled()
        if self.model_cfg.compile and torch.cuda.is_available():
            # Nothing compiles after ready: a call no graph covers runs eager, counted (actors/compiled.py).
            from .compiled import serve_stance

            serve_stance()
        self._compiles_at_ready = _graphs_compiled()
        if torch.cuda.is_available():
            for d in set(devices.values()):
                torch.cuda.reset_peak_memory_stats(torch.device(d))

    def _start_encoder_warmup(self) -> Future:
        """Run the text encoder at the warm-up's ``encoder_shapes`` on the encode stage's thread (where serving
        encodes, with its stream and its per-thread plans), beside what start-up does meanwhile; on CUDA only (on
        the CPU there is nothing to load per shape). Returns ``[(prompts, length, seconds)]``."""
        import torch

        if not torch.cuda.is_available() or self.engine.text_encoder is None:
            done: Future = Future()
            done.set_result([])
            return done
        return self._stages.submit("encode", self.engine.prewarm_encoder, self.warmup_spec.encoder_shapes())

    def _start_attention_plans(self) -> Future:
        """Build attention's per-shape plans (cuDNN) for every sequence length a sample within the replica's plan
        can have, on the denoise stage's thread (cuDNN caches plans per thread), beside the speed options and the
        warm-up batches that run meanwhile on this one (``_warmup_run``): a length first seen while serving would
        cost its batch about 49 ms of idle GPU (H100, benchmarks/probe_any_size.py), and any size a user picks
        brings new lengths. A masked call at a few bucket lengths instead ran 1.4-1.9x slower than the exact
        one. The plans are C++ work that leaves the GIL free. Returns ``(lengths, seconds)``."""
        max_tokens = self.warmup_spec.max_pixels // (self.engine.size_multiple ** 2)
        t0 = time.perf_counter()

        def build() -> tuple[int, float]:
            return self.engine.packed.prewarm(max_tokens), time.perf_counter() - t0

        return self._stages.submit("denoise", build)

    def _warmup_run(self, stage: str, fn, *args, **kwargs):
        """The warm-up batches' stage runner: the denoise runs on the calling thread, since the denoise stage's
        own thread is building attention's plans meanwhile (``_start_attention_plans``); the other stages run on
        their own threads, as in serving. What the warm-up makes per thread (attention's plans for its own
        lengths, convolution heuristics) is cheap to make again on the serving thread; what it makes per process
        (the compiled graphs) is shared."""
        if stage == "denoise":
            return fn(*args, **kwargs)
        return self._stages.run(stage, fn, *args, **kwargs)

    def make_stage_streams(self) -> None:
        """A CUDA stream per stage with stage pipelining; without it only the encode stage's (for serving other
        replicas' encodes beside this replica's batch). The encode's stream has the higher priority: its kernels are
        small and a batch waits on it, so the GPU may schedule their blocks ahead of the running denoise's as SMs
        come free (an encode beside a denoise took 2-10x its time alone, H100, session 8); the denoise loses no
        more than the encode's own GPU time. Its own effect is not measured: it came with the router's longer lead
        (``ReplicaWork.ENCODE_COVER``), which made the encodes start earlier, and they did not get shorter."""
        import torch

        if not torch.cuda.is_available():
            return
        devices = self.engine.devices
        stage_device = {"encode": devices.get("text_encoder"), "denoise": devices["transformer"],
                        "decode": devices["vae"]}
        if not self.pipeline_stages:
            stage_device = {"encode": stage_device["encode"]}
        self._stages.streams = {s: torch.cuda.Stream(torch.device(d), priority=-1 if s == "encode" else 0)
                                for s, d in stage_device.items() if d}

    def _apply_speed_options(self) -> None:
        cfg, transformer = self.model_cfg, self.engine.transformer
        if cfg.text_encoder_quantization in ("int8", "fp8") and self.engine.text_encoder is not None:
            from .quantize import encoder_error, quantize_weight_only

            te, mode = self.engine.text_encoder, cfg.text_encoder_quantization
            self.numerics.update(encoder_error(self.engine, lambda: quantize_weight_only(te, mode)))
            log.info("replica %s: text encoder %s vs %s: %s", self.replica_id, cfg.text_encoder_quantization,
                     self.engine.dtype, self.numerics)
        if cfg.quantization == "fp8":
            from .quantize import compare, quantize_fp8, reference_output

            reference = reference_output(self.engine)
            quantize_fp8(transformer, cfg.fp8_backend)
            self.numerics.update(compare(reference, reference_output(self.engine)))
            log.info("replica %s: fp8 vs %s: %s", self.replica_id, self.engine.dtype, self.numerics)
        if cfg.compile and self.engine.devices["transformer"].type == "cuda":

            from .compile_cache import enable_compile_cache

            enable_compile_cache(cfg.compile_cache_dir)
            self.engine.packed.compile()  # dynamic shapes: three graphs cover every packed batch
            # Its graph compiles in the first warm-up batch's decode, not beside the transformer's on another
            # thread: dynamo's tracing is not thread-safe (a warm start failed with "using FX to symbolically trace
            # a dynamo-optimized function").
            from .compiled import compile_vae_decoder

            compile_vae_decoder(self.engine.vae)

    # ---- per-request LoRA (actors/lora.py) -------------------------------------------------------------
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

        store, name = self.engine.loras, "__warmup__"
        sd, meta = random_lora_state_dict(self.engine.transformer, 8, device=self.engine.devices["transformer"],
                                          dtype=self.engine.dtype)
        store.add_adapter(build_adapter(name, factors_from_state_dict(sd, meta, self.engine.dtype),
                                        self.engine.transformer, "warm-up"))
        _sync_devices(self.engine.devices)  # made on this thread's stream; the denoise stage may run on its own
        try:
            w, h = spec.sizes[0]
            for batch in ([Sample(WARMUP_PROMPT, 0, w, h, loras=((name, 1.0),))],
                          [Sample(WARMUP_PROMPTS[0], 1, w, h, loras=((name, 0.5),)), Sample(WARMUP_PROMPT, 2, w, h)]):
                self.engine.generate(batch, spec.num_inference_steps, stage_run=self._warmup_run)
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

        from orchestrator.config import LoraSpec

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

    # ---- serving ---------------------------------------------------------------------------------------
    def run_batch(self, batch: Batch) -> BatchResult:
        return self._serve(batch)

    def run_batch_stream(self, batch: Batch):
        """Like ``run_batch``, but first yields a ``StepProgress`` after every denoising step (Ray streams each
        item to the router as it is produced), with the preview images of requests that asked for
        ``partial_images``, then the ``BatchResult``."""
        events: queue.Queue = queue.Queue()
        out: list[BatchResult] = []

        def work() -> None:
            try:
                out.append(self._serve(batch, events.put))
            finally:
                events.put(None)

        t = threading.Thread(target=work, name=f"batch-{batch.batch_id}", daemon=True)
        t.start()
        while (event := events.get()) is not None:
            yield event
        t.join()
        yield out[0]

    @logs_batch  # every log line about the batch carries its requests' ids
    def _serve(self, batch: Batch, emit=None) -> BatchResult:
        """Isolation around ``_run``: each request is screened on its own first (``actors/screening.py``), so a
        prompt the tokenizer cannot encode or a size the model cannot place fails alone (``invalid_request``)
        while the rest run as one batch; a sample whose latents end non-finite fails alone (``request_error``).
        Results carry the token counts the HTTP layer reports as ``usage``."""
        from .screening import StepHook, screen

        if not self._ready or self.engine is None:
            return self._run(batch)
        # the tokenizer is not thread-safe: on the encode stage's thread, never beside another call's encode
        checked = self._stages.run("encode", screen, self.engine, batch)
        if batch.joinable and emit is not None:
            emit = self._with_loop_stats(emit)
        by_id: dict[str, ImageResult] = {}
        out = None
        if checked.runnable:
            run = batch if len(checked.runnable) == len(batch) else replace(batch, requests=checked.runnable)
            hook = StepHook(self.engine, run, emit, self._preview_decode)
            out = self._run(run, hook)
            if hook.preview_s:
                log.info("replica %s: batch %d: previews decoded in %.3fs", self.replica_id, batch.batch_id,
                         hook.preview_s)
            for r in out.results:
                if r.ok and r.request_id in hook.nonfinite:
                    log.error("replica %s: request %s came out non-finite", self.replica_id, r.request_id)
                    r = replace(r, ok=False, image=None, error="the image came out non-finite (NaN or inf)",
                                error_type=FailureKind.REQUEST_ERROR)
                by_id[r.request_id] = replace(r, prompt_tokens=checked.prompt_tokens.get(r.request_id),
                                              image_tokens=checked.image_tokens.get(r.request_id))
        for r in batch.requests:
            if r.request_id in checked.failed:
                message, param = checked.failed[r.request_id]
                by_id[r.request_id] = ImageResult(
                    request_id=r.request_id, ok=False, replica_id=self.replica_id, batch_id=batch.batch_id,
                    batch_size=len(batch), seed=r.seed, width=r.width, height=r.height, error=message,
                    error_type=FailureKind.INVALID_REQUEST, param=param)
        times = out.stage_times if out is not None else StageTimes()
        return BatchResult(batch.batch_id, self.replica_id, tuple(by_id[r.request_id] for r in batch.requests),
                           times)

    def _run(self, batch: Batch, on_step=None) -> BatchResult:
        if not self._ready:
            return self._failed(batch, "replica is not started", FailureKind.NOT_READY)
        from .engine import Sample

        samples = [Sample(r.prompt, r.seed, r.width, r.height, r.guidance_scale, r.negative_prompt, r.loras,
                          image=r.image, mask=r.mask, strength=r.strength,  # edits (actors/conditioning.py)
                          num_inference_steps=r.num_inference_steps,
                          control_image=r.control_image, control_scale=r.control_scale)  # [controlnet]
                   for r in batch.requests]
        steps = batch.key.num_inference_steps
        try:
            if getattr(batch, "joinable", False):
                # Step-level batching: encode here, join the replica's step loop, decode here when done.
                if self._fault is not None:
                    self._fault(batch)
                images, times = self._run_joined(batch, samples, on_step)
            elif self.pipeline_stages:
                # Stage pipelining: batch k+1 encodes while batch k denoises and batch k-1 decodes.
                if self._fault is not None:
                    self._fault(batch)
                images, times = self.engine.generate(samples, steps, on_step, stage_run=self._stages.run)
            else:
                gaps: dict = {}
                with self._holding_from_denoise(batch, gaps) as stage_run:
                    images, times = self.engine.generate(samples, steps, on_step, stage_run=stage_run)
                times = replace(times, **{k: round(v, 6) for k, v in gaps.items()})
        except Exception as e:  # noqa: BLE001 - every failure becomes data for the router
            kind = FailureKind.OUT_OF_MEMORY if _is_oom(e) else FailureKind.REPLICA_ERROR
            if isinstance(e, ReplicaUnavailableError):
                kind = FailureKind.REPLICA_LOST  # the shared encoder's replica is gone: the router retries elsewhere
            if type(e).__name__ == "CancelledSample":
                log.info("replica %s: batch %d cancelled: %s", self.replica_id, batch.batch_id, e)
                return self._failed(batch, "cancelled by the client", FailureKind.CANCELLED)
            log.exception("replica %s: batch %d (%d images, %s) failed", self.replica_id, batch.batch_id, len(batch),
                          batch.key)
            if kind == FailureKind.OUT_OF_MEMORY:
                _free_cuda_cache()
            return self._failed(batch, f"{type(e).__name__}: {e}", kind)
        self.batches_run += 1
        self.images_run += len(batch)
        results = tuple(
            ImageResult(
                request_id=r.request_id, ok=True, replica_id=self.replica_id, batch_id=batch.batch_id,
                batch_size=len(batch), seed=r.seed, width=r.width, height=r.height, image=img,
                stage_times=times,
            ) if img is not None else  # only a joined call's request whose caller went away (step-level batching)
            ImageResult(request_id=r.request_id, ok=False, replica_id=self.replica_id, batch_id=batch.batch_id,
                        batch_size=len(batch), seed=r.seed, error="cancelled by the client",
                        error_type=FailureKind.CANCELLED)
            for r, img in zip(batch.requests, images)
        )
        return BatchResult(batch.batch_id, self.replica_id, results, times)

    @contextlib.contextmanager
    def _holding_from_denoise(self, batch: Batch, gaps: dict):
        """Whole-batch calls without stage pipelining: one batch at a time on the devices from its denoise stage to
        its end, but its encode (and its input images' VAE encode) before that, beside the previous batch's
        denoise, so a batch's encode is off the critical path (0.06 s for four short prompts at 1024^2 on an H100,
        0.11-0.14 s for prompts of up to 160 words: session 6). Fills ``gaps`` with how long the devices stood idle
        before this batch took them, and why (``StageTimes.idle_encoding_s``, ``idle_starved_s``,
        ``device_wait_s``)."""
        arrived = time.perf_counter()
        held = contextlib.ExitStack()

        def run(stage, fn, *args, **kwargs):
            if stage == "denoise" and not gaps:  # the first denoise stage takes the devices
                ready = time.perf_counter()
                held.enter_context(self._device_lock)
                took = time.perf_counter()
                held.callback(self._devices_released)  # runs before the lock's release (last in, first out)
                gaps.update(device_wait_s=took - ready, **_idle_before(self._released_at, arrived, ready, took))
                if self._fault is not None:
                    self._fault(batch)
            return self._stages.run(stage, fn, *args, **kwargs)

        with held:
            yield run

    def _devices_released(self) -> None:
        self._released_at = time.perf_counter()

    # ---- step-level batching (actors/steploop.py) ---------------------------------------------------------
    def _step_loop(self):
        with self._loop_lock:
            if self._loop is None:
                from .steploop import StepLoop

                self._loop = StepLoop(self.engine, self.max_batch_tokens, self.max_batch_size, run=self._loop_run,
                                      name=f"step-loop-{self.replica_id}", policy=self.step_join)
                self._loop.fault = self._loop_fault
            return self._loop

    def _loop_run(self, fn):
        """Each step of the loop holds the devices as a whole batch would (so a whole-batch call on the same replica
        never runs beside it) and runs on the denoise stage's thread (and stream)."""
        with contextlib.nullcontext() if self.pipeline_stages else self._device_lock:
            return self._stages.run("denoise", fn)

    def _preview_decode(self, latents):
        """A preview's decode (``screening.StepHook``), on the decode stage's thread: from inside a denoise step
        the estimates are on the denoise stage's stream, so that stream is finished first."""
        if self._stages.on("denoise"):
            from .engine import _sync

            _sync(self.engine.devices["transformer"])
        return self._stages.run("decode", self.engine.decode, latents)

    def _loop_fault(self, names: list[str]) -> None:
        if self._fault is not None and self._fault_kind == "oom_above":  # on the running set, as memory is
            self._fault(Batch(-1, tuple(self._joined[n] for n in names if n in self._joined)))

    def _run_joined(self, batch: Batch, samples, on_step):
        """One call of step-level batching: its samples join the loop at its next step, and leave it when done while
        the loop goes on; encode and decode run here, beside the loop (the stage locks and streams of stage
        pipelining). Stage times: encode, time in the loop (shared with whatever ran beside), decode. A cancel of
        its requests while they encode is kept, and they leave before their first step."""
        engine = self.engine
        for s in samples:
            engine.check_size(s.height, s.width)
        loop = self._step_loop()
        ids = {r.request_id for r in batch.requests}
        with self._cancel_lock:  # from here a cancel() of its requests is kept until they are in the loop
            self._encoding |= ids
        try:
            return self._run_joined_call(batch, samples, on_step, engine, loop)
        finally:
            with self._cancel_lock:
                self._encoding -= ids
                self._cancel_early -= ids

    def _run_joined_call(self, batch: Batch, samples, on_step, engine, loop):
        from .engine import _sync, has_images
        from .steploop import CancelledSample, Group, RunningSample

        guidance = [s.guidance_scale for s in samples]
        enc, encode_s = self._stages.run("encode", engine.encode_stage, samples)
        negatives = iter(enc.negative)
        steps = batch.key.num_inference_steps
        conditions, controls, image_encode_s = [None] * len(samples), [None] * len(samples), 0.0
        if has_images(samples):
            # edits and ControlNet: the input images' VAE encode, beside the loop on the VAE's stage (as
            # ``ZImageEngine.generate`` does it)
            conditions, controls, image_encode_s = self._stages.run("decode", engine.encode_images_stage, samples,
                                                                    steps)
        hooks = _OffLoopHook(on_step, engine.devices["transformer"], loop.stats) if on_step is not None else None
        running = []
        for r, s, lat, pos, g, cond, ctl in zip(batch.requests, samples, engine.initial_latents(samples),
                                                enc.positive, guidance, conditions, controls):
            rs = RunningSample.create(engine, r.request_id, r.tokens, lat, pos, next(negatives) if g > 0 else None,
                                      g, steps if cond is None else cond.num_inference_steps,
                                      start=0 if cond is None else cond.start, loras=s.loras, control=ctl,
                                      control_scale=s.control_scale)
            if cond is not None:  # img2img / inpainting: from the noised image, its own start, the blend per step
                rs.latents = cond.initial_latents(rs.scheduler)
                if cond.mask is not None:
                    rs.after_step = _edit_blend(cond)
            running.append(rs)
        # the samples' tensors were made on this thread's stream; the loop reads them on its own
        _sync(engine.devices["transformer"])
        group = Group(running, hooks)
        del enc, negatives, conditions, controls
        try:
            with self._cancel_lock:  # one step for cancel(): its requests are either encoding or in the loop
                for r in batch.requests:
                    self._joined[r.request_id] = r
                early = {r.request_id for r in batch.requests} & self._cancel_early
                if early:  # cancelled while encoding: they leave before their first step
                    loop.cancel(early)
                loop.submit(group)
            group.done.wait()
        finally:
            for r in batch.requests:
                self._joined.pop(r.request_id, None)
            if hooks is not None:
                hooks.close()  # every step's progress (and the final check) is in before the results are made
        if group.error is not None:
            raise group.error
        if all(s.cancelled for s in group.samples):
            raise CancelledSample(", ".join(s.name for s in group.samples))
        denoise_s = (group.finished_at or time.perf_counter()) - (group.joined_at or time.perf_counter())
        decoded, decode_s = self._stages.run("decode", engine.decode_stage,
                                             [s.latents for s in group.samples if not s.cancelled])
        decoded = iter(decoded)
        images = [None if s.cancelled else next(decoded) for s in group.samples]
        return images, StageTimes(encode_s=encode_s, denoise_s=denoise_s, decode_s=decode_s,
                                  total_s=encode_s + image_encode_s + denoise_s + decode_s,
                                  image_encode_s=image_encode_s)

    def _with_loop_stats(self, emit):
        """Progress events of a joined call carry the loop's step, running and joined counts (called in the loop
        thread right after the step, so they are the step's own)."""
        def wrapped(ev):
            stamp = getattr(_step_stamp, "value", None)  # the step's own counts, taken by _OffLoopHook
            if stamp is not None:
                ev = replace(ev, loop_step=stamp[0], running=stamp[1], joined=stamp[2])
            emit(ev)
        return wrapped

    def cancel(self, request_ids: list[str]) -> int:
        """Requests whose callers went away leave the step loop at its next step, or, still encoding, before their
        first; returns how many were there."""
        with self._cancel_lock:
            names = {i for i in request_ids if i in self._joined}
            early = {i for i in request_ids if i in self._encoding and i not in self._joined}
            self._cancel_early |= early
            if names and self._loop is not None:
                self._loop.cancel(names)
        return len(names) + len(early)

    def loop_stats(self) -> dict:
        """The step loop's counters (steps, joins, running, waiting, shrinks), empty before its first call."""
        from dataclasses import asdict

        return asdict(self._loop.stats) if self._loop is not None else {}

    def encode(self, prompts: list[str], negative_prompts: list[str | None], guidance: float):
        """Serve another replica's encode (component replication): embeddings come back on the CPU."""
        from actors.engine import EncodedPrompts

        if not self._ready:
            raise RuntimeError(f"replica {self.replica_id} (shared text encoder) is not started")
        def encode():
            enc = self.engine.encode(prompts, negative_prompts, guidance)
            self.encodes_served += 1  # (on the encode thread alone: no count is lost)
            return EncodedPrompts([t.cpu() for t in enc.positive], [t.cpu() for t in enc.negative])

        return self._stages.run("encode", encode)

    def _failed(self, batch: Batch, reason: str, kind: str) -> BatchResult:
        results = tuple(
            ImageResult(request_id=r.request_id, ok=False, replica_id=self.replica_id, batch_id=batch.batch_id,
                        batch_size=len(batch), seed=r.seed, error=reason, error_type=kind)
            for r in batch.requests
        )
        return BatchResult(batch.batch_id, self.replica_id, results, StageTimes())

    # ---- fault injection (tests and chaos drills) ------------------------------------------------------
    def inject_fault(self, kind: str | None, **kw) -> None:
        """``kind``: None (clear), 'raise', 'oom_above' (batches larger than ``max_batch`` raise an OOM),
        'stall' (sleep ``seconds`` once), 'exit' (the process dies mid-batch), 'poison' (a batch holding a
        prompt that contains ``marker`` raises as a whole)."""
        from .faults import make_fault

        self._fault = make_fault(kind, **kw)
        self._fault_kind = kind


def _sync_devices(devices: dict) -> None:
    import torch

    for d in {torch.device(d) for d in devices.values() if d is not None}:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


_step_stamp = threading.local()


class _OffLoopHook:
    """A joined call's per-step hook (progress, previews, the final non-finite check: ``screening.StepHook``), run
    off the step loop's thread, in step order: the loop only copies the clean-latent estimates the hook will read
    (at preview steps and the last step), so decoding a preview never holds up the other samples' steps."""

    def __init__(self, hook, device, stats=None):
        from concurrent.futures import ThreadPoolExecutor

        self.hook = hook
        self.device = device
        self.stats = stats  # the loop's counters: each event carries those of its own step
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="step-hook")
        self.error: BaseException | None = None

    def __call__(self, step: int, total: int, denoised) -> None:
        from .engine import _sync

        wanted = step == total or step in getattr(self.hook, "_plan", {})
        estimates = [e.clone() for e in denoised()] if wanted and denoised is not None else None
        if estimates is not None:
            _sync(self.device)  # the hook reads them on another thread's stream
        st = self.stats
        stamp = (st.steps, st.running, st.last_joined) if st is not None else None
        self.pool.submit(self._run, step, total, (lambda: estimates) if estimates is not None else None, stamp)

    def _run(self, step, total, denoised, stamp) -> None:
        _step_stamp.value = stamp
        try:
            self.hook(step, total, denoised)
        except Exception as e:  # noqa: BLE001 - a failed preview must not fail the image
            log.exception("step hook failed at step %d", step)
            self.error = e

    def close(self) -> None:
        self.pool.shutdown(wait=True)


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


def _edit_blend(cond):
    """The inpainting blend as a step-loop ``after_step`` hook: ``Conditioning.after_step`` with the sample's next
    timestep (None after its last step), as ``ZImageEngine.denoise`` calls it."""
    def after_step(s) -> None:
        nxt = s.scheduler.timesteps[s.step] if s.step < s.num_steps else None
        s.latents = cond.after_step(s.scheduler, s.latents, nxt)

    return after_step


def _process_age_s() -> float | None:
    """Seconds since this process was created (None where psutil is missing)."""
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None


def bytecode_cache_note(module_file: str, dont_write_bytecode: bool | None = None) -> str | None:
    """Why a replica's imports are slow where Python keeps no bytecode for the libraries: ``module_file`` (torch's
    ``__init__.py``) has no ``.pyc`` where this interpreter looks for one, and writing them is off
    (PYTHONDONTWRITEBYTECODE), so every replica process compiles the libraries' sources again. None where that is
    not so. On an H100 host (session 11) that cost 7-11 s of every start: imports took 16-20 s a process without
    bytecode and 9-10 s with it."""
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


def _is_oom(e: Exception) -> bool:
    try:
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    return "out of memory" in str(e).lower()


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _idle_before(released: float | None, arrived: float, ready: float, took: float) -> dict[str, float]:
    """How long the devices stood idle before a batch took them at ``took`` (they were let go at ``released``), split
    by cause: before the batch ``arrived`` at the replica (starved), and from then until its encode was ``ready``
    (encoding). A batch that found the devices busy (``released`` after it was ready) was behind none of it."""
    if released is None or released >= took:
        return {"idle_encoding_s": 0.0, "idle_starved_s": 0.0}
    starved = max(0.0, min(arrived, took) - released)
    encoding = max(0.0, min(ready, took) - max(released, arrived))
    return {"idle_encoding_s": encoding, "idle_starved_s": starved}
