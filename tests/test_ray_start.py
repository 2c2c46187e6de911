"""A local start always starts its own Ray (issue 11): a stale current-cluster file left by a Ray that died without
`ray stop`, or a RAY_ADDRESS pointing nowhere, must not turn it into a failed join ("num_cpus and num_gpus must
not be provided")."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
import ray
from orchestrator import ray_backend
from zimage_common.config import ClusterConfig

ray_backend.connect(ClusterConfig(num_cpus=1, num_gpus=2))
print("GPUS", ray.cluster_resources().get("GPU"), flush=True)
ray.shutdown()
"""


def test_local_start_ignores_a_stale_cluster_address():
    tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths live under it
    stale = Path(tmp) / "ray" / "ray_current_cluster"
    stale.parent.mkdir(parents=True)
    stale.write_text("127.0.0.1:1")  # what a cluster killed without `ray stop` leaves behind
    env = dict(os.environ, RAY_TMPDIR=tmp, RAY_ADDRESS="127.0.0.1:1", PYTHONPATH=str(ROOT),
               RAY_USAGE_STATS_ENABLED="0")
    try:
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=180)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "GPUS 2.0" in out.stdout  # its own local Ray, with the declared (logical) GPUs
