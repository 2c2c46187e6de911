"""SIGTERM while requests are in flight: the server stops accepting, finishes them all, exits 0."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_requests(tmp_path, tiny_cache):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"""
cluster: {{num_cpus: 2, num_gpus: 2}}
model: {{source: tiny, dtype: float32, cache_dir: "{tiny_cache}"}}
deployment: {{mode: replicate, replicas: 2, cpu_per_replica: 1, torch_threads: 1}}
router: {{max_batch_size: 2, max_wait_ms: 10}}
defaults: {{width: 256, height: 256, num_inference_steps: 12}}
""")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", str(cfg), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server never became ready"
            time.sleep(0.3)
        results = {}

        def call(i):
            results[i] = httpx.post(f"{url}/v1/images/generations", timeout=120,
                                    json={"prompt": f"in flight {i}", "seed": i})

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # all six are accepted and queued or running
        os.kill(proc.pid, signal.SIGTERM)
        for t in threads:
            t.join(timeout=120)
        assert proc.wait(timeout=120) == 0
        assert sorted(results) == list(range(6))
        assert all(r.status_code == 200 for r in results.values()), [r.text for r in results.values()]
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/healthz", timeout=2)  # no longer accepting
    finally:
        if proc.poll() is None:
            proc.kill()
