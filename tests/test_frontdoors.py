"""Several front doors over one replica pool, for real: two `zimage-orch serve` processes join the session's Ray
(logical GPUs, the tiny model on the CPU) with the same `frontdoor.pool`. The first creates the pool's replicas, the
second attaches to them; requests through both are held to each replica's budget (its admission gate); a front door
restarted alone finds the replicas still loaded (same processes, no reload); a front door killed under load leaves
the other's requests unharmed, and clients retrying its calls through the survivor with their Idempotency-Key get
them, with no image generated twice (counted on the replicas)."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FrontDoor:
    def __init__(self, cfg: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "serve", str(cfg), "--port", str(self.port)], cwd=ROOT,
            stdout=open(log, "a"), stderr=subprocess.STDOUT, env={**os.environ, "ZIMAGE_FRONTDOOR_NAME": log.stem})

    def wait_ready(self, timeout_s=240):
        deadline = time.time() + timeout_s
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-4000:]
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, self.log.read_text()[-4000:]
            time.sleep(0.3)

    def post(self, body, key=None, timeout=120):
        headers = {"Idempotency-Key": key} if key else {}
        return httpx.post(f"{self.url}/v1/images/generations", json=body, headers=headers, timeout=timeout)

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_cache, tmp_path_factory):
    """A pool's config and its two front doors, A (made the pool) and B (attached); the pool is removed after."""
    tmp = tmp_path_factory.mktemp("frontdoors")
    name = f"t{uuid.uuid4().hex[:6]}"
    cfg = tmp / "pool.yaml"
    cfg.write_text(yaml.safe_dump({
        "cluster": {"address": ray_cluster.get_runtime_context().gcs_address, "gpu_memory_gib": 24},
        "model": {"source": "tiny", "dtype": "float32", "cache_dir": str(tiny_cache)},
        "deployment": {"mode": "replicate", "replicas": 2, "cpu_per_replica": 0, "torch_threads": 1},
        "router": {"max_batch_size": 4, "max_wait_ms": 20, "request_timeout_s": 120},
        "defaults": {"width": 64, "height": 64, "num_inference_steps": 3},
        "outputs": {"directory": str(tmp / "outputs")},
        "frontdoor": {"pool": name},
    }))
    doors = {}
    try:
        doors["a"] = FrontDoor(cfg, tmp / "fd-a.log").wait_ready()
        doors["b"] = FrontDoor(cfg, tmp / "fd-b.log").wait_ready()
        yield cfg, doors, tmp
    finally:
        for d in doors.values():
            d.stop(signal.SIGKILL)
        down = subprocess.run([sys.executable, "-m", "orchestrator.cli", "pool", "down", str(cfg)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr[-3000:]


def replica_stats(ray, cfg_path):
    """Each pooled replica's intake counters, straight from its actor."""
    from orchestrator.pool import pool_deployment_id, pool_namespace
    from orchestrator.ray_pool import replica_stats as stats

    cfg = yaml.safe_load(cfg_path.read_text())
    name = cfg["frontdoor"]["pool"]
    names = [f"zimage-{pool_deployment_id(name)}-r{i}" for i in range(2)]
    out = stats(pool_namespace("zimage", name), names)
    assert all(isinstance(v, dict) for v in out.values()), out
    return out


def within_budget(stats):
    for s in stats.values():
        lim, g = s["limits"], s["gate"]
        assert g["peak_calls"] <= lim["calls"] and g["peak_tokens"] <= lim["tokens"], s
        assert g["peak_samples"] <= lim["samples"], s


def fire(door, bodies, keys=None, out=None):
    """POST every body at once (a thread each); returns the threads, results in ``out[i]``."""
    out = {} if out is None else out

    def one(i, body, key):
        try:
            out[i] = door.post(body, key)
        except httpx.HTTPError as e:
            out[i] = e

    threads = [threading.Thread(target=one, args=(i, b, keys[i] if keys else None)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    return threads, out


def test_two_front_doors_share_the_pool_within_each_replicas_budget_and_one_restarts_alone(pool, ray_cluster):
    cfg, doors, tmp = pool
    a, b = doors["a"], doors["b"]
    assert "attached to pool" in b.log.read_text()
    before = replica_stats(ray_cluster, cfg)
    # Each router believes it holds a replica alone: only the replica's gate keeps them to its one batch at a time.
    # Whether a call of one door finds the other's inside depends on how the two bursts interleave on a loaded
    # machine, so the bursts repeat (a few times at most) until one had to wait at a gate.
    for burst in range(1, 5):
        ta, ra = fire(a, [{"prompt": f"fox {burst} {i}", "seed": i} for i in range(16)])
        tb, rb = fire(b, [{"prompt": f"cat {burst} {i}", "seed": i} for i in range(16)])
        for t in ta + tb:
            t.join(180)
        assert all(r.status_code == 200 for r in [*ra.values(), *rb.values()]), [
            getattr(r, "text", r) for r in [*ra.values(), *rb.values()]]
        after = replica_stats(ray_cluster, cfg)
        within_budget(after)
        ran = sum(s["images_run"] for s in after.values()) - sum(s["images_run"] for s in before.values())
        assert ran == 32 * burst
        if sum(s["gate"]["waited_total"] for s in after.values()) > 0:
            break
    assert sum(s["gate"]["waited_total"] for s in after.values()) > 0
    assert sum(s["encoder"]["images"] for s in after.values()) >= 32  # encoded near the GPUs

    pids = {k: s["pid"] for k, s in after.items()}
    assert a.stop() == 0  # drained and gone; the replicas stay
    assert b.post({"prompt": "meanwhile", "seed": 1}).status_code == 200
    t0 = time.time()
    doors["a"] = a = FrontDoor(cfg, tmp / "fd-a.log").wait_ready()
    restarted_in = time.time() - t0
    again = replica_stats(ray_cluster, cfg)
    assert {k: s["pid"] for k, s in again.items()} == pids  # the same processes: nothing reloaded
    assert a.post({"prompt": "after the restart", "seed": 2}).status_code == 200
    assert restarted_in < 120


def test_a_front_door_killed_under_load_loses_nothing_a_keyed_retry_cannot_get_and_nothing_runs_twice(
        pool, ray_cluster):
    cfg, doors, _ = pool
    a, b = doors["a"], doors["b"]
    before = replica_stats(ray_cluster, cfg)
    admitted = sum(s["gate"]["admitted_total"] for s in before.values())
    keyed = [{"prompt": f"keyed {i}", "seed": 100 + i, "size": "128x128", "num_inference_steps": 8}
             for i in range(16)]
    keys = [f"key-{uuid.uuid4().hex[:8]}-{i}" for i in range(16)]
    ta, ra = fire(a, keyed, keys)
    deadline = time.time() + 60
    while sum(s["gate"]["admitted_total"] for s in replica_stats(ray_cluster, cfg).values()) == admitted:
        assert time.time() < deadline, "no batch of front door A reached a replica"
        time.sleep(0.05)
    tb, rb = fire(b, [{"prompt": f"survivor {i}", "seed": i} for i in range(8)])
    a.stop(signal.SIGKILL)  # under load: batches at the replicas, calls queued in its router
    for t in ta:
        t.join(60)
    for t in tb:
        t.join(180)
    assert all(r.status_code == 200 for r in rb.values()), [getattr(r, "text", r) for r in rb.values()]
    lost = [i for i, r in ra.items() if not isinstance(r, httpx.Response) or r.status_code != 200]
    assert lost, "front door A answered everything before it was killed: nothing was under load"

    t2, retried = fire(b, keyed, keys)  # every client retries through the survivor with its key
    for t in t2:
        t.join(180)
    assert all(r.status_code == 200 for r in retried.values()), [getattr(r, "text", r) for r in retried.values()]
    for i, r in ra.items():  # a call A answered before it died: the retry replays that very answer
        if isinstance(r, httpx.Response) and r.status_code == 200:
            assert retried[i].json()["data"] == r.json()["data"]
    after = replica_stats(ray_cluster, cfg)
    within_budget(after)
    ran = sum(s["images_run"] for s in after.values()) - sum(s["images_run"] for s in before.values())
    assert ran == 16 + 8  # each keyed image once, whichever front door asked; the survivor's own once
    handed_over = sum(s["claims"]["done"] + s["claims"]["wait"] - before[k]["claims"]["done"]
                      - before[k]["claims"]["wait"] for k, s in after.items())
    assert handed_over >= 1  # at least one image made for A's call went to its retry instead of running again
