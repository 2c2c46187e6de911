"""Every Ray call of the project lives here, behind small wrappers, so that the router and the deployment logic
are tested with fakes and the Ray-specific behaviour is in one place.

- ``connect``: join a cluster (``address``) or start a local Ray with declared (possibly logical) GPUs, never
  joining a cluster by accident (``RAY_ADDRESS``, a stale current-cluster file).
- ``live_inventory``: the nodes and GPUs of the running cluster, for the planner.
- ``RayReplica``: one replica actor in its own placement group (a bundle ``{"GPU": n}`` on one node,
  STRICT_PACK), pinned to the node the plan chose; Ray sets CUDA_VISIBLE_DEVICES, so the actor sees cuda:0..n-1.
  A pooled replica (``frontdoor.pool``) is a named, detached actor (and placement group) that outlives the front
  door that made it; later front doors attach to it by name. Its control calls have slots of their own.
- ``RayBackend``: all of the above as the ``replicas.Backend`` the deployment and its replica set are given.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.admission import AdmissionLimits
from actors.worker import IntakeSpec, PipelineWorker, WarmupSpec
from zimage_common.config import ClusterConfig
from zimage_common.errors import NotReadyError, ReplicaError, ReplicaUnavailableError
from zimage_common.logging_setup import adopt_logger, current_format, replica_env
from zimage_common.messages import Batch, BatchResult, ReplicaHealth, StepProgress

from .ray_pool import RayResultStore
from .replicas import ReplicaSpec

log = logging.getLogger(__name__)

NODE_ID_LABEL = "ray.io/node-id"
LOGICAL_GPU_MEMORY_GIB = 24.0  # what a GPU without CUDA (a logical GPU on a CPU machine) is planned as


def connect(cluster: ClusterConfig) -> None:
    """Join ``cluster.address`` or start a local Ray. Idempotent within a process."""
    if ray.is_initialized():
        return
    common = {"namespace": cluster.namespace, "logging_level": logging.WARNING, "log_to_driver": True}
    if current_format() == "json":
        adopt_logger("ray")  # Ray's own warnings as JSON lines too (it keeps the WARNING level set here)
    if cluster.address is not None:
        log.info("joining Ray cluster at %s", cluster.address)
        check_reachable(cluster.address)
        try:
            ray.init(address=cluster.address, **common)
        except ConnectionError as e:
            raise NotReadyError(f"cluster.address={cluster.address!r}: no Ray cluster to join ({e}); start one "
                                f"with 'ray start --head', or leave cluster.address out to start a local Ray") from None
    else:
        # address="local", not None: with None, ray.init joins whatever RAY_ADDRESS or the current-cluster file
        # (<ray temp dir>/ray_current_cluster, left behind by a cluster that died without `ray stop`) points at,
        # and then refuses num_cpus/num_gpus. A local start always starts its own Ray.
        # Replicas at the front door's CPU priority: Ray starts its workers 15 steps nicer than the driver (so that
        # background tasks leave the CPU to the driver), but replicas are the serving path: an interactive request's
        # encode, steps and decode would lose every core the front door wants, and a batch job's work, which
        # replicas run lower (zimage_common/cpu_priority.py), would have almost no room below them (nice 19 against
        # 15). A cluster started with `ray start` takes RAY_worker_niceness=0 in its nodes' environment instead.
        log.info("starting a local Ray (num_cpus=%s, num_gpus=%s)", cluster.num_cpus, cluster.num_gpus)
        ray.init(address="local", num_cpus=cluster.num_cpus, num_gpus=cluster.num_gpus, include_dashboard=False,
                 _system_config={"worker_niceness": 0}, **common)


REACH_TIMEOUT_S = 5.0  # a head that does not accept a connection in this long is taken as not there


def check_reachable(address: str, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """A ``host:port`` or ``ray://host:port`` address must accept a TCP connection before Ray is asked to join it:
    ``ray.init`` retries an absent head for about a minute, printing only its own warnings. ``auto`` (and anything
    without a port) is left to Ray."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    bare_ipv6 = ":" in host and not (host.startswith("[") and host.endswith("]"))  # '::1': no port to check
    if not sep or not port.isdigit() or not host or bare_ipv6:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except socket.gaierror as e:
        raise NotReadyError(f"cluster.address={address!r}: the host {host} does not resolve ({e.strerror})") from None
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise NotReadyError(f"cluster.address={address!r}: nothing answers at {host}:{port} ({reason}); start a "
                            f"head there with 'ray start --head', or leave cluster.address out to start a local "
                            f"Ray") from None


def node_alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n.get("Alive") for n in ray.nodes())


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


@dataclass(frozen=True)
class RayNode:
    name: str
    node_id: str
    gpus: int


def live_nodes() -> list[RayNode]:
    """Alive nodes with at least one GPU (logical or real), named ``<ip>/<node-id prefix>``."""
    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        gpus = int(n.get("Resources", {}).get("GPU", 0))
        if gpus:
            out.append(RayNode(f"{n['NodeManagerAddress']}/{n['NodeID'][:6]}", n["NodeID"], gpus))
    return sorted(out, key=lambda n: n.name)


async def wait_for_gpus(n: int, timeout_s: float, poll_s: float = 2.0) -> list[RayNode]:
    """The live GPU nodes once they hold at least ``n`` GPUs in all (nodes join after the head: KubeRay worker
    pods, ``ray start --address`` elsewhere). Raises NotReadyError naming what joined if ``timeout_s`` passes."""
    import time

    deadline = time.monotonic() + timeout_s
    seen = None
    while True:
        nodes = live_nodes()
        have = sum(node.gpus for node in nodes)
        if have >= n:
            return nodes
        if have != seen:
            log.info("waiting for GPUs (cluster.wait_for_gpus): %d of %d on %d node(s)", have, n, len(nodes))
            seen = have
        if time.monotonic() >= deadline:
            raise NotReadyError(f"only {have} of {n} GPUs (cluster.wait_for_gpus) joined the Ray cluster within "
                                f"{timeout_s:.0f}s (cluster.wait_timeout_s): "
                                f"{[f'{x.name}: {x.gpus}' for x in nodes] or 'no GPU nodes'}")
        await asyncio.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


@ray.remote(num_cpus=0)
def _probe_gpu_memory() -> float | None:
    """Total memory of the GPU Ray gave this task, in GiB, as CUDA reports it (None: no CUDA here)."""
    mem = _nvml_memory_gib(ray.get_gpu_ids())
    if mem is not None:
        return mem
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / 1024**3
    except Exception:  # noqa: BLE001 - a node without torch/CUDA is planned as logical
        pass
    return None


def _nvml_memory_gib(gpu_ids: list) -> float | None:
    """The first of ``gpu_ids`` (Ray's: indices, or UUIDs) through NVML: its total memory less what the driver
    reserves, which is CUDA's total (79.18 GiB both ways on an H100 80GB HBM3). About 1 s, against 5 s to import
    torch and make a CUDA context for the same number (H100, docs/benchmarks-history.md). None where NVML cannot
    answer."""
    if not gpu_ids:
        return None
    try:
        import ray._private.thirdparty.pynvml as nvml  # the copy Ray itself uses to count GPUs

        nvml.nvmlInit()
        try:
            gpu = str(gpu_ids[0])
            handle = (nvml.nvmlDeviceGetHandleByUUID(gpu) if gpu.startswith(("GPU-", "MIG-"))
                      else nvml.nvmlDeviceGetHandleByIndex(int(gpu)))
            info = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
            return (info.total - info.reserved) / 1024**3
        finally:
            nvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver, an old NVML, a vendored copy gone: torch answers instead
        return None


def probe_gpu_memory_gib(node: RayNode, timeout_s: float = 120.0) -> float:
    """Total memory of one GPU of ``node``; logical GPUs (no CUDA) count as LOGICAL_GPU_MEMORY_GIB. The driver's
    own node answers through NVML here (the inventory took 0.0 s on an H100); any other node, or one NVML
    cannot answer for, through a task on one of its GPUs (0.5-1.5 s on an H100)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if node.node_id == _driver_node_id():
        mem = _nvml_memory_gib([_first_visible_gpu()])
        if mem is not None:
            return mem
    ref = _probe_gpu_memory.options(
        num_gpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)
    ).remote()
    try:
        mem = ray.get(ref, timeout=timeout_s)
    except GetTimeoutError:
        ray.cancel(ref, force=True)
        raise NotReadyError(f"could not probe GPU memory on {node.name} within {timeout_s:.0f}s (GPUs busy?); "
                            f"set cluster.gpu_memory_gib") from None
    return mem if mem is not None else LOGICAL_GPU_MEMORY_GIB


def _driver_node_id() -> str | None:
    """The node this driver runs on (None where Ray cannot say, e.g. through Ray Client)."""
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - then every node is probed with a task
        return None


def _first_visible_gpu() -> str:
    """The first GPU this process may use, as Ray would give one to a task here: the first entry of
    CUDA_VISIBLE_DEVICES (an index or a UUID) where it is set, else GPU 0."""
    import os

    visible = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return visible[0] if visible else "0"


class EncoderUnavailable(ReplicaUnavailableError):
    """The replica whose text encoder this one borrows is gone: its batch is retried elsewhere."""


class RemoteEncoder:
    """The callable a replica without its own text encoder uses to borrow the shared one (another replica's
    actor). Picklable: it travels to the borrowing actor. Waits out a restart of the host for ``wait_s``."""

    def __init__(self, actor, host_id: str, wait_s: float = 60.0):
        self.actor = actor
        self.host_id = host_id
        self.wait_s = wait_s

    def __call__(self, prompts, negative_prompts, guidance):
        import time

        from zimage_common.cpu_priority import WORK_PRIORITY

        priority = WORK_PRIORITY.get()  # the borrowing call's: the host queues it as its own work of that priority
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                return ray.get(self.actor.encode.remote(prompts, negative_prompts, guidance, priority))
            except (RayActorError, RayTaskError) as e:
                if time.monotonic() > deadline:
                    raise EncoderUnavailable(f"shared text encoder on {self.host_id} unavailable: "
                                             f"{_first_line(e)}") from None
                time.sleep(0.5)


CONTROL = "control"  # a pooled replica's concurrency group for control calls
# Calls that must answer while batches fill every other slot (several front doors' batches, waiting at the gate).
CONTROL_METHODS = frozenset({"start", "health", "check", "pid", "cancel", "queue_len", "queue_lens", "intake_stats",
                             "loras", "register_lora", "unregister_lora", "inject_fault", "loop_stats"})


def replica_name(deployment_id: str, replica_id: str) -> str:
    return f"zimage-{deployment_id}-{replica_id}"


class RayReplica:
    """A replica actor plus its placement group, satisfying the router's ``Replica`` protocol. With ``namespace``
    (a pool), the actor is detached and named there, the placement group detached too, and an actor of that name
    that exists already is attached to instead of created: ``close`` then leaves it running."""

    def __init__(self, replica_id: str, node: RayNode, n_gpus: int, cpus: float, max_pixels: int,
                 max_batch_tokens: int, worker_kwargs: dict, max_restarts: int = -1, max_concurrency: int = 2,
                 deployment_id: str = "", namespace: str | None = None, control_slots: int = 0):
        self.replica_id = replica_id
        self.node = node
        self.max_pixels = max_pixels
        self.max_batch_tokens = max_batch_tokens
        self.pooled = namespace is not None
        self._pg = None
        name = replica_name(deployment_id, replica_id)
        if self.pooled:
            try:
                self.actor = ray.get_actor(name, namespace=namespace)
                self.attached = True
                return
            except ValueError:
                pass
        self.attached = False
        if self.pooled:
            try:  # left by a creator that died before its actor was made: reserving it again would double it
                self._pg = ray.util.get_placement_group(name)
            except ValueError:
                pass
        if self._pg is None:
            self._pg = placement_group(
                [{"GPU": n_gpus, "CPU": cpus}] if cpus else [{"GPU": n_gpus}],
                strategy="STRICT_PACK",
                name=name,
                bundle_label_selector=[{NODE_ID_LABEL: node.node_id}],
                **({"lifetime": "detached"} if self.pooled else {}),
            )
        actor_cls = ray.remote(concurrency_groups={CONTROL: control_slots})(PipelineWorker) if self.pooled \
            else ray.remote(PipelineWorker)
        pool_opts = {"namespace": namespace, "lifetime": "detached", "get_if_exists": True} if self.pooled else {}
        self.actor = actor_cls.options(
            **pool_opts,
            name=name,
            num_gpus=n_gpus,
            num_cpus=cpus,
            max_restarts=max_restarts,
            max_task_retries=0,  # the router re-dispatches; Ray must not run a batch twice on its own
            max_concurrency=max_concurrency,  # in-flight batches + health checks, none queued behind another
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=0),
            # No progress bars from the first import on; log lines in the driver's format, naming the replica. Set by
            # the actor itself before it imports anything, not as a runtime_env: an actor with a runtime_env of its
            # own needs a new worker process, one without may take a worker Ray started ahead (saves the process's
            # start and Ray's import).
        ).remote(replica_id=replica_id, env=replica_env(), **worker_kwargs)

    def _method(self, name: str):
        method = getattr(self.actor, name)
        return method.options(concurrency_group=CONTROL) if self.pooled and name in CONTROL_METHODS else method

    async def start(self, timeout_s: float) -> ReplicaHealth:
        try:
            return await asyncio.wait_for(_await(self._method("start").remote()), timeout_s)
        except asyncio.TimeoutError:
            raise NotReadyError(f"replica {self.replica_id} did not become ready within {timeout_s:.0f}s "
                                f"(is a GPU free on {self.node.name}?)") from None

    async def run(self, batch: Batch, on_progress=None) -> BatchResult:
        if on_progress is None:
            return await _await(self.actor.run_batch.remote(batch))
        stream = self.actor.run_batch_stream.options(num_returns="streaming").remote(batch)
        result = None
        try:
            async for ref in stream:
                item = await _await(ref)
                if isinstance(item, StepProgress):
                    on_progress(item)
                else:
                    result = item
        except (RayActorError, RayTaskError) as e:
            raise ReplicaUnavailableError(_first_line(e)) from None
        if result is None:
            raise ReplicaError(f"replica {self.replica_id} ended batch {batch.batch_id} without a result")
        return result

    async def cancel(self, request_ids: list[str]) -> int:
        """Step-level batching: these requests leave the replica's step loop at its next step."""
        return await self.call("cancel", request_ids)

    async def health(self) -> ReplicaHealth:
        return await _await(self._method("health").remote())

    async def queue_len(self) -> int:
        """Samples waiting at the replica's gate and inside it, from every front door (``actors/admission.py``)."""
        return await self.call("queue_len")

    async def queue_lens(self) -> tuple[int, int]:
        """(interactive samples, all samples) waiting at the replica's gate and inside it, from every front door."""
        interactive, total = await self.call("queue_lens")
        return interactive, total

    async def check(self) -> float:
        """The replica's health check (a real small forward on every device)."""
        return await self.call("check")

    async def call(self, method: str, *args, **kwargs):
        return await _await(self._method(method).remote(*args, **kwargs))

    def kill(self, no_restart: bool = False) -> None:
        ray.kill(self.actor, no_restart=no_restart)

    def close(self) -> None:
        """End the replica for good; a pooled one stays for the pool's other front doors (``pool down`` ends it)."""
        if self.pooled:
            return
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        try:
            remove_placement_group(self._pg)
        except Exception:  # noqa: BLE001
            pass


class RayBackend:
    """The Ray cluster as the deployment's ``replicas.Backend``."""

    def connect(self, cluster: ClusterConfig) -> None:
        connect(cluster)

    def live_nodes(self) -> list[RayNode]:
        return live_nodes()

    async def wait_for_gpus(self, n: int, timeout_s: float) -> list[RayNode]:
        return await wait_for_gpus(n, timeout_s)

    def probe_gpu_memory_gib(self, node: RayNode) -> float:
        return probe_gpu_memory_gib(node)

    def node_alive(self, node_id: str) -> bool:
        return node_alive(node_id)

    def make_replica(self, spec: ReplicaSpec, encoder_host: RayReplica | None = None) -> RayReplica:
        warmup = None
        if spec.warmup_sizes is not None:
            warmup = WarmupSpec(spec.warmup_sizes, spec.warmup_steps, spec.max_pixels, spec.max_batch_tokens,
                                spec.max_batch_size or WarmupSpec.max_batch_size)
        encoder = None
        if encoder_host is not None:
            encoder = RemoteEncoder(encoder_host.actor, encoder_host.replica_id)
        intake = IntakeSpec(AdmissionLimits(*spec.admission) if spec.admission else AdmissionLimits(),
                            spec.encode_threads)
        results = RayResultStore(*spec.results_store) if spec.results_store else None
        return RayReplica(
            spec.replica_id, spec.node, spec.n_gpus, spec.cpus, spec.max_pixels, spec.max_batch_tokens,
            worker_kwargs=dict(model=spec.model, device_map=spec.device_map, warmup=warmup,
                               torch_threads=spec.torch_threads, memory_fraction=spec.memory_fraction,
                               encoder=encoder, max_batch_tokens=spec.max_batch_tokens,
                               max_batch_size=spec.max_batch_size or None, intake=intake, results=results),
            max_concurrency=spec.max_concurrency,
            deployment_id=spec.deployment_id,
            namespace=spec.namespace,
            control_slots=spec.control_slots,
        )

    # ---- a pool shared by several front doors (ray_pool.py) --------------------------------------------------
    def pool_registry(self, namespace: str):
        from .ray_pool import RayPoolRegistry

        return RayPoolRegistry(namespace)

    def idempotency_address(self, namespace: str | None, deployment_id: str) -> tuple[str, str]:
        """(namespace, actor name) of the Idempotency-Key store: a pool's, in its namespace, shared by its front
        doors; else this front door's own."""
        from .ray_pool import STORE

        if namespace is not None:
            return namespace, STORE
        return ray.get_runtime_context().namespace, f"zimage-{deployment_id}-idempotency"

    def idempotency_client(self, address: tuple[str, str], deployment_id: str, pool: str | None, cfg):
        """The front door's client of the store, making its actor on first use (detached for a pool)."""
        from .ray_pool import RayIdempotency, store_actor

        ns, name = address
        actor = store_actor(ns, name, replica_name(deployment_id, ""), CONTROL if pool else None, pool is not None,
                            cfg.ttl_s, cfg.max_entries, cfg.max_bytes, cfg.claim_lease_s)
        return RayIdempotency(actor)

    def close_idempotency(self, client) -> None:
        try:
            ray.kill(client.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


async def _await(ref):
    """Await an actor call, translating Ray's exceptions into the project's."""
    try:
        return await ref
    except RayActorError as e:
        raise ReplicaUnavailableError(_first_line(e)) from None
    except RayTaskError as e:
        raise ReplicaError(_first_line(e)) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


__all__ = ["RayBackend", "RayReplica", "WarmupSpec", "connect", "live_nodes", "probe_gpu_memory_gib", "shutdown"]
