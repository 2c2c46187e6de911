"""A replica's start-up: devices, loading, the speed options (quantization, compile), and the warm-up that runs
every graph serving will need before the replica reports ready (``WarmupSpec``), with attention's plans and the
text encoder's shapes built beside it on their stages' threads."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

from zimage_common.config import COMPONENTS
from zimage_common.messages import ReplicaHealth, steps_run

from .devices import sync_all
from .health import _compile_times, _graphs_compiled, bytecode_cache_note

# The replica's log lines keep one logger name whichever part of it writes them: operators filter on it
# (docs/observability.md).
log = logging.getLogger("actors.worker")


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
        from zimage_common.messages import ImageRequest

        sizes = self.planned_sizes()
        one = (*sizes[0], WARMUP_PROMPTS[1])
        mixed = [(w, h, WARMUP_PROMPTS[i % len(WARMUP_PROMPTS)]) for i, (w, h) in enumerate(sizes)]
        out = []
        for batch in ([one], [one] * 2, mixed):  # split what would exceed the token budget
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


class StartupMixin:
    """``PipelineWorker``'s start-up (``start``) and the stage streams it makes."""

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
        if torch.cuda.is_available():
            for d in set(devices.values()):
                if self.memory_fraction:
                    torch.cuda.set_per_process_memory_fraction(self.memory_fraction, torch.device(d))
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
        self.engine = ZImageEngine(comps, devices, dtype, remote_encode=self.encoder)
        phase("load")
        self.make_stage_streams()
        plans = self._start_attention_plans() if self.warmup_spec is not None else None
        # The text encoder's CUDA graphs are captured last, with nothing else running (a capture beside other
        # threads' work changes how the allocator may answer them, and a cache flush from any of them, such as an
        # out-of-memory retry's, would break it). Without graphs its eager shapes run beside the speed options,
        # unless those quantize its weights.
        graphs = self._encoder_graphs_wanted()
        te_quantized = self.model_cfg.text_encoder_quantization in ("int8", "fp8")
        encoder_shapes = None
        if self.warmup_spec is not None and not graphs and not te_quantized:
            encoder_shapes = self._start_encoder_warmup()
        self._apply_speed_options()
        self._load_loras()
        if self.warmup_spec is not None and not graphs and encoder_shapes is None:
            encoder_shapes = self._start_encoder_warmup()
        phase("speed_options")
        if self.warmup_spec is not None:
            from .engine import Sample
            from .steploop import generate

            sync_all(devices.values())  # what loading made on this thread's stream, before the stages use it
            t0 = time.perf_counter()
            spec = self.warmup_spec
            batches = spec.batches()
            if not (self.model_cfg.compile and torch.cuda.is_available()):
                batches = batches[:1]  # nothing to compile: one image shows the replica works
            for batch in batches:
                # the steps on this thread (the denoise stage's builds attention's plans meanwhile); encode and decode
                # on their stages' threads, as in serving
                _, st = generate(self.engine, [Sample(p, i, w, h) for i, (w, h, p) in enumerate(batch)],
                                 spec.num_inference_steps, run=self._stages.run)
                # where a warm start goes: the denoise holds the transformer's graphs (traced, then compiled or
                # loaded from the cache), the decode the VAE decoder's graph for each new size
                log.info("replica %s: warm-up batch %s: encode %.1fs, denoise %.1fs, decode %.1fs", self.replica_id,
                         ", ".join(f"{w}x{h}" for w, h, _ in batch), st.encode_s, st.denoise_s, st.decode_s)
            phase("warmup_batches")
            if self.engine.controlnet is not None:  # [controlnet] its blocks' graphs, and the control path
                import numpy as np

                w, h, p = batches[0][0]
                generate(self.engine, [Sample(p, 0, w, h), Sample(p, 1, w, h, control_image=np.full((h, w, 3), 127,
                                                                                                   np.uint8))],
                         spec.num_inference_steps, run=self._stages.run)
            if torch.cuda.is_available():
                # an edit: its input image's VAE encode runs on the decode stage's thread on the device's stream (the
                # decodes use the reader stream), whose cuBLAS workspace would otherwise be made by the first edit
                self._warm_up_edit(*batches[0][0], spec.num_inference_steps)
            if self.engine.loras is not None and self.model_cfg.compile and torch.cuda.is_available():
                self._warm_up_loras(spec)
            phase("warmup_extra")
            n, plans_s = plans.result()  # this phase is what is left of them after the warm-up batches
            if n:
                log.info("replica %s: attention plans for %d sequence lengths in %.1fs (beside the speed options "
                         "and the warm-up batches)", self.replica_id, n, plans_s)
            phase("attention_plans")
            line = self._stages.run("encode", self._capture_encoder) if graphs else encoder_shapes.result()
            log.info("replica %s: %s", self.replica_id, line)
            phase("text_encoder")
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

    def _warm_up_edit(self, width: int, height: int, prompt: str, steps: int):
        """One img2img call that runs ``steps`` steps: the second half of a schedule twice as long, as a request at
        strength 0.5 runs."""
        import numpy as np

        from .engine import Sample
        from .steploop import generate

        sample = Sample(prompt, 2, width, height, image=np.full((height, width, 3), 127, np.uint8), strength=0.5,
                        num_inference_steps=2 * steps)
        return generate(self.engine, [sample], steps_run(2 * steps, 0.5), run=self._stages.run)

    def _encoder_graphs_wanted(self) -> bool:
        """Whether start-up captures the text encoder's CUDA graphs: asked for, with a warm-up, on CUDA, with an
        encoder of this replica's own."""
        import torch

        return bool(self.warmup_spec is not None and self.model_cfg.text_encoder_graphs and torch.cuda.is_available()
                    and self.engine.text_encoder is not None)

    def _start_encoder_warmup(self) -> Future:
        """Run the text encoder at the warm-up's ``encoder_shapes`` on the encode stage's thread (where serving
        encodes, with its stream and its per-thread plans), beside what start-up does meanwhile, on CUDA only: what a
        long or padded caption loads the first time costs several warm encodes. Returns a line for the log."""
        import torch

        if not torch.cuda.is_available() or self.engine.text_encoder is None:
            done: Future = Future()
            done.set_result("text encoder: nothing to warm up")
            return done
        return self._stages.submit("encode", self._prewarm_encoder)

    def _prewarm_encoder(self) -> str:
        shapes = self.engine.prewarm_encoder(self.warmup_spec.encoder_shapes())
        slow = max(shapes, key=lambda x: x[2])
        return (f"text encoder run at {len(shapes)} (prompts, length) shapes in {sum(x[2] for x in shapes):.1f}s on "
                f"its stage's thread (slowest {slow[0]}x{slow[1]}: {slow[2]:.2f}s): "
                + ", ".join(f"{b}x{n} {t:.2f}s" for b, n, t in shapes))

    def _capture_encoder(self) -> str:
        """The text encoder's CUDA graphs (``model.text_encoder_graphs``), on the encode stage's thread; where they
        cannot be captured, a warning and the eager warm-up instead. Returns a line for the log."""
        try:
            n, seconds, pool = self.engine.capture_encoder_graphs()
            return f"text encoder: {n} CUDA graphs captured in {seconds:.1f}s ({pool / 2**20:.0f} MiB of memory)"
        except Exception as e:  # noqa: BLE001 - an encoder whose forward cannot be captured still serves eager
            log.warning("replica %s: the text encoder's CUDA graphs could not be captured (%s: %s); it runs eager",
                        self.replica_id, type(e).__name__, e)
        return self._prewarm_encoder()

    def _start_attention_plans(self) -> Future:
        """Build attention's per-shape plans (cuDNN) for every sequence length a sample within the replica's plan
        can have, on the denoise stage's thread (cuDNN caches plans per thread; the step loop runs there), beside the
        speed options and the warm-up batches that run meanwhile on this one: a length first seen while serving
        would cost its step a plan's build (tens of ms on an H100, benchmarks/probe_any_size.py), and any size a user
        picks brings new lengths. The plans are C++ work that leaves the GIL free. Returns ``(lengths, seconds)``."""
        max_tokens = self.warmup_spec.max_pixels // (self.engine.size_multiple ** 2)
        t0 = time.perf_counter()

        def build() -> tuple[int, float]:
            return self.engine.packed.prewarm(max_tokens), time.perf_counter() - t0

        return self._stages.submit("denoise", build)

    def make_stage_streams(self) -> None:
        """A CUDA stream for the encode stage, at the higher priority: its kernels are small and a call waits on
        them, so the GPU may schedule their blocks ahead of the running step's as SMs come free (an encode beside a
        step takes several times its time alone); a step loses no more than the encode's own GPU time. The loop's
        latents are read on the engine's reader stream (``devices.ReadStream``)."""
        import torch

        device = self.engine.devices.get("text_encoder")
        if torch.cuda.is_available() and device is not None:
            self._stages.streams = {"encode": torch.cuda.Stream(torch.device(device), priority=-1)}

    def _apply_speed_options(self) -> None:
        cfg = self.model_cfg
        if cfg.text_encoder_quantization in ("int8", "fp8") and self.engine.text_encoder is not None:
            from .quantize import encoder_error, quantize_weight_only

            te, mode = self.engine.text_encoder, cfg.text_encoder_quantization
            self.numerics.update(encoder_error(self.engine, lambda: quantize_weight_only(te, mode)))
            log.info("replica %s: text encoder %s vs %s: %s", self.replica_id, cfg.text_encoder_quantization,
                     self.engine.dtype, self.numerics)
        from .accuracy import apply_transformer_options

        bound = apply_transformer_options(self.engine, cfg)  # fp8 and its accuracy bound
        if bound:
            self.numerics.update(bound)
            (log.info if bound["within_bound"] else log.warning)(
                "replica %s: %s vs eager %s: %s%s", self.replica_id, bound["option"], self.engine.dtype, bound,
                "" if bound["within_bound"] else " (outside the stated bound: the fp8 path computes something else)")
        if cfg.compile and self.engine.devices["transformer"].type == "cuda":

            from .compile_cache import enable_compile_cache

            enable_compile_cache(cfg.compile_cache_dir)
            # dynamic shapes: three graphs cover every packed batch
            self.engine.packed.compile(**({"options": {"cpp_wrapper": True}} if cfg.compile_cpp_wrapper else {}))
            # Its graph compiles in the first warm-up batch's decode, not beside the transformer's on another
            # thread: dynamo's tracing is not thread-safe (a warm start failed with "using FX to symbolically trace
            # a dynamo-optimized function").
            from .compiled import compile_vae_decoder

            compile_vae_decoder(self.engine.vae)


def _process_age_s() -> float | None:
    """Seconds since this process was created (None where psutil is missing)."""
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None
