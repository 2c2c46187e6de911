"""Faults under a real local Ray (logical GPUs, tiny model): dead replicas, hangs, out-of-memory, chaos through
HTTP, client disconnects, start-up errors. Every request either succeeds or gets a clear error; none hangs."""

import asyncio
import time

import pytest
from conftest import injected, tiny_config

from orchestrator.deployment import Deployment

pytestmark = [pytest.mark.ray, pytest.mark.slow]

FAST_FAULTS = {"hang_min_s": 2.0, "first_batch_timeout_s": 3.0, "hang_factor": 5.0, "max_attempts": 4}


@pytest.fixture(scope="module")
def dep(ray_cluster, tiny_cache):
    loop = asyncio.new_event_loop()
    cfg = tiny_config(tiny_cache, router={**FAST_FAULTS, "request_timeout_s": 60},
                      deployment={"health_interval_s": 1.0, "health_timeout_s": 5.0})
    d = loop.run_until_complete(Deployment.start(cfg))
    yield d, loop
    loop.run_until_complete(d.shutdown())
    loop.close()


def wait_full_strength(d, loop, timeout=90):
    async def go():
        t0 = time.monotonic()
        while len(d.live()) < len(d.replicas):
            assert time.monotonic() - t0 < timeout, f"replicas still down: {d.replica_set.states()} events={d.events}"
            await asyncio.sleep(0.2)
    loop.run_until_complete(go())


def test_replica_dying_mid_batch_loses_nothing(dep):
    d, loop = dep
    r0 = d.replicas["r0"]

    async def go():
        await r0.call("inject_fault", "exit")  # the process dies inside its next batch
        return await d.generate([f"p{i}" for i in range(10)], seed=1)

    results = loop.run_until_complete(asyncio.wait_for(go(), 120))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert any(r.attempts > 1 for r in results)  # the lost batch was re-dispatched
    wait_full_strength(d, loop)
    assert any(rid == "r0" and what.startswith("lost") for _, rid, what in d.events)
    assert any(rid == "r0" and what == "back" for _, rid, what in d.events)


def test_hung_replica_is_recycled_and_its_requests_redispatched(dep):
    d, loop = dep

    async def go():
        for _ in d.replicas:  # teach the hang detector what a normal batch takes
            await d.generate("warm", seed=1)
        await d.replicas["r1"].call("inject_fault", "stall", seconds=60)
        t0 = time.monotonic()
        res = await d.generate([f"q{i}" for i in range(6)], seed=3)
        return res, time.monotonic() - t0

    results, took = loop.run_until_complete(asyncio.wait_for(go(), 120))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert took < 30  # not the 60 s stall
    assert any(rid == "r1" and what.startswith("hung") for _, rid, what in d.events)
    wait_full_strength(d, loop)


def test_out_of_memory_batch_is_split(dep):
    d, loop = dep

    async def go():
        async with injected(d, "oom_above", max_batch=1):
            return await d.generate([f"m{i}" for i in range(6)], seed=9)

    results = loop.run_until_complete(asyncio.wait_for(go(), 120))
    assert all(r.ok and r.batch_size == 1 for r in results), [(r.batch_size, r.error) for r in results]
    assert len(d.live()) == 2  # an OOM never takes a replica down


def test_single_request_oom_is_a_clear_error_and_replica_stays(dep):
    d, loop = dep

    async def go():
        async with injected(d, "oom_above", max_batch=0):
            return await d.generate("too big", seed=1)

    (res,) = loop.run_until_complete(asyncio.wait_for(go(), 60))
    assert not res.ok and res.error_type == "out_of_memory" and "smaller size" in res.error
    assert loop.run_until_complete(d.generate("fine", seed=1))[0].ok


def test_placement_error_before_any_gpu_work(tiny_cache, monkeypatch):
    from orchestrator import ray_backend
    from placement import PlacementError

    cfg = tiny_config(tiny_cache, cluster={"nodes": [{"name": "n", "gpus": 1, "gpu_memory_gib": 1}]},
                      model={"source": "modelscope", "cache_dir": str(tiny_cache)})
    monkeypatch.setattr(ray_backend, "connect", lambda *_: pytest.fail("Ray was touched"))
    with pytest.raises(PlacementError, match="n:0 with 1.0 GiB"):
        asyncio.run(Deployment.start(cfg))
