"""Component replication: one text encoder (in replica r0) serves transformer + VAE replicas on the other GPUs.
Same seeds, same images as whole pipelines; the borrowers really use r0's encoder."""

import asyncio

import numpy as np
import pytest
from conftest import tiny_config

from actors.worker import PipelineWorker
from orchestrator.deployment import Deployment
from placement import DeploymentSpec, Inventory, model_spec, plan
from zimage_common.messages import Batch

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_planner_shares_one_encoder_per_node():
    p = plan(model_spec("modelscope"), Inventory.from_nodes([("a", 2, 23.5), ("b", 3, 79.0)]),
             DeploymentSpec("shared-encoder", max_batch_size=4))
    hosts = [r for r in p.replicas if r.encoder_replica is None]
    borrowers = [r for r in p.replicas if r.encoder_replica is not None]
    assert [(r.node, r.gpus) for r in hosts] == [("a", (0,)), ("b", (0,))]
    assert [(r.node, r.gpus, r.encoder_replica) for r in borrowers] == [
        ("a", (1,), "r0"), ("b", (1,), "r2"), ("b", (2,), "r2")]
    for r in borrowers:
        assert "text_encoder" not in r.device_map and r.components["text_encoder"]["shared_from"]
    # on 24 GB cards the borrower, without 7.3 GiB of encoder, has about 50k more tokens for its batches
    host, borrower = p.replicas[0], p.replicas[1]
    assert borrower.max_batch_tokens - host.max_batch_tokens > 45_000
    assert (host.max_batch_size, borrower.max_batch_size) == (4, 4)  # both capped by max_batch_size


def test_shared_encoder_deployment_end_to_end(ray_cluster, tiny_cache):
    cfg = tiny_config(tiny_cache, deployment={"mode": "shared-encoder", "replicas": 3},
                      router={"max_batch_size": 2, "max_wait_ms": 0})
    loop = asyncio.new_event_loop()
    dep = loop.run_until_complete(Deployment.start(cfg))
    try:
        assert [r.encoder_replica for r in dep.plan.replicas] == [None, "r0", "r0"]
        prompts = [f"shared prompt {i}" for i in range(12)]
        results = loop.run_until_complete(dep.generate(prompts, seed=33))
        health = loop.run_until_complete(dep.replica_health())
    finally:
        loop.run_until_complete(dep.shutdown())
        loop.close()
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    used = {r.replica_id for r in results}
    assert {"r1", "r2"} & used  # the borrowers served requests...
    assert health["r0"].encodes_served >= 1  # ...with r0's text encoder
    whole = PipelineWorker("whole", cfg.model, torch_threads=1)
    whole.start()
    ref = whole.run_batch(Batch(0, tuple(dep.requests_for(p, seed=33)[0] for p in prompts)))
    for got, want in zip(results, ref.results):
        assert np.abs(got.image.astype(int) - want.image.astype(int)).max() <= 1, got.replica_id
