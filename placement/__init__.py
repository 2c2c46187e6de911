"""Placement planning: which component of Z-Image lives on which GPU of which node.

Pure Python: no ray, no torch. ``plan(model, inventory, deployment)`` is a deterministic function of its inputs,
so a plan is computed and tested in milliseconds and printed by ``zimage-orch plan`` on any machine.
"""

from .memory import ComponentSpec, ModelSpec, fp8_capable, lora_adapter_gib, model_spec, with_loras
from .planner import (
    GPU,
    DeploymentSpec,
    GPUPlan,
    Inventory,
    PlacementError,
    PlacementPlan,
    ReplicaPlan,
    plan,
    plan_best,
)

__all__ = [
    "GPU",
    "ComponentSpec",
    "DeploymentSpec",
    "GPUPlan",
    "Inventory",
    "ModelSpec",
    "PlacementError",
    "PlacementPlan",
    "ReplicaPlan",
    "fp8_capable",
    "lora_adapter_gib",
    "model_spec",
    "plan",
    "plan_best",
    "with_loras",
]
