import contextlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def _cpu_rowwise_fp8() -> bool:
    """Whether this torch runs ``torch._scaled_mm`` with per-row scales on the CPU (2.13 does; 2.11 only takes
    per-tensor scales there). The CPU tests of the fp8 path need it; on a GPU the replica always has it."""
    import torch

    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


CPU_FP8 = _cpu_rowwise_fp8()
NO_CPU_FP8 = ("this torch's CPU _scaled_mm takes per-tensor scales only (row-wise needs torch 2.13, which tasks.py "
              "installs)")
needs_cpu_fp8 = pytest.mark.skipif(not CPU_FP8, reason=NO_CPU_FP8)


@pytest.fixture(autouse=True)
def _drop_log_handlers_a_test_added():
    """A test that configures logging (the CLI run in-process) leaves a root handler on the stream pytest captured
    for it; a server thread of a later test then logs into that closed stream ("--- Logging error ---"). The root
    level it set goes back too."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in before:
            root.removeHandler(h)
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A model cache directory shared by the session; the tiny model is built into it once."""
    return tmp_path_factory.mktemp("zimage-cache")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for every integration test of the session: 4 logical GPUs on the CPU."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # worker_niceness 0, as a local start of the product's has it (orchestrator/ray_backend.py connect): Ray's
        # default starts workers 15 steps nicer than the driver, and replicas starved by whatever else runs on the
        # machine (the other xdist worker, a test's own processes) make their tests slow and their timing flaky.
        ray.init(address="local", num_cpus=4, num_gpus=4, include_dashboard=False, namespace="zimage-tests",
                 logging_level="WARNING", _system_config={"worker_niceness": 0})
    yield ray
    ray.shutdown()


def started_tiny_worker(cache: Path, replica_id: str = "r0"):
    """A started ``PipelineWorker`` of the tiny model in fp32 on the CPU (warm-up at 32x32), in this process."""
    from actors.worker import PipelineWorker, WarmupSpec
    from zimage_common.config import ModelConfig

    w = PipelineWorker(replica_id, ModelConfig(source="tiny", dtype="float32", cache_dir=cache),
                       warmup=WarmupSpec(((32, 32),), 1), torch_threads=1, max_batch_tokens=1 << 20,
                       max_batch_size=16)
    w.start()
    return w


def final_latents(engine, samples, steps):
    """Each sample's latents after ``steps`` steps of one call through a step loop of its own, before decoding."""
    from actors.steploop import StepLoop, prepare

    group, _ = prepare(engine, samples, steps)
    StepLoop(engine).run_alone(group)
    return [s.latents for s in group.samples]


def tiny_config(cache: Path, **sections):
    """A config for the tiny model on logical GPUs; sections override (dicts merged one level deep)."""
    from zimage_common.config import config_from_dict

    base = {
        "model": {"source": "tiny", "dtype": "float32", "cache_dir": str(cache)},
        "deployment": {"mode": "replicate", "replicas": 2, "cpu_per_replica": 0, "torch_threads": 1},
        "router": {"max_batch_size": 4, "max_wait_ms": 30, "request_timeout_s": 120},
        "defaults": {"width": 64, "height": 64, "num_inference_steps": 3},
        "cluster": {"gpu_memory_gib": 24},
        "outputs": {"directory": str(cache / "outputs")},  # url responses and jobs write under the test's directory
        "batches": {"directory": str(cache / "batches")},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return config_from_dict(base)


class ServerThread:
    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def wait_ready(self, timeout_s: float = 120) -> "ServerThread":
        """Wait for /readyz to answer 200; then ``self.service`` is the app's Service."""
        import httpx

        deadline = time.time() + timeout_s
        while (r := httpx.get(f"{self.url}/readyz")).status_code != 200:
            assert time.time() < deadline, r.text
            time.sleep(0.05)
        self.service = self.server.config.app.state.service
        return self


@pytest.fixture
def moto_s3(monkeypatch):
    """A real S3 protocol server (moto's standalone one) on loopback with a bucket named images; its URL."""
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    pytest.importorskip("boto3")
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="images")
    yield endpoint
    server.stop()


@contextlib.asynccontextmanager
async def injected(dep, kind, **kw):
    """Inject a fault into every replica of a deployment for the duration of the block."""
    for r in dep.replicas.values():
        await r.call("inject_fault", kind, **kw)
    try:
        yield
    finally:
        for r in dep.replicas.values():
            await r.call("inject_fault", None)
