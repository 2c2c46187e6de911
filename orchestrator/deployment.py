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
from zimage_common.config import Config, LoraSpec, ModelConfig, hub_path_problem
from zimage_common.errors import (
    ConflictError,
    ForbiddenError,
    InvalidRequestError,
    NotReadyError,
    ReplicaUnavailableError,
    ZImageError,
)
from zimage_common.messages import ImageRequest, ImageResult, ReplicaHealth

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
    options = [with_loras(model_spec(m.source, m.dtype, t, te, controlnet=m.controlnet is not None), m.lora_slots,
                          m.lora_max_rank)
               for te in text_encoder for t in transformer]
    if len(options) == 1:
        chosen = plan(options[0], inventory, deployment_spec(config))
    else:
        chosen = plan_best(options, inventory, deployment_spec(config))
    return chosen if note is None else replace(chosen, notes=(note, *chosen.notes))


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


def _ray_backend() -> Backend:
    from .ray_backend import RayBackend  # imports Ray: only when a deployment runs on it

    return RayBackend()


class Deployment:
    """A running deployment: its config, placement plan, router and replica set (which owns the replicas'
    lifecycle, see ``replicas.py``). The backend (Ray unless given) and the clock are injected for tests."""

    def __init__(self, config: Config, backend: Backend | None = None, clock: Clock | None = None,
                 observer: RouterObserver | None = None):
        self.config = config
        self.plan: PlacementPlan | None = None
        self.backend: Backend = backend if backend is not None else _ray_backend()
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
        if cfg.cluster.wait_for_gpus:
            nodes = await backend.wait_for_gpus(cfg.cluster.wait_for_gpus, cfg.cluster.wait_timeout_s)
        else:
            nodes = backend.live_nodes()
        if not nodes:
            raise NotReadyError("the Ray cluster has no GPUs (declare cluster.num_gpus for a local Ray, or join "
                                "a cluster whose nodes have GPUs)")
        mem = {}
        for node in nodes:
            mem[node.name] = cfg.cluster.gpu_memory_gib or await asyncio.to_thread(backend.probe_gpu_memory_gib,
                                                                                    node)
        inventory = Inventory.from_nodes([(n.name, n.gpus, mem[n.name]) for n in nodes])
        self.startup_s["inventory"] = time.perf_counter() - t0 - self.startup_s["connect"]
        self.plan = plan_for(cfg, inventory)
        by_name = {n.name: n for n in nodes}
        d = cfg.deployment
        sizes = [(cfg.defaults.width, cfg.defaults.height)]
        sizes += [s for s in (parse_size(x, cfg.defaults) for x in d.warmup_sizes) if s not in sizes]
        borrowers = {}
        for rp in self.plan.replicas:
            if rp.encoder_replica:
                borrowers[rp.encoder_replica] = borrowers.get(rp.encoder_replica, 0) + 1
        replicas = self.replica_set
        for rp in self.plan.replicas:  # hosts of a shared text encoder come before the replicas that borrow it
            spec = ReplicaSpec(
                replica_id=rp.replica_id, node=by_name[rp.node], n_gpus=len(rp.gpus), cpus=d.cpu_per_replica,
                # no request is larger than the limit, whatever the replica's memory would place: the warm-up builds
                # what every size up to this needs (actors/startup.py _start_attention_plans)
                max_pixels=min(rp.max_pixels, cfg.limits.max_pixels), max_batch_tokens=rp.max_batch_tokens,
                # one call per group of requests in its loop or waiting at it (the router keeps up to
                # STEP_QUEUE_DEPTH running sets' worth there), one for health checks, one for cancels, one per
                # borrower's encodes
                max_concurrency=STEP_QUEUE_DEPTH * cfg.router.max_batch_size + 2 + borrowers.get(rp.replica_id, 0),
                deployment_id=self.deployment_id, model=model_for_plan(cfg.model, self.plan), device_map=rp.device_map,
                warmup_sizes=tuple(sizes) if d.warmup else None,
                warmup_steps=min(2, cfg.defaults.num_inference_steps), torch_threads=d.torch_threads,
                memory_fraction=d.gpu_memory_limit_gib / mem[rp.node] if d.gpu_memory_limit_gib is not None else None,
                encoder_replica=rp.encoder_replica, max_batch_size=cfg.router.max_batch_size,
            )
            host = replicas.replicas[rp.encoder_replica] if rp.encoder_replica else None
            replicas.add(backend.make_replica(spec, encoder_host=host))
        log.info("placing %d replica(s): %s", len(replicas.replicas),
                 ", ".join(f"{r.replica_id}@{r.node}:{list(r.gpus)}" for r in self.plan.replicas))

        async def start_one(rid):
            h = await replicas.start_replica(rid, d.start_timeout_s)
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
        self.router = Router(replicas, cfg.router, clock=self.clock, observer=self.observer,
                             max_batch_adapters=cfg.model.lora_slots or None,
                             interactive_reserve=(cfg.batches.reserve_replicas, cfg.batches.reserve_s,
                                                  cfg.batches.reserve_batch_size))
        self.router.start()
        replicas.start_health_checks()
        self.ready = True

    async def shutdown(self, drain_timeout_s: float | None = 0) -> None:
        """Stop the router (after draining for up to ``drain_timeout_s``), then remove every replica."""
        self.ready = False
        if self.router is not None:
            if drain_timeout_s:
                await self.router.drain(drain_timeout_s)
            await self.router.stop()
        await self.replica_set.close()

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
        """The requests for one prompt (``build_requests``' parameters); with ``image`` an edit
        (``edit_requests_for``); with ``control_image`` (bytes, a path, a PIL image or a uint8 array) and
        ``controlnet_conditioning_scale``, ControlNet-guided (needs ``model.controlnet``)."""
        from .image_input import file_bytes

        if params.get("control_image") is not None:
            params["control_image"] = file_bytes(params["control_image"], "control_image")
        if params.get("image") is not None:
            return self.edit_requests_for(prompt, **params)
        params.pop("image", None)
        control, scale = params.pop("control_image", None), params.pop("controlnet_conditioning_scale", None)
        requests = build_requests(prompt, defaults=self.config.defaults, limits=self.config.limits,
                                  max_side=self.max_side, known_loras=self.lora_names, **params)
        if control is not None or scale is not None:
            from .images_api import with_control

            requests = with_control(requests, control, scale, self.config)
        return requests

    def edit_requests_for(self, prompt: str, image, mask=None, strength: float | None = None,
                          width: int | None = None, height: int | None = None, **params) -> list[ImageRequest]:
        """The requests of an edit, checked as ``POST /v1/images/edits`` checks them (``images_api.parse_edit``):
        ``image`` one image or a list (bytes, a path, a PIL image or a uint8 array), ``mask`` (its transparent
        pixels are repainted), ``strength``; without ``width``/``height`` the output has the first image's size."""
        from .image_input import file_bytes
        from .images_api import parse_edit

        images = image if isinstance(image, (list, tuple)) else [image]
        fields = {"prompt": prompt, "strength": strength, **params}
        if width is not None or height is not None:
            fields["size"] = f"{width or self.config.defaults.width}x{height or self.config.defaults.height}"
        files = {"image": [file_bytes(i, "image") for i in images],
                 "mask": None if mask is None else file_bytes(mask, "mask")}
        return parse_edit(fields, files, self.config, self.max_side, known_loras=self.lora_names).requests

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

    # ---- per-request LoRA -------------------------------------------------------------------------------
    @property
    def lora_names(self) -> frozenset[str]:
        """The adapters requests may name (``loras``)."""
        return frozenset(self.lora_specs)

    async def register_lora(self, name: str, path: str | None = None, **spec) -> dict:
        """Load an adapter on every replica, all or none: ``path`` inside ``model.lora_dir`` on each replica's
        machine (relative to it, or absolute inside it; symlinks resolved), or ``source`` / ``model_id`` /
        ``revision`` for a hub when ``model.lora_runtime_hub`` allows it. A bad adapter is an
        ``InvalidRequestError`` naming ``path`` and the reason, and no replica keeps it; a registration the
        configuration does not allow is a ``ForbiddenError`` (403) saying which setting would; the name of a
        configured adapter (model.loras) is a ``ConflictError`` (409). Replaces a runtime adapter of the same
        name. Returns what ``loras()`` says of it."""
        m = self.config.model
        if m.lora_slots <= 0:
            raise InvalidRequestError("per-request LoRA is off in this deployment: set model.lora_max_resident "
                                      "above 0 (or configure model.loras)", param="name")
        if spec.get("source", "local") not in ("local", None) and (problem := hub_path_problem(path)):
            raise InvalidRequestError(problem, param="path")
        try:
            lora = LoraSpec(name=name, path=path, **spec)
        except (ValueError, TypeError) as e:
            raise InvalidRequestError(f"invalid adapter: {_first_error(e)}",
                                      param=_first_loc(e) or "name") from None
        if lora.name in self._configured_loras:
            raise ConflictError(f"adapter {lora.name!r} is configured (model.loras) and cannot be replaced at "
                                f"runtime; register this one under another name", param="name")
        if lora.source == "local" and m.lora_dir is None:
            raise ForbiddenError("runtime registration of adapter files is off on this deployment: the operator "
                                 "sets model.lora_dir (the directory they may be read from) to enable it; "
                                 "adapters in model.loras are loaded at start-up", param="path")
        if lora.source != "local" and not m.lora_runtime_hub:
            raise ForbiddenError(f"runtime registration of {lora.source} adapters is off on this deployment: the "
                                 f"operator enables it with model.lora_runtime_hub (or lists the adapter in "
                                 f"model.loras)", param="source")
        async with self._lora_lock:
            replacing = lora.name in self._runtime_loras
            if not replacing and len(self._runtime_loras) >= m.lora_max_runtime:
                raise ConflictError(f"{len(self._runtime_loras)} adapters are registered at runtime, the most this "
                                    f"deployment holds (model.lora_max_runtime = {m.lora_max_runtime}); remove one "
                                    f"(DELETE /v1/loras/{{name}}) first", param="name")
            handles = list(self.replicas.values())
            if not handles:
                raise NotReadyError("no replica to load the adapter on")
            outs = await asyncio.gather(*(h.call("register_lora", lora.model_dump()) for h in handles),
                                        return_exceptions=True)
            loaded = [h for h, o in zip(handles, outs) if not isinstance(o, BaseException) and o["ok"]]
            refused = [o["error"] for o in outs if not isinstance(o, BaseException) and not o["ok"]]
            bad = [(h.replica_id, o) for h, o in zip(handles, outs) if isinstance(o, BaseException)]
            if refused or not loaded:  # all or none
                await asyncio.gather(*(h.call("unregister_lora", lora.name) for h in loaded), return_exceptions=True)
                if refused:
                    raise InvalidRequestError(f"adapter {lora.name!r} could not be loaded: {refused[0]}",
                                              param="path")
                raise NotReadyError(f"no replica could load adapter {lora.name!r}: {bad[0][1]}")
            nbytes = max(int((o.get("info") or {}).get("bytes", 0)) for o in outs if not isinstance(o, BaseException))
            others = sum(b for n, b in self._runtime_bytes.items() if n != lora.name)
            if others + nbytes > m.lora_max_runtime_bytes:
                await asyncio.gather(*(h.call("unregister_lora", lora.name) for h in loaded), return_exceptions=True)
                if replacing:  # the old adapter of that name was replaced on the replicas: it is gone now
                    self.lora_specs.pop(lora.name, None)
                    self._runtime_loras.discard(lora.name)
                    self._runtime_bytes.pop(lora.name, None)
                raise ConflictError(f"adapter {lora.name!r} takes {nbytes} bytes; with the {others} bytes of the "
                                    f"other runtime adapters that is over model.lora_max_runtime_bytes = "
                                    f"{m.lora_max_runtime_bytes}; remove one (DELETE /v1/loras/{{name}}) first",
                                    param="path")
            self._runtime_bytes[lora.name] = nbytes
            for rid, e in bad:  # down replicas: they get it when they come back (before_live)
                log.warning("LoRA %s: replica %s unreachable (%s); it loads the adapter when it is back", lora.name,
                            rid, e)
            self.lora_specs[lora.name] = lora
            self._runtime_loras.add(lora.name)
        log.info("LoRA %s registered on %d replica(s)", lora.name, len(loaded))
        return next(i for i in await self.loras() if i["name"] == lora.name)

    async def unregister_lora(self, name: str) -> bool:
        """Remove a runtime adapter from every replica; False when no adapter has that name. Requests already
        queued with it fail with a 400 naming ``loras``. A configured adapter (model.loras) is a ConflictError:
        the operator removes it from the config."""
        if name in self._configured_loras:
            raise ConflictError(f"adapter {name!r} is configured (model.loras) and cannot be removed at runtime; "
                                f"remove it from the config and restart", param="name")
        async with self._lora_lock:
            if self.lora_specs.pop(name, None) is None:
                return False
            self._runtime_loras.discard(name)
            self._runtime_bytes.pop(name, None)
            await asyncio.gather(*(h.call("unregister_lora", name) for h in self.replicas.values()),
                                 return_exceptions=True)
        log.info("LoRA %s removed", name)
        return True

    async def loras(self) -> list[dict]:
        """Every adapter: name, source, rank, modules, bytes, and per replica where it is (``gpu``: resident on
        the transformer's device, ``host``: in host memory, copied in for a batch that needs it)."""
        async def ask(h):
            try:
                return h.replica_id, await asyncio.wait_for(h.call("loras"), 30)
            except Exception as e:  # noqa: BLE001 - a replica down is reported, not raised
                log.debug("LoRA list of replica %s: %s", h.replica_id, e)
                return h.replica_id, None

        answers = await asyncio.gather(*(ask(h) for h in self.live()))
        out = []
        for name, spec in sorted(self.lora_specs.items()):
            entry = {"name": name, "source": spec.source, "path": shown_path(spec, self.config.model.lora_dir),
                     "model_id": spec.model_id,
                     "runtime": name in self._runtime_loras, "replicas": {}}
            for rid, infos in answers:
                info = next((i for i in infos or () if i["name"] == name), None)
                if info is None:
                    continue
                entry.update(rank=info["rank"], modules=info["modules"], bytes=info["bytes"])
                entry["replicas"][rid] = "gpu" if info["resident"] else "host"
            out.append(entry)
        return out

    async def _resync_loras(self, replica_id: str, handle: ReplicaHandle) -> None:
        """A restarted replica loaded only the configured adapters: give it the runtime ones again."""
        for name in sorted(self._runtime_loras):
            spec = self.lora_specs.get(name)
            if spec is None:
                continue
            try:
                out = await handle.call("register_lora", spec.model_dump())
            except (NotReadyError, ReplicaUnavailableError):
                raise  # not back yet: the replica set asks again
            except ZImageError as e:  # one adapter must not keep a replica out of rotation
                out = {"ok": False, "error": str(e)}
            if not out["ok"]:
                log.error("replica %s: LoRA %s no longer loads after its restart: %s", replica_id, name,
                          out["error"])

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


def _first_error(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}" if first["loc"] else first["msg"]
    return str(e)


def _first_loc(e: ValueError) -> str | None:
    errors = getattr(e, "errors", None)
    if callable(errors) and errors() and errors()[0]["loc"]:
        return str(errors()[0]["loc"][0])
    return None


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


def shown_path(spec: LoraSpec, lora_dir) -> str | None:
    """An adapter's path as clients see it: relative to ``model.lora_dir`` when inside it, a hub snapshot's path
    as given, else only the file's (or directory's) name; never where the host keeps its files."""
    from pathlib import Path

    if spec.path is None or spec.source != "local":
        return spec.path
    p = Path(spec.path)
    if not p.is_absolute():
        return p.as_posix()
    if lora_dir is not None:
        for base in (Path(lora_dir).expanduser(), Path(lora_dir).expanduser().resolve()):
            if p.is_relative_to(base):
                return p.relative_to(base).as_posix()
    return p.name
