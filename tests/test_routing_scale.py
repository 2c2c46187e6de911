"""benchmarks/routing_scale.py at toy size on a manual clock: one real router over 8 and over 64 simulated GPUs at
1.2x their capacity, with replicas of its own and as a pool's front door (power of two choices, probing queues).
Every request is served or refused (none fails), no replica ever holds more than its budget, the pool delivers its
capacity, and the per-replica work per request does not grow with the pool: rooms computed, capacity checks,
replicas read from the pool, and the scheduler's own count of replicas looked at."""

import asyncio
import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest
from fakes import ManualClock

from orchestrator.dispatch_policy import Dispatch
from orchestrator.scheduler import ReplicaCapacity

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(120)


def routing_scale():
    spec = importlib.util.spec_from_file_location("routing_scale", ROOT / "benchmarks" / "routing_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


async def simulate(rs, n: int, calls: Counter, shared: bool = False) -> dict:
    clock = ManualClock()
    calls.clear()
    run = asyncio.ensure_future(rs.run_pool(n, duration=45.0, warmup=15.0, clock=clock, seed=3,
                                            router_kw={"shared": shared}))
    while not run.done():
        await clock.advance(0.02)
    row = run.result()
    row["per_replica_ops"] = (sum(calls.values()) / row["arrivals"]) + row["roster_reads_per_request"]
    return row


def counted(calls: Counter, name: str, fn):
    def wrapped(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("shared", [False, True], ids=["own-replicas", "pool-power-of-two"])
async def test_routing_work_per_request_does_not_grow_with_the_pool_and_load_levels_off_at_capacity(monkeypatch,
                                                                                                  shared):
    rs = routing_scale()
    calls = Counter()
    monkeypatch.setattr(ReplicaCapacity, "fits", counted(calls, "fits", ReplicaCapacity.fits))
    monkeypatch.setattr(Dispatch, "room", counted(calls, "room", Dispatch.room))
    rows = {n: await simulate(rs, n, calls, shared) for n in (8, 64)}
    for row in rows.values():
        assert row["failed"] == 0 and row["served"] > 0, row
        assert row["arrivals"] >= row["served"] + row["rejected"], row
        assert row["peak_tokens"] <= row["budget_tokens"] and row["peak_images"] <= row["budget_images"], row
        assert row["offered_per_s"] > 1.1 * row["capacity_per_s"], row
        assert 0.93 <= row["delivered_over_capacity"] <= 1.07, row
    for measure in ("per_replica_ops", "examined_per_request"):
        small, large = rows[8][measure], rows[64][measure]
        assert large <= 1.25 * small + 1, (measure, small, large)  # 8x the replicas, not 8x the work
