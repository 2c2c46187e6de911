"""Scenario (own process, own Ray): the KubeRay start-up order. The head has no GPU; the deployment starts with
cluster.wait_for_gpus=2 before any worker exists, two GPU nodes join later, and the deployment places one replica
on each and serves. First, a wait that can never be met fails with the GPUs it saw. Prints a JSON summary on the
last line."""

import asyncio
import json
import sys
import time

from ray.cluster_utils import Cluster

from orchestrator.deployment import Deployment
from zimage_common.config import config_from_dict
from zimage_common.errors import NotReadyError


def config(address: str, cache: str, wait_for: int, timeout_s: float):
    return config_from_dict({
        "cluster": {"address": address, "gpu_memory_gib": 24, "wait_for_gpus": wait_for,
                    "wait_timeout_s": timeout_s},
        "model": {"source": "tiny", "dtype": "float32", "cache_dir": cache},
        "deployment": {"mode": "replicate", "cpu_per_replica": 0, "torch_threads": 1},
        "router": {"max_batch_size": 2, "max_wait_ms": 5, "request_timeout_s": 120},
        "defaults": {"width": 64, "height": 64, "num_inference_steps": 2},
    })


async def main(cache: str) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    out = {}
    t0 = time.monotonic()
    try:
        await Deployment.start(config(cluster.address, cache, 2, 1.5))
    except NotReadyError as e:
        out["timeout_error"] = str(e)
    out["timeout_waited_s"] = round(time.monotonic() - t0, 2)

    async def join_later():
        await asyncio.sleep(1.0)
        a = cluster.add_node(num_cpus=2, num_gpus=1)
        await asyncio.sleep(1.0)
        b = cluster.add_node(num_cpus=2, num_gpus=1)
        return {a.node_id, b.node_id}

    joiner = asyncio.create_task(join_later())
    dep = await Deployment.start(config(cluster.address, cache, 2, 120))
    workers = await joiner
    out["replicas"] = len(dep.replicas)
    out["on_joined_nodes"] = sorted({r.node.node_id in workers for r in dep.replicas.values()})
    out["distinct_nodes"] = len({r.node.node_id for r in dep.replicas.values()})
    results = await dep.generate([f"p{i}" for i in range(4)], seed=1)
    out["ok"] = sum(r.ok for r in results)
    await dep.shutdown()
    import ray

    ray.shutdown()
    cluster.shutdown()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))))
