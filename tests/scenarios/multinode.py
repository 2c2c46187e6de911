"""Scenario (own process, own Ray): a two-node cluster made with ray.cluster_utils, replicas on both nodes,
then one node removed mid-load. Prints a JSON summary on the last line."""

import asyncio
import json
import sys

from ray.cluster_utils import Cluster

from orchestrator.deployment import Deployment
from zimage_common.config import config_from_dict


async def main(cache: str) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
    node_b = cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    cfg = config_from_dict({
        "cluster": {"address": cluster.address, "gpu_memory_gib": 24},
        "model": {"source": "tiny", "dtype": "float32", "cache_dir": cache},
        "deployment": {"mode": "replicate", "cpu_per_replica": 0, "torch_threads": 1, "health_interval_s": 1},
        "router": {"max_batch_size": 2, "max_wait_ms": 5, "max_attempts": 4, "request_timeout_s": 120},
        "defaults": {"width": 64, "height": 64, "num_inference_steps": 3},
    })
    dep = await Deployment.start(cfg)
    out = {"plan_nodes": sorted({r.node for r in dep.plan.replicas}), "replicas": len(dep.replicas)}
    first = await dep.generate([f"a{i}" for i in range(8)], seed=1)
    out["first_ok"] = all(r.ok for r in first)
    out["first_replicas"] = sorted({r.replica_id for r in first})
    lost = [rid for rid, r in dep.replicas.items() if r.node.node_id == node_b.node_id]
    out["lost_replica"], out["survivor"] = lost[0], sorted(set(dep.replicas) - set(lost))[0]

    async def remove_soon():
        await asyncio.sleep(0.3)
        cluster.remove_node(node_b)

    remover = asyncio.create_task(remove_soon())
    second = await dep.generate([f"b{i}" for i in range(16)], seed=2)
    await remover
    out["second_ok"] = sum(r.ok for r in second)
    out["second_errors"] = sorted({r.error_type for r in second if not r.ok})
    for _ in range(120):  # the replica on the removed node is dropped once Ray reports the node dead
        if len(dep.replicas) == 1:
            break
        await asyncio.sleep(0.5)
    out["replicas_after"] = sorted(dep.replicas)
    out["plan_after"] = sorted(r.replica_id for r in dep.plan.replicas)
    out["events"] = [what for _, _, what in dep.events]
    third = await dep.generate([f"c{i}" for i in range(4)], seed=3)
    out["third_ok"] = all(r.ok for r in third)
    out["third_replicas"] = sorted({r.replica_id for r in third})
    await dep.shutdown()
    import ray

    ray.shutdown()  # the driver must leave before cluster_utils may remove the head node
    cluster.shutdown()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))))
