"""Scenario (own process, own Ray): an 8-logical-GPU node, planned and run end to end, one replica per GPU."""

import asyncio
import json
import sys

from orchestrator.deployment import Deployment
from zimage_common.config import config_from_dict


async def main(cache: str) -> dict:
    cfg = config_from_dict({
        "cluster": {"num_cpus": 8, "num_gpus": 8, "gpu_memory_gib": 80},
        "model": {"source": "tiny", "dtype": "float32", "cache_dir": cache},
        "deployment": {"mode": "auto", "cpu_per_replica": 1, "torch_threads": 1},
        "router": {"max_batch_size": 2, "max_wait_ms": 5},
        "defaults": {"width": 64, "height": 64, "num_inference_steps": 2},
    })
    dep = await Deployment.start(cfg)
    results = await dep.generate([f"p{i}" for i in range(32)], seed=5)
    out = {
        "replicas": len(dep.plan.replicas),
        "gpus": sorted(g for r in dep.plan.replicas for g in r.gpus),
        "ok": sum(r.ok for r in results),
        "replicas_used": sorted({r.replica_id for r in results}),
        "batch_sizes": sorted({r.batch_size for r in results}),
    }
    await dep.shutdown()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))))
