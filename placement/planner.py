"""``plan(model, inventory, deployment) -> PlacementPlan``: deterministic, pure, and loud when nothing fits.

- ``replicate``: one whole pipeline per GPU; ``split``: each replica holds ``gpus_per_replica`` GPUs of one node,
  components placed by its device map;
- ``auto``: a whole pipeline on every GPU that holds one; a GPU that holds only transformer + VAE borrows the text
  encoder of a whole pipeline on its node; the rest paired into split replicas;
- ``shared-encoder``: on each node the first GPU holds a whole pipeline whose text encoder also serves the node's
  other GPUs, which hold transformer + VAE only (7.3 GiB more each for batches and sizes).

Ties are broken by node name, then GPU index. Every plan says, per replica, the largest batch and image it can
serve, and the router never sends a replica more."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .memory import ModelSpec, relative_throughput, sample_tokens

COMPONENTS = ("text_encoder", "transformer", "vae")


class PlacementError(ValueError):
    """Nothing fits, or the request contradicts the inventory. The message carries the numbers."""


@dataclass(frozen=True)
class GPU:
    node: str
    index: int
    memory_gib: float

    @property
    def label(self) -> str:
        return f"{self.node}:{self.index}"


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[GPU, ...]

    @classmethod
    def from_nodes(cls, nodes: list[tuple[str, int, float]]) -> Inventory:
        return cls(tuple(GPU(name, i, mem) for name, n, mem in nodes for i in range(n)))

    def by_node(self) -> dict[str, list[GPU]]:
        out: dict[str, list[GPU]] = {}
        for g in sorted(self.gpus, key=lambda g: (g.node, g.index)):
            out.setdefault(g.node, []).append(g)
        return out


@dataclass(frozen=True)
class DeploymentSpec:
    mode: Literal["replicate", "split", "auto", "shared-encoder"] = "replicate"
    replicas: int | None = None
    gpus_per_replica: int = 1
    device_map: dict[str, int] | None = None
    width: int = 1024
    height: int = 1024
    max_batch_size: int = 16  # most images in one batch (the router's cap)
    max_batch_tokens: int | None = None  # the router's token budget (None: memory alone decides)
    headroom_gib: float = 0.5  # CUDA context and allocator slack kept free on every GPU


@dataclass(frozen=True)
class ReplicaPlan:
    replica_id: str
    node: str
    gpus: tuple[int, ...]  # GPU indices on the node, in replica-local order (cuda:0, cuda:1, ...)
    device_map: dict[str, int]  # component -> replica-local GPU index
    max_batch_size: int  # images of the deployment's target size in one batch
    max_pixels: int  # largest single image
    max_batch_tokens: int  # most tokens in one packed batch (memory, and the router's budget if lower)
    encoder_replica: str | None = None  # the replica whose text encoder this one borrows (shared-encoder mode)
    encoder_gpu: tuple[str, int] | None = None  # where that text encoder lives

    @property
    def components(self) -> dict[str, dict[str, object]]:
        out: dict[str, dict[str, object]] = {c: {"node": self.node, "gpu": self.gpus[i]}
                                             for c, i in self.device_map.items()}
        if self.encoder_gpu is not None:
            out["text_encoder"] = {"node": self.encoder_gpu[0], "gpu": self.encoder_gpu[1],
                                   "shared_from": self.encoder_replica}
        return out


@dataclass(frozen=True)
class GPUPlan:
    node: str
    gpu: int
    capacity_gib: float
    components: tuple[str, ...]  # "r0.transformer", ...
    estimated_peak_gib: float  # serving: weights and a full batch's activations
    load_peak_gib: float = 0.0  # starting: base-dtype weights before quantization (see ModelSpec.load_peak_gib)


@dataclass(frozen=True)
class PlacementPlan:
    mode: str
    model: str
    width: int
    height: int
    replicas: tuple[ReplicaPlan, ...]
    gpus: tuple[GPUPlan, ...]
    notes: tuple[str, ...] = field(default=())
    precisions: tuple[tuple[str, str], ...] = ()  # component -> weight precision of every replica
    lora_gib: float = 0.0  # per-request LoRA adapters counted on each replica's transformer GPU

    @property
    def relative_throughput(self) -> float:
        """Estimated throughput at the target size, in bf16 replicas running full batches (for comparing plans)."""
        transformer = dict(self.precisions).get("transformer", "bfloat16")
        return round(sum(relative_throughput(transformer, r.max_batch_size) for r in self.replicas), 3)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "model": self.model,
            "target_size": f"{self.width}x{self.height}",
            "replicas": [
                {
                    "replica_id": r.replica_id,
                    "node": r.node,
                    "gpus": list(r.gpus),
                    "device_map": dict(r.device_map),
                    "components": r.components,
                    "max_batch_size": r.max_batch_size,
                    "max_pixels": r.max_pixels,
                    "max_batch_tokens": r.max_batch_tokens,
                    "encoder_replica": r.encoder_replica,
                }
                for r in self.replicas
            ],
            "gpus": [
                {
                    "node": g.node,
                    "gpu": g.gpu,
                    "capacity_gib": round(g.capacity_gib, 2),
                    "components": list(g.components),
                    "estimated_peak_gib": round(g.estimated_peak_gib, 2),
                    "load_peak_gib": round(g.load_peak_gib, 2),
                }
                for g in self.gpus
            ],
            "notes": list(self.notes),
            "precisions": dict(self.precisions),
            "relative_throughput": self.relative_throughput,
            "lora_gib_per_replica": round(self.lora_gib, 3),
        }


def plan_best(options: list[ModelSpec], inventory: Inventory, deployment: DeploymentSpec) -> PlacementPlan:
    """Plan with each of ``options`` (the same model at different precisions; the first is the unquantized one)
    and keep the plan with the most estimated throughput (``PlacementPlan.relative_throughput``); ties go to the
    earlier option, so quantization is chosen only when it buys something. The plan's notes say why."""
    from dataclasses import replace

    tried, errors = [], []
    for spec in options:
        try:
            tried.append((spec, plan(spec, inventory, deployment)))
        except PlacementError as e:
            errors.append((spec, str(e)))
    if not tried:
        raise PlacementError("; ".join(f"[{_precision_text(s)}] {e}" for s, e in errors))
    best_spec, best = max(tried, key=lambda sp: sp[1].relative_throughput)  # max keeps the first of equals
    why = [f"precision chosen: {_precision_text(best_spec)}, estimated {best.relative_throughput:g} bf16-replica "
           f"equivalents at {deployment.width}x{deployment.height}"]
    for spec, p in tried:
        if spec is not best_spec:
            why.append(f"  vs {_precision_text(spec)}: {p.relative_throughput:g} "
                       f"(batches {[r.max_batch_size for r in p.replicas]})")
    why += [f"  vs {_precision_text(s)}: does not fit ({e[:120]})" for s, e in errors]
    return replace(best, notes=best.notes + tuple(why))


def _precision_text(spec: ModelSpec) -> str:
    q = dict(spec.quantized)
    return ", ".join(f"{c} {q.get(c, spec.dtype)}" for c in ("transformer", "text_encoder"))


def default_device_map(gpus_per_replica: int) -> dict[str, int]:
    if gpus_per_replica == 1:
        return dict.fromkeys(COMPONENTS, 0)
    if gpus_per_replica == 2:
        return {"text_encoder": 0, "transformer": 1, "vae": 1}
    return {"text_encoder": 0, "transformer": 1, "vae": 2}


# ---- the planner ----------------------------------------------------------------------------------------------
def plan(model: ModelSpec, inventory: Inventory, deployment: DeploymentSpec) -> PlacementPlan:
    d = deployment
    if d.width <= 0 or d.height <= 0:
        raise PlacementError(f"target size must be positive, got {d.width}x{d.height}")
    if not inventory.gpus:
        raise PlacementError("the inventory has no GPUs: declare cluster.num_gpus (local Ray) or cluster.nodes")
    pixels = d.width * d.height
    groups_of = {"replicate": _replicate_groups, "split": _split_groups, "auto": _auto_groups,
                 "shared-encoder": _shared_encoder_groups}
    if d.mode not in groups_of:
        raise PlacementError(f"unknown deployment.mode {d.mode!r}; use one of {', '.join(groups_of)}")
    groups = groups_of[d.mode](model, inventory, d, pixels)
    if d.replicas is not None:  # (shared-encoder lists each host before the replicas borrowing from it)
        if len(groups) < d.replicas:
            raise PlacementError(
                f"deployment.replicas = {d.replicas} but only {len(groups)} replica(s) fit this inventory in mode "
                f"{d.mode!r} at {d.width}x{d.height} ({_inventory_summary(inventory)}); lower replicas or add GPUs"
            )
        groups = groups[: d.replicas]
    return _assemble(model, inventory, d, pixels, groups)


def _need(model: ModelSpec, names, pixels: int, size: tuple[int, int] | None = None) -> float:
    """What a device holding ``names`` needs over its life at batch 1: the larger of its serving and start-up
    peaks."""
    return max(model.peak_gib(names, pixels, 1, size), model.load_peak_gib(names))


def _fits(model: ModelSpec, names, gpu: GPU, pixels: int, d: DeploymentSpec) -> bool:
    return _need(model, names, pixels, (d.width, d.height)) <= gpu.memory_gib - d.headroom_gib


def _need_text(model: ModelSpec, names, pixels: int, d: DeploymentSpec) -> str:
    return (f"{_need(model, names, pixels, (d.width, d.height)):.1f} GiB at {d.width}x{d.height} batch 1 "
            f"(+{d.headroom_gib:g} GiB headroom)")


def _budget(model: ModelSpec, names, cap: float, pixels: int, per_image: int, most: int) -> tuple[int, int]:
    """(packed tokens, images) a device of ``cap`` GiB holding ``names`` runs in one batch: the text encoder's
    activations grow with the batch's prompts, so the largest batch whose own prompts leave room for its tokens."""
    for b in range(most, 0, -1):
        tokens = model.max_batch_tokens(names, cap, pixels, b)
        if tokens >= b * per_image:
            return tokens, b
    return model.max_batch_tokens(names, cap, pixels, 1), 1


def _by_size(inventory: Inventory) -> list[GPU]:
    """The GPUs, largest first (ties by node name, then index)."""
    return sorted(inventory.gpus, key=lambda g: (-g.memory_gib, g.node, g.index))


def _largest_text(inventory: Inventory) -> str:
    big = _by_size(inventory)[0]
    return f"the largest GPU is {big.label} with {big.memory_gib:.1f} GiB"


def _inventory_summary(inventory: Inventory) -> str:
    parts = [f"{node}: {len(gs)} GPU(s) of {', '.join(sorted({f'{g.memory_gib:g}' for g in gs}))} GiB"
             for node, gs in inventory.by_node().items()]
    return "; ".join(parts)


def _replicate_groups(model, inventory, d, pixels):
    groups = []
    for node, gpus in inventory.by_node().items():
        for g in gpus:
            if _fits(model, COMPONENTS, g, pixels, d):
                groups.append((node, (g,), dict.fromkeys(COMPONENTS, 0)))
    if not groups:
        raise PlacementError(f"the whole pipeline needs {_need_text(model, COMPONENTS, pixels, d)}; "
                             f"{_largest_text(inventory)}. Use mode 'split' or 'auto', or a smaller default size")
    return groups


def _split_groups(model, inventory, d, pixels):
    dmap = d.device_map or default_device_map(d.gpus_per_replica)
    n = d.gpus_per_replica
    groups = []
    for node, gpus in inventory.by_node().items():
        for start in range(0, len(gpus) - n + 1, n):
            chunk = tuple(gpus[start : start + n])
            problem = _split_problem(model, chunk, dmap, pixels, d)
            if problem is None:
                groups.append((node, chunk, dict(dmap)))
    if not groups:
        largest = max(inventory.by_node().values(), key=len)
        if len(largest) < n:
            raise PlacementError(
                f"split replicas need {n} GPUs on one node; the largest node has {len(largest)}; lower "
                f"gpus_per_replica or use nodes with more GPUs"
            )
        chunk = tuple(sorted(largest, key=lambda g: (-g.memory_gib, g.index))[:n])
        raise PlacementError(_split_problem(model, chunk, dmap, pixels, d) or "no node has enough GPUs")
    return groups


def _split_problem(model, chunk, dmap, pixels, d) -> str | None:
    for i, g in enumerate(chunk):
        names = [c for c, gi in dmap.items() if gi == i]
        if not _fits(model, names, g, pixels, d):
            return (f"{' + '.join(names)} need(s) {_need_text(model, names, pixels, d)} on replica-local GPU {i}; "
                    f"{g.label} has {g.memory_gib:.1f} GiB. Change the device_map or use bigger GPUs")
    return None


def _auto_groups(model, inventory, d, pixels):
    groups = []
    split_map = default_device_map(2)
    for node, gpus in inventory.by_node().items():
        leftovers, host = [], None
        for g in gpus:
            if _fits(model, COMPONENTS, g, pixels, d):
                host = len(groups) if host is None else host
                groups.append((node, (g,), dict.fromkeys(COMPONENTS, 0)))
            else:
                leftovers.append(g)
        if host is not None:  # a denoiser per leftover GPU beats a split pair per two of them
            for g in list(leftovers):
                if _fits(model, ("transformer", "vae"), g, pixels, d):
                    groups.append((node, (g,), {"transformer": 0, "vae": 0}, host))
                    leftovers.remove(g)
        # Pair the GPUs that cannot hold a whole pipeline: the larger takes transformer + VAE.
        leftovers.sort(key=lambda g: (g.memory_gib, g.index))
        while len(leftovers) >= 2:
            small, large = leftovers.pop(0), leftovers.pop(-1)
            chunk = (small, large)
            if _split_problem(model, chunk, split_map, pixels, d) is None:
                groups.append((node, chunk, dict(split_map)))
    if not groups:
        raise PlacementError(
            f"nothing fits: transformer + vae need {_need_text(model, ['transformer', 'vae'], pixels, d)} and a whole "
            f"pipeline {_need(model, COMPONENTS, pixels):.1f} GiB; {_largest_text(inventory)}")
    return groups


def _shared_encoder_groups(model, inventory, d, pixels):
    groups, small = [], None
    for node, gpus in inventory.by_node().items():
        order = sorted(gpus, key=lambda g: (-g.memory_gib, g.index))
        host = order[0]
        if not _fits(model, COMPONENTS, host, pixels, d):  # this node stays unused (the plan's notes say so)
            small = host if small is None or host.memory_gib > small.memory_gib else small
            continue
        host_at = len(groups)
        groups.append((node, (host,), dict.fromkeys(COMPONENTS, 0)))
        for g in sorted(order[1:], key=lambda g: g.index):
            if _fits(model, ("transformer", "vae"), g, pixels, d):
                groups.append((node, (g,), {"transformer": 0, "vae": 0}, host_at))
    if not groups:
        need = _need(model, COMPONENTS, pixels, (d.width, d.height))
        raise PlacementError(
            f"shared-encoder mode hosts the text encoder in a whole pipeline, which needs {need:.1f} GiB at "
            f"{d.width}x{d.height} batch 1; the largest GPU, {small.label}, has {small.memory_gib:.1f} GiB. Use mode "
            f"'split' or 'auto'"
        )
    return groups


def _assemble(model, inventory, d, pixels, groups) -> PlacementPlan:
    replicas, used = [], {}
    per_image = sample_tokens(d.width, d.height)
    for i, (node, chunk, dmap, *borrow) in enumerate(groups):
        rid = f"r{i}"
        tokens, px, most = [], [], d.max_batch_size
        for li, g in enumerate(chunk):
            names = [c for c, gi in dmap.items() if gi == li]
            if names:
                cap = g.memory_gib - d.headroom_gib
                t, b = _budget(model, names, cap, pixels, per_image, d.max_batch_size)
                tokens.append(t)
                most = min(most, b)
                px.append(model.max_image_pixels(names, cap))
            used[(g.node, g.index)] = [f"{rid}.{c}" for c in COMPONENTS if c in names]
        max_tokens = min(tokens)
        if d.max_batch_tokens is not None:
            max_tokens = min(max_tokens, max(d.max_batch_tokens, per_image))
        max_batch = max(1, min(most, max_tokens // per_image))
        encoder_replica = encoder_gpu = None
        if borrow:
            host = replicas[borrow[0]]
            encoder_replica, encoder_gpu = host.replica_id, (host.node, host.gpus[host.device_map["text_encoder"]])
        replicas.append(ReplicaPlan(rid, node, tuple(g.index for g in chunk), dict(dmap), max_batch,
                                    min(px), max_tokens, encoder_replica, encoder_gpu))
    rep_by_gpu = {(r.node, r.gpus[li]): (r, li) for r in replicas for li in range(len(r.gpus))}
    gpu_plans = []
    for g in sorted(inventory.gpus, key=lambda g: (g.node, g.index)):
        comps = tuple(used.get((g.node, g.index), ()))
        peak = load = 0.0
        if (g.node, g.index) in rep_by_gpu:
            r, li = rep_by_gpu[(g.node, g.index)]
            names = [c for c, gi in r.device_map.items() if gi == li]
            peak = model.peak_gib(names, pixels, r.max_batch_size, (d.width, d.height))
            load = model.load_peak_gib(names)
        gpu_plans.append(GPUPlan(g.node, g.index, g.memory_gib, comps, peak, load))
    notes = [model.lora_text] if model.lora_text else []
    idle = [gp for gp in gpu_plans if not gp.components and (gp.node, gp.gpu) not in rep_by_gpu]
    if idle:
        notes.append(f"{len(idle)} GPU(s) unused: " + ", ".join(f"{gp.node}:{gp.gpu}" for gp in idle))
    held = [gp for gp in gpu_plans if not gp.components and (gp.node, gp.gpu) in rep_by_gpu]
    if held:
        notes.append(f"{len(held)} GPU(s) held by a split replica with nothing placed on them (its device map leaves "
                     f"them empty): " + ", ".join(f"{gp.node}:{gp.gpu}" for gp in held))
    return PlacementPlan(d.mode, model.name, d.width, d.height, tuple(replicas), tuple(gpu_plans), tuple(notes),
                         tuple(model.precisions.items()), model.lora_gib)
