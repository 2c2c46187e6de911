"""Actors and router under a real local Ray with logical GPUs and the tiny pipeline."""

import asyncio
import io

import numpy as np
import pytest
from conftest import injected, tiny_config
from PIL import Image

from orchestrator.deployment import Deployment

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def pixels(result):
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(result.png))), result.image)  # PNG is lossless
    return result.image.astype(np.int16)


@pytest.fixture(scope="module")
def deployment(ray_cluster, tiny_cache):
    loop = asyncio.new_event_loop()
    dep = loop.run_until_complete(Deployment.start(tiny_config(tiny_cache)))
    yield dep, loop
    loop.run_until_complete(dep.shutdown())
    loop.close()


def test_two_replicas_on_separate_logical_gpus(deployment):
    dep, _ = deployment
    assert [r.gpus for r in dep.plan.replicas] == [(0,), (1,)]
    assert all(h.ready and h.dtype == "float32" for h in dep.health.values())


def test_batches_across_both_replicas(deployment):
    dep, loop = deployment
    results = loop.run_until_complete(dep.generate([f"prompt {i}" for i in range(12)], seed=5))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert {r.replica_id for r in results} == {"r0", "r1"}
    assert max(r.batch_size for r in results) > 1
    assert [r.seed for r in results] == [5] * 12
    for r in results:
        assert Image.open(io.BytesIO(r.png)).size == (64, 64)


def test_same_seed_same_image_whatever_batch_or_replica(deployment):
    dep, loop = deployment
    alone = loop.run_until_complete(dep.generate("a lighthouse at dusk", seed=99))[0]
    crowd = loop.run_until_complete(dep.generate(
        ["noise one", "a lighthouse at dusk", "noise two", "noise three"] * 3, seed=99))
    twins = [r for r in crowd if r.ok and r.request_id and r.seed == 99]
    same_prompt = [r for r, p in zip(crowd, ["noise one", "a lighthouse at dusk", "noise two", "noise three"] * 3)
                   if p == "a lighthouse at dusk"]
    assert len(twins) == 12 and len(same_prompt) == 3
    assert {r.replica_id for r in crowd} == {"r0", "r1"}
    for r in same_prompt:
        assert np.abs(pixels(r) - pixels(alone)).max() <= 1, (r.replica_id, r.batch_size)


def test_n_fans_out_with_distinct_seeds(deployment):
    dep, loop = deployment
    results = loop.run_until_complete(dep.generate("a fox", n=3, seed=10))
    assert [r.seed for r in results] == [10, 11, 12]
    assert not np.array_equal(pixels(results[0]), pixels(results[1]))


def test_replica_error_reaches_the_caller(deployment):
    dep, loop = deployment

    async def go():
        async with injected(dep, "raise", message="injected boom"):
            return await dep.generate("x", seed=1)

    (res,) = loop.run_until_complete(asyncio.wait_for(go(), 60))
    assert not res.ok and "injected boom" in res.error
    assert loop.run_until_complete(dep.generate("x", seed=1))[0].ok


def test_sync_client_and_generate_cli(ray_cluster, tiny_cache, tmp_path):
    """The synchronous Python API and `zimage-orch generate` (both join the session's Ray)."""
    import json

    import yaml

    from orchestrator.cli import main
    from orchestrator.deployment import ZImageClient

    cfg = tiny_config(tiny_cache, deployment={"replicas": 1})
    with ZImageClient(cfg) as client:
        images = client.generate_images("a red fox", n=2, seed=4)
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True)))
    out = tmp_path / "gen"
    assert main(["generate", "--config", str(path), "--prompt", "a fox", "--prompt", "a cat", "--n", "2",
                 "--size", "64x96", "--seed", "7", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 4 and summary["size"] == "64x96"
    assert len(list(out.glob("*.png"))) == 4
