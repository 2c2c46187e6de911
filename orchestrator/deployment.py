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
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence

from placement import DeploymentSpec, Inventory, PlacementPlan, model_spec, plan, plan_best

from .config import Config, ModelConfig
from .errors import NotReadyError, ZImageError
from .messages import ImageRequest, ImageResult, ReplicaHealth
from .requests import build_requests, parse_size
from .router import Router, RouterObserver

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
        pipeline_stages=d.pipeline_stages,
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
    text_encoder = ["none", "int8"] if m.text_encoder_quantization == "auto" else [m.text_encoder_quantization]
    options = [model_spec(m.source, m.dtype, t, te) for te in text_encoder for t in transformer]
    if len(options) == 1:
        return plan(options[0], inventory, deployment_spec(config))
    return plan_best(options, inventory, deployment_spec(config))


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


class Deployment:
    """A running deployment. Also the router's replica pool: it knows which replicas are live."""

    def __init__(self, config: Config):
        self.config = config
        self.plan: PlacementPlan | None = None
        self.replicas: dict[str, object] = {}
        self._down: set[str] = set()
        self._restarts: dict[str, asyncio.Task] = {}
        self._health_task: asyncio.Task | None = None
        self.events: list[tuple[float, str, str]] = []  # (time, replica, what happened): faults and recoveries
        self.router: Router | None = None
        self.observer: RouterObserver = RouterObserver()
        self.health: dict[str, ReplicaHealth] = {}
        self.started_at = time.time()
        # Ray names (actors, placement groups) carry this, so deployments sharing a namespace never collide.
        self.deployment_id = uuid.uuid4().hex[:8]
        self.ready = False

    # ---- start / stop ----------------------------------------------------------------------------------
    @classmethod
    async def start(cls, config: Config, observer: RouterObserver | None = None,
                    on_replica_ready: Callable[[ReplicaHealth], None] | None = None) -> "Deployment":
        self = cls(config)
        self.observer = observer or RouterObserver()
        await self._start(self.observer, on_replica_ready)
        return self

    async def _start(self, observer, on_replica_ready) -> None:
        from actors.worker import WarmupSpec

        from . import ray_backend as rb

        cfg = self.config
        declared = declared_inventory(cfg)
        if declared is not None:
            plan_for(cfg, declared)  # fail on an impossible config before touching Ray or a GPU
        rb.connect(cfg.cluster)
        if cfg.cluster.wait_for_gpus:
            nodes = await rb.wait_for_gpus(cfg.cluster.wait_for_gpus, cfg.cluster.wait_timeout_s)
        else:
            nodes = rb.live_nodes()
        if not nodes:
            raise NotReadyError("the Ray cluster has no GPUs (declare cluster.num_gpus for a local Ray, or join "
                                "a cluster whose nodes have GPUs)")
        mem = {}
        for node in nodes:
            mem[node.name] = cfg.cluster.gpu_memory_gib or await asyncio.to_thread(rb.probe_gpu_memory_gib, node)
        inventory = Inventory.from_nodes([(n.name, n.gpus, mem[n.name]) for n in nodes])
        self.plan = plan_for(cfg, inventory)
        by_name = {n.name: n for n in nodes}
        d = cfg.deployment
        sizes = [(cfg.defaults.width, cfg.defaults.height)]
        sizes += [s for s in (parse_size(x, cfg.defaults) for x in d.warmup_sizes) if s not in sizes]
        borrowers = {}
        for rp in self.plan.replicas:
            if rp.encoder_replica:
                borrowers[rp.encoder_replica] = borrowers.get(rp.encoder_replica, 0) + 1
        for rp in self.plan.replicas:  # hosts of a shared text encoder come before the replicas that borrow it
            fraction = None
            if d.gpu_memory_limit_gib is not None:
                fraction = d.gpu_memory_limit_gib / mem[rp.node]
            encoder = None
            if rp.encoder_replica:
                encoder = rb.RemoteEncoder(self.replicas[rp.encoder_replica].actor, rp.encoder_replica)
            self.replicas[rp.replica_id] = rb.RayReplica(
                rp.replica_id, by_name[rp.node], len(rp.gpus), d.cpu_per_replica, rp.max_pixels,
                rp.max_batch_tokens,
                worker_kwargs=dict(model=model_for_plan(cfg.model, self.plan), device_map=rp.device_map,
                                   warmup=WarmupSpec(tuple(sizes), min(2, cfg.defaults.num_inference_steps),
                                                     rp.max_pixels, rp.max_batch_tokens) if d.warmup else None,
                                   torch_threads=d.torch_threads, memory_fraction=fraction,
                                   pipeline_stages=d.pipeline_stages, encoder=encoder),
                max_concurrency=d.max_inflight_batches + 1 + borrowers.get(rp.replica_id, 0),
                deployment_id=self.deployment_id,
            )
        log.info("placing %d replica(s): %s", len(self.replicas),
                 ", ".join(f"{r.replica_id}@{r.node}:{list(r.gpus)}" for r in self.plan.replicas))

        async def start_one(rid, replica):
            h = await replica.start(d.start_timeout_s)
            self.health[rid] = h
            if on_replica_ready:
                on_replica_ready(h)

        # Replicas that host a shared text encoder warm up first: the ones borrowing it encode through them.
        borrowing = {rp.replica_id for rp in self.plan.replicas if rp.encoder_replica}
        try:
            for phase in (False, True):
                await asyncio.gather(*(start_one(rid, r) for rid, r in self.replicas.items()
                                       if (rid in borrowing) == phase))
        except BaseException:
            await self.shutdown()
            raise
        self.router = Router(self, cfg.router, observer=observer, max_inflight_batches=d.max_inflight_batches)
        self.router.start()
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop())
        self.ready = True

    async def shutdown(self, drain_timeout_s: float | None = 0) -> None:
        """Stop the router (after draining for up to ``drain_timeout_s``), then remove every actor."""
        self.ready = False
        for t in [*self._restarts.values(), self._health_task]:
            if t is not None:
                t.cancel()
        if self.router is not None:
            if drain_timeout_s:
                await self.router.drain(drain_timeout_s)
            await self.router.stop()
        for r in self.replicas.values():
            r.close()

    async def __aenter__(self) -> "Deployment":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.shutdown()

    # ---- the router's replica pool ---------------------------------------------------------------------
    def live(self):
        return [r for rid, r in self.replicas.items() if rid not in self._down]

    def members(self):
        return list(self.replicas.values())

    def report_failure(self, replica_id: str, error: BaseException) -> None:
        """A replica died or hung: take it out of rotation, recycle it if it hung, and bring it back once Ray has
        restarted it (or drop it if its node is gone)."""
        from .errors import ReplicaHungError

        if replica_id in self._down or replica_id not in self.replicas:
            return
        hung = isinstance(error, ReplicaHungError)
        log.warning("replica %s is %s (%s); %s", replica_id, "hung" if hung else "down", error,
                    "recycling it" if hung else "waiting for Ray to restart it")
        self._event(replica_id, f"{'hung' if hung else 'lost'}: {error}")
        self._down.add(replica_id)
        if hung:
            self.replicas[replica_id].kill(no_restart=False)  # Ray restarts the process fresh
        self._restarts[replica_id] = asyncio.get_running_loop().create_task(self._recover(replica_id))

    def _event(self, replica_id: str, what: str) -> None:
        self.events.append((time.time(), replica_id, what))
        self.observer.replica_event(replica_id, what.split(":")[0])

    async def _health_loop(self) -> None:
        from .errors import ReplicaHungError

        d = self.config.deployment
        while True:
            await asyncio.sleep(d.health_interval_s)
            for rid, replica in list(self.replicas.items()):
                if rid in self._down:
                    continue
                try:
                    await asyncio.wait_for(replica.call("check"), d.health_timeout_s)
                except asyncio.TimeoutError:
                    self.report_failure(rid, ReplicaHungError(f"health check took over {d.health_timeout_s:.0f}s"))
                except Exception as e:  # noqa: BLE001
                    self.report_failure(rid, ReplicaHungError(f"health check failed: {e}"))

    def _drop(self, replica_id: str, reason: str) -> None:
        """Remove a replica for good (its node is gone) and log the plan for the survivors."""
        replica = self.replicas.pop(replica_id)
        self._down.discard(replica_id)
        replica.close()
        if self.plan is not None:  # the plan for the survivors: the lost replica and its GPUs leave it
            from dataclasses import replace

            lost = next((r for r in self.plan.replicas if r.replica_id == replica_id), None)
            gone = {(lost.node, g) for g in lost.gpus} if lost else set()
            self.plan = replace(
                self.plan,
                replicas=tuple(r for r in self.plan.replicas if r.replica_id != replica_id),
                gpus=tuple(g for g in self.plan.gpus if (g.node, g.gpu) not in gone),
                notes=(*self.plan.notes, f"{replica_id} dropped: {reason}"),
            )
        self._event(replica_id, f"dropped: {reason}")
        log.error("replica %s dropped: %s; serving with %d replica(s): %s", replica_id, reason,
                  len(self.replicas), sorted(self.replicas))
        if self.router is not None:
            self.router.wake()

    async def _recover(self, replica_id: str) -> None:
        from . import ray_backend as rb
        from .errors import ReplicaUnavailableError

        replica = self.replicas[replica_id]
        # Every path here follows a process death or a kill (which Ray carries out asynchronously): only a
        # new process counts as back, never the old one answering before it goes.
        old = self.health.get(replica_id)
        old_pid = old.pid if old is not None else None
        same_process_since = None
        deadline = time.monotonic() + self.config.deployment.start_timeout_s
        while time.monotonic() < deadline:
            if not rb.node_alive(replica.node.node_id):
                self._restarts.pop(replica_id, None)
                self._drop(replica_id, f"its node {replica.node.name} left the cluster")
                return
            try:
                # Short waits, so a lost node is noticed; start() is idempotent, so asking again is safe.
                self.health[replica_id] = await replica.start(min(20.0, self.config.deployment.start_timeout_s))
            except (ReplicaUnavailableError, NotReadyError) as e:
                log.debug("replica %s not back yet: %s", replica_id, e)
                await asyncio.sleep(0.5)
                continue
            except ZImageError as e:
                log.error("replica %s failed to restart: %s", replica_id, e)
                break
            if old_pid is not None and self.health[replica_id].pid == old_pid:
                # The old process still answers: a kill not yet carried out, or an error that was transient
                # after all. Give a kill 10 s to land; after that, the replica never went away.
                same_process_since = same_process_since or time.monotonic()
                if time.monotonic() - same_process_since < 10.0:
                    await asyncio.sleep(0.5)
                    continue
            log.info("replica %s is back", replica_id)
            self._event(replica_id, "back")
            self._down.discard(replica_id)
            self._restarts.pop(replica_id, None)
            if self.router is not None:
                self.router.wake()
            return
        log.error("replica %s did not come back within deployment.start_timeout_s", replica_id)

    # ---- generation ------------------------------------------------------------------------------------
    @property
    def max_side(self) -> int | None:
        """The longest image side every replica's model can place (its transformer's position table), as the
        replicas reported it at start-up; None when none reported one."""
        sides = [h.max_side for h in self.health.values() if h.max_side]
        return min(sides) if sides else None

    def requests_for(self, prompt: str, **params) -> list[ImageRequest]:
        return build_requests(prompt, defaults=self.config.defaults, limits=self.config.limits,
                              max_side=self.max_side, **params)

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
        num_inference_steps, guidance_scale, seed, negative_prompt. Results come back in prompt order; a failed
        request is a result with ``ok=False`` and its reason."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        requests = [r for p in prompts for r in self.requests_for(p, **params)]
        return list(await asyncio.gather(*self.admit(requests)))

    async def replica_health(self) -> dict[str, ReplicaHealth | str]:
        out: dict[str, ReplicaHealth | str] = {}
        for rid, r in self.replicas.items():
            if rid in self._down:
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

    def close(self) -> None:
        try:
            self._call(self.deployment.shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> "ZImageClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
