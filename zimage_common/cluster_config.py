"""The cluster section of the configuration: where Ray runs, and the inventory the planner places onto."""

from __future__ import annotations

from pydantic import Field, model_validator

from .config_http import _Strict


class NodeSpec(_Strict):
    """One node of the inventory the planner places onto."""

    name: str = Field(description="Node name used in plans and errors (a Ray node id or a label you choose).")
    gpus: int = Field(ge=0, le=64, description="Number of GPUs on the node.")
    gpu_memory_gib: float = Field(gt=0, le=1024, description="Usable memory of each GPU, GiB.")
    gpu_type: str = Field(default="", description="Free-form GPU model name, shown in plans.")


class ClusterConfig(_Strict):
    """Where Ray runs: join an existing cluster (``address``) or start a local one."""

    address: str | None = Field(
        default=None, description="Ray address to join ('auto', 'ray://host:10001', 'host:6379'). None starts a local "
        "Ray.")
    namespace: str = Field(default="zimage", description="Ray namespace for the deployment's actors.")
    num_cpus: int | None = Field(default=None, ge=1, le=4096, description="Local Ray only: CPUs to declare.")
    num_gpus: int | None = Field(
        default=None, ge=0, le=1024, description="Local Ray only: GPUs to declare. On a CPU-only machine these are "
        "logical GPUs, which lets placement run without CUDA.")
    nodes: list[NodeSpec] | None = Field(
        default=None, description="The inventory `zimage-orch plan` plans for without Ray; at start-up the plan is "
        "made on the live cluster (this one is still checked first, so an impossible config fails before any GPU "
        "work).")
    gpu_memory_gib: float | None = Field(
        default=None, gt=0, le=1024, description="Memory per GPU to plan the live cluster with. None: probe each node "
        "with torch (logical GPUs without CUDA count as 24 GiB).")
    wait_for_gpus: int | None = Field(
        default=None, ge=1, le=4096, description="At start-up, wait until the cluster's live nodes have at least this "
        "many GPUs before planning (nodes that join after the head: KubeRay worker pods, `ray start` on other "
        "machines). None: plan on the GPUs present when the deployment starts.")
    wait_timeout_s: float = Field(
        default=900.0, gt=0, le=86_400, description="How long to wait for wait_for_gpus before start-up fails.")

    @model_validator(mode="after")
    def _unique_node_names(self) -> ClusterConfig:
        names = [n.name for n in self.nodes or ()]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:  # the planner places by node name: two nodes of one name would share its GPU indices
            raise ValueError(f"cluster.nodes names {', '.join(repr(n) for n in repeated)} more than once; give each "
                             f"node its own name")
        return self

    @model_validator(mode="after")
    def _local_only_fields(self) -> ClusterConfig:
        if self.address is not None and (self.num_cpus is not None or self.num_gpus is not None):
            raise ValueError(
                f"num_cpus/num_gpus declare resources of a local Ray; they cannot be set when joining "
                f"address={self.address!r}. Remove them, or remove address to start a local Ray."
            )
        return self
