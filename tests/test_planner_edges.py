"""Placement planner edges (placement/), the cluster/deployment config it reads and `zimage-orch plan`: non-square
target sizes, the text encoder's share of a batch's budget, repeated node names, mixed nodes in shared-encoder mode,
device maps outside split mode, GPUs a split replica holds empty, split replicas on nodes too small. Each test
states what the module's docstrings, the README or the deployment code say should hold."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from orchestrator.cli import planning_inventory
from orchestrator.deployment import declared_inventory, plan_for
from placement import DeploymentSpec, Inventory, PlacementError, model_spec, plan
from placement.memory import sample_tokens
from placement.planner import COMPONENTS
from zimage_common.config import Config, DeploymentConfig, load_config

FULL = model_spec("modelscope")


# ---- 1. a non-square target size is sized as a square of the same area ----------------------------------------
@pytest.mark.parametrize("width,height", [(1536, 640), (1344, 768)])
def test_non_square_target_batch_fits_its_own_token_budget(width, height):
    """ReplicaPlan.max_batch_size is "images of the deployment's target size in one batch" and the router never
    sends more than max_batch_tokens: max_batch_size images of width x height must fit in that budget."""
    per_image = sample_tokens(width, height)  # what the transformer really packs for one such image
    budget = 4 * per_image - 1  # three images fit, four do not
    p = plan(FULL, Inventory.from_nodes([("a", 1, 80.0)]),
             DeploymentSpec(width=width, height=height, max_batch_tokens=budget))
    r = p.replicas[0]
    assert r.max_batch_size * per_image <= r.max_batch_tokens, (
        f"plan says {r.max_batch_size} images of {width}x{height} per batch, which is "
        f"{r.max_batch_size * per_image} tokens, over its own budget of {r.max_batch_tokens}")


def test_non_square_target_batch_peak_within_the_gpu_on_24gb_cards():
    """On the dual-4090D cap (23.5 GiB) at 1536x640 the planned batch, counted with the module's own memory model
    at the real token count of those images, must stay within capacity - headroom."""
    width, height, cap = 1536, 640, 23.5
    d = DeploymentSpec(width=width, height=height, max_batch_tokens=None)
    p = plan(FULL, Inventory.from_nodes([("a", 1, cap)]), d)
    r = p.replicas[0]
    real = FULL.batch_peak_gib(COMPONENTS, r.max_batch_size * sample_tokens(width, height), width * height,
                               r.max_batch_size)
    assert real <= cap - d.headroom_gib, (
        f"batch of {r.max_batch_size} at {width}x{height} needs {real:.3f} GiB; usable {cap - d.headroom_gib} "
        f"(plan's estimate {p.gpus[0].estimated_peak_gib:.3f})")


# ---- 2. a replica accepted at batch 1 whose token budget is 0 ---------------------------------------------------
def _check_serves_one_target_image(p, width, height):
    per_image = sample_tokens(width, height)
    for r in p.replicas:
        assert r.max_batch_tokens >= per_image, (
            f"{r.replica_id}: token budget {r.max_batch_tokens} cannot hold one {width}x{height} image "
            f"({per_image} tokens), yet the plan was accepted with max_batch_size {r.max_batch_size}: the router "
            f"refuses every request")


def test_replica_placed_at_batch_1_can_serve_one_target_image():
    """_fits admits the GPU at batch 1 (one prompt), and a budget with the text encoder's activations for
    max_batch_size (16) prompts would be 0: the plan must size the budget for the batch it can actually run, or
    refuse."""
    try:
        p = plan(FULL, Inventory.from_nodes([("a", 1, 20.5)]), DeploymentSpec(width=512, height=512))
    except PlacementError:
        return
    _check_serves_one_target_image(p, 512, 512)


def test_shipped_24gb_config_with_loras_at_512_plans_a_zero_token_budget():
    """The same through a shipped config: dual-4090D replicate at 512x512 with four rank-64 LoRA slots. `validate`
    and `plan` accept it, so its token budget must not be 0 (every request would be refused at the router)."""
    cfg = load_config("clusters/dual-4090d-replicate.yaml",
                      ["defaults.width=512", "defaults.height=512", "model.lora_max_resident=4",
                       "model.lora_max_rank=64"])
    try:
        p = plan_for(cfg, planning_inventory(cfg))
    except PlacementError:
        return
    _check_serves_one_target_image(p, 512, 512)


# ---- 3. two declared nodes with the same name ------------------------------------------------------------------
def test_duplicate_node_names_never_put_two_replicas_on_one_gpu():
    """cluster.nodes with a repeated name is either refused with a config error, or planned without two replicas
    on one (node, gpu) (merged by name, it would plan 4 replicas onto n:0, n:0, n:1, n:1)."""
    data = {"cluster": {"nodes": [{"name": "n", "gpus": 2, "gpu_memory_gib": 80},
                                  {"name": "n", "gpus": 2, "gpu_memory_gib": 24}]}}
    try:
        cfg = Config.model_validate(data)
        p = plan_for(cfg, declared_inventory(cfg))
    except (ValueError, PlacementError):
        return  # a clear refusal is fine
    held = [(r.node, g) for r in p.replicas for g in r.gpus]
    assert len(held) == len(set(held)), f"replicas share GPUs: {held}"
    gpu_rows = [(g.node, g.gpu) for g in p.gpus]
    assert len(gpu_rows) == len(set(gpu_rows)), f"the plan lists the same GPU twice: {gpu_rows}"


# ---- 4. shared-encoder refuses a heterogeneous cluster that other modes place ----------------------------------
def test_shared_encoder_places_the_nodes_that_fit_and_leaves_a_small_node_idle():
    """Heterogeneous nodes: a node of 80 GiB GPUs and one of 12 GiB GPUs. replicate, auto and split place the big
    node and note the small one unused; so does shared-encoder: the small node cannot host a whole pipeline, but
    the big node alone is a valid shared-encoder layout."""
    inv = Inventory.from_nodes([("big", 2, 80.0), ("small", 2, 12.0)])
    assert plan(FULL, Inventory.from_nodes([("big", 2, 80.0)]), DeploymentSpec(mode="shared-encoder")).replicas
    p = plan(FULL, inv, DeploymentSpec(mode="shared-encoder"))
    assert [r.node for r in p.replicas] == ["big", "big"]
    assert p.replicas[1].encoder_replica == "r0"


# ---- 5. device_map given outside split mode is silently ignored -------------------------------------------------
@pytest.mark.parametrize("mode", ["auto", "shared-encoder"])
def test_device_map_outside_split_mode_is_refused(mode):
    """'device_map is only used with mode split', in every other mode too: with auto or shared-encoder the plan
    would ignore it."""
    with pytest.raises(ValidationError, match="device_map"):
        DeploymentConfig(mode=mode, gpus_per_replica=3, device_map={"text_encoder": 0, "transformer": 1, "vae": 2})


# ---- 6. GPUs a split replica holds are reported as unused ------------------------------------------------------
@pytest.mark.parametrize("gpus_per_replica,device_map", [
    (2, {"text_encoder": 0, "transformer": 0, "vae": 0}),
    (4, None),  # the default map of 3+ GPUs: te 0, transformer 1, vae 2; GPU 3 held by the replica
])
def test_gpus_held_by_a_split_replica_are_not_reported_unused(gpus_per_replica, device_map):
    """A replica's placement group is {"GPU": len(rp.gpus)} (ray_backend.py), so every GPU in rp.gpus is taken by
    it; the plan's notes must not tell the operator such a GPU is unused (free for something else)."""
    p = plan(FULL, Inventory.from_nodes([("a", 4, 24.0)]),
             DeploymentSpec(mode="split", gpus_per_replica=gpus_per_replica, device_map=device_map))
    held = {f"{r.node}:{g}" for r in p.replicas for g in r.gpus}
    unused_notes = [n for n in p.notes if "unused" in n]
    for note in unused_notes:
        listed = {x.strip() for x in note.split(":", 1)[1].split(",")}
        assert not (listed & held), f"{sorted(listed & held)} reported unused but held by a replica: {note}"


# ---- 7. split replicas on nodes that each have too few GPUs -----------------------------------------------------
def test_split_on_nodes_too_small_says_the_node_lacks_gpus():
    """Two 1-GPU nodes, gpus_per_replica 2: 'split replicas need 2 GPUs on one node; the largest node has 1', not a
    pairing of GPUs of different nodes ending in a bare 'no node has enough GPUs' (no numbers)."""
    with pytest.raises(PlacementError, match="largest node has 1"):
        plan(FULL, Inventory.from_nodes([("a", 1, 80.0), ("b", 1, 80.0)]),
             DeploymentSpec(mode="split", gpus_per_replica=2))
