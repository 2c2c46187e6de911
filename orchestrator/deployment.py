"""The Python API: start a deployment from a config, generate images, shut down.

    async with await Deployment.start(load_config("clusters/local-cpu.yaml")) as dep:
        results = await dep.generate(["a red fox", "a lighthouse"], seed=7)

    with ZImageClient(load_config()) as client:          # the same, synchronously
        images = client.generate_images("a red fox", n=2)

Start-up order: validate the config and compute the plan before any GPU work (errors name the file and field),
connect to Ray, read the live inventory, plan, create one actor per replica, wait until every replica has loaded
and warmed up, then start the router.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace

from placement import (
    DeploymentSpec,
    Inventory,
    PlacementError,
    PlacementPlan,
    fp8_capable,
    model_spec,
    plan,
    plan_best,
    with_loras,
)
from placement.memory import MAIN_BLOCKS
from zimage_common.config import Config, LoraSpec, ModelConfig
from zimage_common.errors import ConfigError, NotReadyError, ZImageError
from zimage_common.messages import ImageRequest, ImageResult, ReplicaHealth

from .deployment_loras import LoraAdmin
from .replicas import Backend, ReplicaHandle, ReplicaSet, ReplicaSpec, ReplicaState
from .requests import build_requests, parse_size
from .router import STEP_QUEUE_DEPTH, Clock, MonotonicClock, Router, RouterObserver

log = logging.getLogger(__name__)


def deployment_spec(config: Config) -> DeploymentSpec:
    d = config.deployment
    return DeploymentSpec(
        mode=d.mode,
        replicas=d.replicas,
        gpus_per_replica=d.gpus_per_replica,
        device_map=d.device_map,
        width=config.defaults.width,
        height=config.defaults.height,
        max_batch_size=config.router.max_batch_size,
        max_batch_tokens=config.router.max_batch_tokens,
    )


def plan_for(config: Config, inventory: Inventory) -> PlacementPlan:
    """The placement plan of ``config`` on ``inventory`` (GPU memory capped by deployment.gpu_memory_limit_gib).
    With ``model.quantization`` or ``model.text_encoder_quantization`` set to ``auto``, the planner weighs the
    precisions as a placement choice and keeps the plan it estimates fastest (its notes say why)."""
    cap = config.deployment.gpu_memory_limit_gib
    if cap is not None:
        inventory = Inventory(tuple(type(g)(g.node, g.index, min(g.memory_gib, cap)) for g in inventory.gpus))
    m = config.model
    transformer = ["none", "fp8"] if m.quantization == "auto" else [m.quantization]
    no_fp8 = sorted({n.gpu_type for n in config.cluster.nodes or [] if fp8_capable(n.gpu_type) is False})
    note = None
    if no_fp8 and m.quantization == "fp8":
        raise PlacementError(f"model.quantization fp8 needs GPUs with fp8 tensor cores (Ada, Hopper, Blackwell); "
                             f"{', '.join(no_fp8)} has none: set model.quantization to none or auto")
    if no_fp8 and m.quantization == "auto":
        transformer = ["none"]
        note = f"fp8 not considered: {', '.join(no_fp8)} has no fp8 tensor cores"
    text_encoder = ["none", "int8"] if m.text_encoder_quantization == "auto" else [m.text_encoder_quantization]
    check_bf16_blocks(m)
    kept = m.fp8_bf16_blocks
    kept = int(kept.partition(":")[2]) if isinstance(kept, str) else len(kept)
    graphs = m.text_encoder_graphs and config.deployment.warmup  # captured only at a warm-up (and only on CUDA)
    options = [with_loras(model_spec(m.source, m.dtype, t, te, controlnet=m.controlnet is not None,
                                     bf16_blocks=kept if t == "fp8" else 0, encoder_graphs=graphs),
                          m.lora_slots, m.lora_max_rank)
               for te in text_encoder for t in transformer]
    spec = deployment_spec(config)
    chosen = plan(options[0], inventory, spec) if len(options) == 1 else plan_best(options, inventory, spec)
    notes = [note] if note is not None else []
    pool = options[0].components["text_encoder"].resident_gib
    if pool:
        notes.append(f"the text encoder's CUDA graphs hold {pool:.2f} GiB on its GPU (model.text_encoder_graphs: "
                     f"false leaves that to batches and image size, and encodes run eager)")
    return replace(chosen, notes=(*notes, *chosen.notes)) if notes else chosen


def check_bf16_blocks(model: ModelConfig) -> None:
    """``model.fp8_bf16_blocks`` against the main blocks the model has (a replica would refuse it only when it
    loads): every index exists, and 'last:N' / 'first:N' asks for no more than there are."""
    blocks, n = model.fp8_bf16_blocks, MAIN_BLOCKS["tiny" if model.source == "tiny" else "full"]
    bad = sorted(i for i in blocks if not 0 <= i < n) if isinstance(blocks, list) else []
    if bad:
        raise ConfigError(f"model.fp8_bf16_blocks: block(s) {bad} do not exist; this model has {n} main blocks "
                          f"(0-{n - 1})")
    if isinstance(blocks, str) and int(blocks.partition(":")[2]) > n:
        raise ConfigError(f"model.fp8_bf16_blocks: {blocks!r} keeps more main blocks in bf16 than the {n} this model "
                          f"has")


def model_for_plan(model: ModelConfig, placement: PlacementPlan) -> ModelConfig:
    """The model config a replica loads: ``auto`` precisions replaced by what the plan chose."""
    p = dict(placement.precisions)
    return model.model_copy(update={
        "quantization": "fp8" if p.get("transformer") == "fp8" else "none",
        "text_encoder_quantization": p.get("text_encoder") if p.get("text_encoder") in ("int8", "fp8") else "none",
    })


def declared_inventory(config: Config) -> Inventory | None:
    nodes = config.cluster.nodes
    if nodes is None:
        return None
    return Inventory.from_nodes([(n.name, n.gpus, n.gpu_memory_gib) for n in nodes])


class Deployment(LoraAdmin):
    """A running deployment: its config, placement plan, router and replica set (which owns the replicas'
    lifecycle, see ``replicas.py``). The backend (Ray unless given) and the clock are injected for tests."""

    def __init__(self, config: Config, backend: Backend | None = None, clock: Clock | None = None,
                 observer: RouterObserver | None = None):
        self.config = config
        self.plan: PlacementPlan | None = None
        if backend is None:
            from .ray_backend import RayBackend  # imports Ray: only when a deployment runs on it

            backend = RayBackend()
        self.backend: Backend = backend
        self.clock: Clock = clock or MonotonicClock()
        self.observer: RouterObserver = observer or RouterObserver()
        self.replica_set = ReplicaSet(self.backend, config.deployment, self.clock, self.observer,
                                      on_change=self._replica_changed)
        self.router: Router | None = None
        # Ray names (actors, placement groups) carry this, so deployments sharing a namespace never collide.
        self.deployment_id = uuid.uuid4().hex[:8]
        self.ready = False
        # seconds of each start-up phase, in order: "connect" (Ray), "inventory" (the GPUs' memory), "replicas"
        # (from placing them to every one ready; each replica's own phases are in its health's startup_s)
        self.startup_s: dict[str, float] = {}
        # LoRA adapters every replica holds: the configured ones (loaded at start-up from model.loras) and those
        # registered at runtime (re-registered on a replica that restarts, before it is live again).
        self.lora_specs: dict[str, LoraSpec] = {s.name: s for s in config.model.loras}
        self._configured_loras = frozenset(self.lora_specs)  # the operator's: never replaced or removed at runtime
        self._runtime_loras: set[str] = set()
        self._runtime_bytes: dict[str, int] = {}  # host bytes of each runtime adapter (as a replica holds it)
        self._lora_lock = asyncio.Lock()
        self.replica_set.before_live = self._resync_loras
        self._store_address: tuple[str, str] | None = None  # the Idempotency-Key store's (namespace, actor name)
        self._idempotency = None
        self.pool_record: dict | None = None  # frontdoor.pool: the pool's record (pool.py)

    # ---- start / stop ----------------------------------------------------------------------------------
    @classmethod
    async def start(cls, config: Config, observer: RouterObserver | None = None,
                    on_replica_ready: Callable[[ReplicaHealth], None] | None = None, *,
                    backend: Backend | None = None, clock: Clock | None = None) -> Deployment:
        self = cls(config, backend=backend, clock=clock, observer=observer)
        await self._start(on_replica_ready)
        return self

    async def _start(self, on_replica_ready) -> None:
        cfg, backend = self.config, self.backend
        declared = declared_inventory(cfg)
        if declared is not None:
            plan_for(cfg, declared)  # fail on an impossible config before touching Ray or a GPU
        t0 = time.perf_counter()
        backend.connect(cfg.cluster)
        self.startup_s["connect"] = time.perf_counter() - t0
        if cfg.frontdoor.pool is not None:
            from .pool import open_pool

            await open_pool(self, on_replica_ready)  # attach to the pool's replicas, or create them
        else:
            self._store_address = self._idempotency_address(None)
            self._make_replicas(await self.replica_specs())
            await self._start_replicas(on_replica_ready)
        self.router = Router(self.replica_set, cfg.router, clock=self.clock, observer=self.observer,
                             max_batch_adapters=cfg.model.lora_slots or None,
                             interactive_reserve=(cfg.batches.reserve_replicas, cfg.batches.reserve_s,
                                                  cfg.batches.reserve_batch_size),
                             shared=cfg.frontdoor.pool is not None)  # other front doors send to them too
        self.router.start()
        self.replica_set.start_health_checks()
        self.ready = True

    async def replica_specs(self, namespace: str | None = None) -> list[ReplicaSpec]:
        """Read the live inventory, plan, and describe each replica of the plan (hosts of a shared text encoder
        before the replicas that borrow it). ``namespace``: a pool's, whose replicas are named, detached actors."""
        cfg, backend = self.config, self.backend
        t0 = time.perf_counter()
        if cfg.cluster.wait_for_gpus:
            nodes = await backend.wait_for_gpus(cfg.cluster.wait_for_gpus, cfg.cluster.wait_timeout_s)
        else:
            nodes = backend.live_nodes()
        if not nodes:
            raise NotReadyError("the Ray cluster has no GPUs (declare cluster.num_gpus for a local Ray, or join "
                                "a cluster whose nodes have GPUs)")
        mem = {n.name: cfg.cluster.gpu_memory_gib or await asyncio.to_thread(backend.probe_gpu_memory_gib, n)
               for n in nodes}
        inventory = Inventory.from_nodes([(n.name, n.gpus, mem[n.name]) for n in nodes])
        self.startup_s["inventory"] = time.perf_counter() - t0
        self.plan = plan_for(cfg, inventory)
        by_name = {n.name: n for n in nodes}
        d, fd = cfg.deployment, cfg.frontdoor
        sizes = [(cfg.defaults.width, cfg.defaults.height)]
        sizes += [s for s in (parse_size(x, cfg.defaults) for x in d.warmup_sizes) if s not in sizes]
        borrowers = Counter(rp.encoder_replica for rp in self.plan.replicas if rp.encoder_replica)
        mbs = cfg.router.max_batch_size
        # one call per group of requests in its loop or waiting at it (the router keeps up to STEP_QUEUE_DEPTH running
        # sets' worth of interactive work there, and as much of a batch job's: dispatch_policy.room), and one more
        # slot for cancellations; a pooled replica keeps that for each of max_frontdoors front doors, a private one a
        # slot for the health check besides
        calls = STEP_QUEUE_DEPTH * mbs
        pooled = namespace is not None
        doors = fd.max_frontdoors if pooled else 1
        slots = (2 * calls + 1) * doors + (0 if pooled else 1)
        return [
            ReplicaSpec(
                replica_id=rp.replica_id, node=by_name[rp.node], n_gpus=len(rp.gpus), cpus=d.cpu_per_replica,
                # no request is larger than the limit, whatever the replica's memory would place: the warm-up builds
                # what every size up to this needs (actors/startup.py _start_attention_plans)
                max_pixels=min(rp.max_pixels, cfg.limits.max_pixels), max_batch_tokens=rp.max_batch_tokens,
                max_concurrency=slots + borrowers.get(rp.replica_id, 0),
                deployment_id=self.deployment_id, model=model_for_plan(cfg.model, self.plan), device_map=rp.device_map,
                warmup_sizes=tuple(sizes) if d.warmup else None,
                warmup_steps=min(2, cfg.defaults.num_inference_steps), torch_threads=d.torch_threads,
                memory_fraction=d.gpu_memory_limit_gib / mem[rp.node] if d.gpu_memory_limit_gib is not None else None,
                encoder_replica=rp.encoder_replica, max_batch_size=mbs,
                # what one router sends a replica at most, of each kind of work (actors/admission.py): the replica
                # holds every front door to it together
                admission=(calls, STEP_QUEUE_DEPTH * rp.max_batch_tokens, STEP_QUEUE_DEPTH * mbs),
                encode_threads=fd.replica_encode_threads,
                namespace=namespace, control_slots=2 * doors + 4 if pooled else 0,
                results_store=self._store_address,
            )
            for rp in self.plan.replicas
        ]

    def _make_replicas(self, specs: Sequence[ReplicaSpec]) -> None:
        replicas = self.replica_set
        for spec in specs:  # hosts of a shared text encoder come before the replicas that borrow it
            host = replicas.replicas[spec.encoder_replica] if spec.encoder_replica else None
            replicas.add(self.backend.make_replica(spec, encoder_host=host))
        if self.plan is not None:
            log.info("placing %d replica(s): %s", len(replicas.replicas),
                     ", ".join(f"{r.replica_id}@{r.node}:{list(r.gpus)}" for r in self.plan.replicas))

    async def _start_replicas(self, on_replica_ready) -> None:
        """Load and warm up every replica (an attached pooled replica that is loaded already answers at once)."""
        replicas = self.replica_set

        async def start_one(rid):
            h = await replicas.start_replica(rid, self.config.deployment.start_timeout_s)
            if on_replica_ready:
                on_replica_ready(h)

        # Replicas that host a shared text encoder warm up first: the ones borrowing it encode through them.
        borrowing = {rp.replica_id for rp in self.plan.replicas if rp.encoder_replica}
        t1 = time.perf_counter()
        try:
            for phase in (False, True):
                await asyncio.gather(*(start_one(rid) for rid in replicas.replicas if (rid in borrowing) == phase))
        except BaseException:
            await self.shutdown()
            raise
        self.startup_s["replicas"] = time.perf_counter() - t1

    # ---- Idempotency-Key (idempotency.py) --------------------------------------------------------------
    def _idempotency_address(self, namespace: str | None) -> tuple[str, str] | None:
        """Where the replicas find the store of keyed images; None where the backend has none (the fakes)."""
        address = getattr(self.backend, "idempotency_address", None)
        return None if address is None else address(namespace, self.deployment_id)

    @property
    def idempotency(self):
        """The front door's client of the Idempotency-Key store, made on first use: through Ray, the actor the
        replicas claim keyed images in (a pool's is shared by its front doors); elsewhere one in this process."""
        if self._idempotency is None:
            cfg = self.config.frontdoor.idempotency
            make = getattr(self.backend, "idempotency_client", None)
            if make is not None and self._store_address is not None:
                self._idempotency = make(self._store_address, self.deployment_id, self.config.frontdoor.pool, cfg)
            else:
                from .idempotency import LocalIdempotency

                self._idempotency = LocalIdempotency(cfg)
        return self._idempotency

    async def shutdown(self, drain_timeout_s: float | None = 0) -> None:
        """Stop the router (after draining for up to ``drain_timeout_s``), then remove every replica (a pool's
        replicas stay, for its other front doors)."""
        self.ready = False
        if self.router is not None:
            if drain_timeout_s:
                await self.router.drain(drain_timeout_s)
            await self.router.stop()
        await self.replica_set.close()
        if self._idempotency is not None and self.config.frontdoor.pool is None:
            close = getattr(self.backend, "close_idempotency", None)
            if close is not None:
                close(self._idempotency)

    async def __aenter__(self) -> Deployment:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.shutdown()

    # ---- the replicas (owned by the replica set) -------------------------------------------------------
    @property
    def replicas(self) -> dict[str, ReplicaHandle]:
        """Every replica not dropped: live, recovering or failed."""
        return self.replica_set.replicas

    @property
    def health(self) -> dict[str, ReplicaHealth]:
        return self.replica_set.health

    @property
    def events(self) -> list[tuple[float, str, str]]:
        return self.replica_set.events

    def live(self) -> list[ReplicaHandle]:
        return self.replica_set.live()

    def members(self) -> list[ReplicaHandle]:
        return self.replica_set.members()

    def not_answering(self) -> list[str]:
        """Live replicas whose health check has gone unanswered past ``deployment.unresponsive_after_s``."""
        return self.replica_set.not_answering(self.config.deployment.unresponsive_after_s)

    def report_failure(self, replica_id: str, error: BaseException) -> None:
        self.replica_set.report_failure(replica_id, error)

    def _replica_changed(self, replica_id: str, state: ReplicaState, reason: str) -> None:
        if state is ReplicaState.DROPPED and self.plan is not None:
            # The plan for the survivors: the lost replica and its GPUs leave it.
            lost = next((r for r in self.plan.replicas if r.replica_id == replica_id), None)
            gone = {(lost.node, g) for g in lost.gpus} if lost else set()
            self.plan = replace(
                self.plan,
                replicas=tuple(r for r in self.plan.replicas if r.replica_id != replica_id),
                gpus=tuple(g for g in self.plan.gpus if (g.node, g.gpu) not in gone),
                notes=(*self.plan.notes, f"{replica_id} {reason}"),
            )
        if self.router is not None:
            self.router.wake()  # a replica came back or left: reconsider dispatch now

    # ---- generation ------------------------------------------------------------------------------------
    @property
    def max_side(self) -> int | None:
        """The longest image side every replica's model can place (its transformer's position table), as the
        replicas reported it at start-up; None when none reported one."""
        sides = [h.max_side for h in self.health.values() if h.max_side]
        return min(sides) if sides else None

    def requests_for(self, prompt: str, **params) -> list[ImageRequest]:
        """The requests for one prompt (``build_requests``' parameters; ``requests_for`` below), checked against
        what this deployment can place and the adapters it knows."""
        return requests_for(self.config, prompt, max_side=self.max_side, known_loras=self.lora_names, **params)

    def edit_requests_for(self, prompt: str, image, **params) -> list[ImageRequest]:
        """The requests of an edit (``edit_requests_for`` below) on this deployment."""
        return edit_requests_for(self.config, prompt, image, max_side=self.max_side, known_loras=self.lora_names,
                                 **params)

    async def submit(self, request: ImageRequest, timeout_s: float | None = None, on_progress=None) -> ImageResult:
        if self.router is None:
            raise NotReadyError("the deployment has not started")
        return await self.router.submit(request, timeout_s, on_progress)

    def admit(self, requests: Sequence[ImageRequest], timeout_s: float | None = None, on_progress=None):
        """Queue all of ``requests`` or none (``Router.admit``); returns one awaitable result per request."""
        if self.router is None:
            raise NotReadyError("the deployment has not started")
        return self.router.admit(requests, timeout_s, on_progress)

    async def generate(self, prompts: str | Sequence[str], **params) -> list[ImageResult]:
        """Generate images for one prompt or many (each fanned out ``n`` times). Parameters: n, width, height,
        num_inference_steps, guidance_scale, seed, negative_prompt, loras (``[{"name", "scale"}]``); for an edit,
        image (one or a list), mask and strength (``edit_requests_for``). Results come back in prompt order; a failed
        request is a result with ``ok=False`` and its reason."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        requests = await self.build_requests(prompts, **params)
        return list(await asyncio.gather(*self.admit(requests)))

    async def build_requests(self, prompts: Sequence[str], **params) -> list[ImageRequest]:
        """``requests_for`` of each prompt; with an input image (an edit, a control image) in a worker thread:
        decoding and resizing images is CPU work, and the router runs on this event loop."""
        def build():
            return [r for p in prompts for r in self.requests_for(p, **params)]

        if params.get("image") is None and params.get("control_image") is None:
            return build()
        return await asyncio.get_running_loop().run_in_executor(None, contextvars.copy_context().run, build)

    async def queue_lengths(self) -> dict[str, int]:
        """Each live replica's queue as it reports it (samples at its admission gate and inside, from every front
        door of its pool); replicas that cannot say are left out."""
        async def ask(rid, h):
            try:
                return rid, await asyncio.wait_for(h.queue_len(), 5)
            except Exception:  # noqa: BLE001 - a replica without a gate (fakes) or down: not reported
                return rid, None

        answers = await asyncio.gather(*(ask(h.replica_id, h) for h in self.live()))
        return {rid: n for rid, n in answers if n is not None}

    async def replica_health(self) -> dict[str, ReplicaHealth | str]:
        out: dict[str, ReplicaHealth | str] = {}
        for rid, r in self.replicas.items():
            if self.replica_set.state(rid) is not ReplicaState.LIVE:
                out[rid] = "down"
                continue
            try:
                out[rid] = await asyncio.wait_for(r.health(), 10)
            except Exception as e:  # noqa: BLE001 - report, don't raise
                out[rid] = f"unreachable: {e}"
        return out


class ZImageClient:
    """Synchronous wrapper: runs a deployment on a private event loop thread."""

    def __init__(self, config: Config):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="zimage-client", daemon=True)
        self._thread.start()
        self.deployment: Deployment = self._call(Deployment.start(config))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, prompts: str | Sequence[str], **params) -> list[ImageResult]:
        return self._call(self.deployment.generate(prompts, **params))

    def generate_images(self, prompts: str | Sequence[str], **params):
        """Like ``generate`` but returns PIL images, raising on the first failed request."""
        images = []
        for r in self.generate(prompts, **params):
            if not r.ok:
                raise ZImageError(f"request {r.request_id} failed: {r.error}")
            images.append(r.pil())
        return images

    def register_lora(self, name: str, path: str | None = None, **spec) -> dict:
        return self._call(self.deployment.register_lora(name, path, **spec))

    def unregister_lora(self, name: str) -> bool:
        return self._call(self.deployment.unregister_lora(name))

    def loras(self) -> list[dict]:
        return self._call(self.deployment.loras())

    def close(self) -> None:
        try:
            self._call(self.deployment.shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> ZImageClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def requests_for(config: Config, prompt: str, max_side: int | None = None, known_loras=None,
                 **params) -> list[ImageRequest]:
    """The requests for one prompt (``build_requests``' parameters) under ``config``; with ``image`` an edit
    (``edit_requests_for``); with ``control_image`` (bytes, a path, a PIL image or a uint8 array) and
    ``controlnet_conditioning_scale``, ControlNet-guided (needs ``model.controlnet``). ``max_side`` and
    ``known_loras``: the largest side the deployment's plan can place and the adapters it knows (None before a
    deployment has started, as the CLI checks its input: sides then against the model's own limit, adapters not at
    all)."""
    from .image_input import file_bytes

    if params.get("control_image") is not None:
        params["control_image"] = file_bytes(params["control_image"], "control_image")
    if params.get("image") is not None:
        return edit_requests_for(config, prompt, max_side=max_side, known_loras=known_loras, **params)
    params.pop("image", None)
    control, scale = params.pop("control_image", None), params.pop("controlnet_conditioning_scale", None)
    requests = build_requests(prompt, defaults=config.defaults, limits=config.limits, max_side=max_side,
                              known_loras=known_loras, **params)
    if control is not None or scale is not None:
        from .images_api import with_control

        requests = with_control(requests, control, scale, config)
    return requests


def edit_requests_for(config: Config, prompt: str, image, mask=None, strength: float | None = None,
                      width: int | None = None, height: int | None = None, max_side: int | None = None,
                      known_loras=None, **params) -> list[ImageRequest]:
    """The requests of an edit, checked as ``POST /v1/images/edits`` checks them (``images_api.parse_edit``):
    ``image`` one image or a list (bytes, a path, a PIL image or a uint8 array), ``mask`` (its transparent
    pixels are repainted), ``strength``; without ``width``/``height`` the output has the first image's size."""
    from .image_input import file_bytes
    from .images_api import parse_edit

    images = image if isinstance(image, (list, tuple)) else [image]
    fields = {"prompt": prompt, "strength": strength, **params}
    if width is not None or height is not None:
        fields["size"] = f"{width or config.defaults.width}x{height or config.defaults.height}"
    files = {"image": [file_bytes(i, "image") for i in images],
             "mask": None if mask is None else file_bytes(mask, "mask")}
    return parse_edit(fields, files, config, max_side, known_loras=known_loras).requests
