"""Multi-node placement and node loss (ray.cluster_utils), and an 8-GPU node, each in its own process and Ray."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def run_scenario(name: str, cache: Path, timeout: int = 300) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scenarios" / f"{name}.py"), str(cache)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_nodes_then_node_loss(tiny_cache):
    out = run_scenario("multinode", tiny_cache)
    assert out["replicas"] == 2 and len(out["plan_nodes"]) == 2  # one replica on each node
    assert out["first_ok"] and out["first_replicas"] == ["r0", "r1"]
    assert out["second_ok"] == 16, out  # the removed node's work was re-dispatched
    survivor = out["survivor"]
    assert out["replicas_after"] == [survivor], out  # the lost node's replica was dropped: reduced capacity
    assert out["plan_after"] == [survivor], out
    assert any(e.startswith("dropped") for e in out["events"]), out
    assert out["third_ok"] and out["third_replicas"] == [survivor]


def test_eight_gpu_node_end_to_end(tiny_cache):
    out = run_scenario("eight_gpus", tiny_cache)
    assert out["replicas"] == 8 and out["gpus"] == list(range(8))
    assert out["ok"] == 32 and len(out["replicas_used"]) == 8


def test_workers_that_join_after_the_head(tiny_cache):
    """KubeRay's order: the head (no GPU) starts the service before the GPU worker pods exist; with
    cluster.wait_for_gpus the deployment waits for them, then places one replica on each."""
    out = run_scenario("late_workers", tiny_cache)
    assert "only 0 of 2 GPUs (cluster.wait_for_gpus)" in out["timeout_error"], out
    assert 1.5 <= out["timeout_waited_s"] < 10, out
    assert out["replicas"] == 2 and out["distinct_nodes"] == 2 and out["on_joined_nodes"] == [True], out
    assert out["ok"] == 4, out
