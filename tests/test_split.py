"""A split replica (text encoder on one logical GPU, transformer + VAE on another) end to end under Ray, its step loop
beside its callers' encodes and decodes, against the whole pipeline: same seeds, same images."""

import asyncio

import numpy as np
import pytest
from conftest import tiny_config

from actors.worker import PipelineWorker
from orchestrator.deployment import Deployment
from zimage_common.messages import Batch

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_split_replica_matches_whole_pipeline(ray_cluster, tiny_cache):
    cfg = tiny_config(
        tiny_cache,
        deployment={"mode": "split", "replicas": 2, "gpus_per_replica": 2,
                    "device_map": {"text_encoder": 0, "transformer": 1, "vae": 1}},
        router={"max_batch_size": 2, "max_wait_ms": 0},
    )
    loop = asyncio.new_event_loop()
    dep = loop.run_until_complete(Deployment.start(cfg))
    try:
        assert [r.gpus for r in dep.plan.replicas] == [(0, 1), (2, 3)]
        assert dep.plan.replicas[0].components["text_encoder"]["gpu"] == 0
        assert dep.plan.replicas[1].components["transformer"]["gpu"] == 3
        prompts = [f"split prompt {i}" for i in range(8)]
        results = loop.run_until_complete(dep.generate(prompts, seed=21))
    finally:
        loop.run_until_complete(dep.shutdown())
        loop.close()
    assert all(r.ok for r in results) and {r.replica_id for r in results} == {"r0", "r1"}
    whole = PipelineWorker("whole", cfg.model, torch_threads=1)
    whole.start()
    reference = whole.run_batch(Batch(0, tuple(dep.requests_for(p, seed=21)[0] for p in prompts)))
    for got, ref in zip(results, reference.results):
        assert np.abs(got.image.astype(int) - ref.image.astype(int)).max() <= 1
