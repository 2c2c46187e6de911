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


# ---- pytest-xdist: the longest work first ------------------------------------------------------------------------
# About how many seconds the slowest work units take in a full run on two cores (`pytest -n 2`): a test module, or
# one test of a module whose tests share no fixture of module or class scope (those run on either worker, one by
# one). An estimate for the order only: a unit not named here counts 0.1 s a test, and a wrong number costs time,
# never a result.
SLOWEST_S = {
    # modules (their tests share a deployment, a server or a model)
    "tests/test_lora_service.py": 30, "tests/test_chaos.py": 28, "tests/test_packed.py": 28,
    "tests/test_api_spec.py": 24, "tests/test_abuse.py": 24, "tests/test_batches_http.py": 24,
    "tests/test_reliability.py": 22, "tests/test_steploop.py": 21, "tests/test_server.py": 20,
    "tests/test_ray_integration.py": 20, "tests/test_frontdoors.py": 16, "tests/test_lora.py": 16,
    "tests/test_conditioning.py": 12, "tests/test_http_limits.py": 11, "tests/test_controlnet.py": 10,
    "tests/test_edits_http.py": 9, "tests/test_batch_edge_cases.py": 8, "tests/test_roofline.py": 8,
    "tests/test_request_id.py": 7, "tests/test_output_links.py": 5, "tests/test_upload_reservations.py": 5,
    "tests/test_batch_lifecycle_edges.py": 4, "tests/test_worker.py": 3, "tests/test_idempotency_http.py": 3,
    "tests/test_cli_inputs.py": 1,
    # tests
    "tests/test_cluster_scenarios.py::test_eight_gpu_node_end_to_end": 38,
    "tests/test_cluster_scenarios.py::test_workers_that_join_after_the_head": 27,
    "tests/test_fp8_blocks.py::test_blocks_compile_as_one_graph_and_cover_every_batch": 23,
    "tests/test_sigterm.py::test_sigterm_drains_in_flight_requests": 18,
    "tests/test_cluster_scenarios.py::test_two_nodes_then_node_loss": 17,
    "tests/test_container.py::test_head_script_serves_then_stops_on_sigterm": 17,
    "tests/test_demo.py::test_demo_end_to_end": 17,
    "tests/test_bench.py::test_matrix_runs_entries_and_groups": 15,
    "tests/test_container.py::test_head_script_exits_when_the_server_dies": 15,
    "tests/test_shared_encoder.py::test_shared_encoder_deployment_end_to_end": 12,
    "tests/test_any_size.py::test_a_size_in_no_list_takes_the_compiled_decoder_and_compiles_nothing": 12,
    "tests/test_bench.py::test_bench_cpu_short_run": 10,
    "tests/test_bench.py::test_step_batching_benchmark_runs_end_to_end_on_the_cpu": 10,
    "tests/test_split.py::test_split_replica_matches_whole_pipeline": 9,
    "tests/test_batch_cli.py::test_sigkill_halfway_then_rerun_generates_each_image_once": 9,
    "tests/test_bench.py::test_bench_edit_workloads_cpu": 7,
    "tests/test_bench.py::test_bench_controlnet_workloads_cpu": 6,
    "tests/test_bench.py::test_probe_step_overhead_runs_end_to_end_on_the_cpu": 6,
    "tests/test_quiet_replicas.py::test_plain_loading_draws_progress_bars": 6,
    "tests/test_quiet_replicas.py::test_replica_start_writes_no_progress_bar_and_logs_its_load_once": 6,
    "tests/test_demo.py::test_generate_edits_an_image_with_a_mask": 5,
    "tests/test_demo.py::test_generate_with_a_control_image": 5,
    "tests/test_quiet_replicas.py::test_ray_replica_log_has_no_progress_bar": 5,
    "tests/test_ray_start.py::test_local_start_ignores_a_stale_cluster_address": 5,
    "tests/test_quiet_replicas.py::test_replica_env_quiets_tqdm_imported_before_it": 4,
}
# Modules whose tests mostly wait (HTTP round trips to fake replicas, timed phases) and leave a core idle: one of
# them is not started while the other worker runs one, where other work is left to start instead.
MOSTLY_WAITING = {"tests/test_abuse.py", "tests/test_batches_http.py", "tests/test_http_limits.py",
                  "tests/test_batch_edge_cases.py", "tests/test_output_links.py", "tests/test_upload_reservations.py",
                  "tests/test_cli_inputs.py", "tests/test_batch_lifecycle_edges.py", "tests/test_idempotency_http.py"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """With ``-n`` and no ``--dist`` of the caller's, hand the work out longest first (``LongestFirst``)."""
    if any(a == "-d" or a.startswith("--dist") for a in config.invocation_params.args):
        return None
    return _longest_first(config, log)


def _longest_first(config, log):
    """xdist's ``--dist loadscope`` with these units and this order. A module's tests stay together on one worker
    (the default ``load`` splits a module between the workers wherever its chunk of the list ends, and both then
    start its module fixtures: a deployment twice), except where they share no module- or class-scoped fixture and
    one of them is slow enough to be named in ``SLOWEST_S``; the units go out longest first, so that the last ones
    to start are short and both workers finish together (the default takes the list in file order, and a worker
    that draws a slow module near the end runs it alone); and two of the ``MOSTLY_WAITING`` modules do not run side
    by side while there is other work to pair them with."""
    import re

    from xdist.scheduler import LoadScopeScheduling

    shared = re.compile(r"""scope\s*=\s*["'](module|class|package)["']""")

    class LongestFirst(LoadScopeScheduling):
        def __init__(self, config, log=None):
            super().__init__(config, log)
            self._split: dict[str, bool] = {}

        def _splits(self, module: str) -> bool:
            if module not in self._split:
                path = Path(config.rootpath, module)
                text = path.read_text(errors="replace") if path.is_file() else "scope='module'"
                self._split[module] = not shared.search(text) and any(
                    k.startswith(module + "::") for k in SLOWEST_S)
            return self._split[module]

        def _assign_work_unit(self, node) -> None:
            # the longest unit left, unless it mostly waits and so does what another worker runs or has next
            others = [scope for other in self.nodes if other is not node
                      for scope, done in self.assigned_work[other].items() if not all(done.values())]
            if any(u.split("::", 1)[0] in MOSTLY_WAITING for u in others):
                busy = next((u for u in self.workqueue if u.split("::", 1)[0] not in MOSTLY_WAITING), None)
                if busy is not None:
                    self.workqueue.move_to_end(busy, last=False)
            super()._assign_work_unit(node)

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return nodeid if self._splits(module) else module

        def schedule(self) -> None:
            # LoadScopeScheduling.schedule, with the units in the order of their estimated seconds
            if self.collection is not None:
                return super().schedule()
            if not self._check_nodes_have_same_collection():
                self.log("**Different tests collected, aborting run**")
                return
            collection = list(next(iter(self.registered_collections.values())))
            per_module: dict[str, int] = {}
            for nodeid in collection:
                module = nodeid.split("::", 1)[0]
                per_module[module] = per_module.get(module, 0) + 1

            def seconds(nodeid: str) -> float:
                module = nodeid.split("::", 1)[0]
                named = SLOWEST_S.get(nodeid.split("[", 1)[0])
                if named is not None:
                    return named / sum(1 for n in collection if n.split("[", 1)[0] == nodeid.split("[", 1)[0])
                if module in SLOWEST_S:
                    return SLOWEST_S[module] / per_module[module]
                return 0.1

            units: dict[str, dict[str, bool]] = {}
            for nodeid in collection:
                units.setdefault(self._split_scope(nodeid), {})[nodeid] = False
            cost = {scope: sum(seconds(n) for n in ids) for scope, ids in units.items()}
            self.collection = collection
            for scope in sorted(units, key=lambda u: -cost[u]):
                self.workqueue[scope] = units[scope]
            for node in self.nodes:
                if self.workqueue:
                    self._assign_work_unit(node)
            for node in self.nodes:
                self._reschedule(node)
            if not self.workqueue:
                for node in self.nodes:
                    node.shutdown()

    return LongestFirst(config, log)


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


@pytest.fixture(autouse=True)
def _test_thread_back_at_the_process_priority():
    """A test that drives a step loop's iterations on its own thread leaves that thread at its last step's CPU
    niceness, as the loop's thread is left between steps (zimage_common/cpu_priority.py): lowered after a batch
    job's step. Threads the next test starts would inherit it, and a test that checks niceness would see it."""
    yield
    cpu_priority = sys.modules.get("zimage_common.cpu_priority")
    if cpu_priority is not None:
        cpu_priority.run_as(cpu_priority.INTERACTIVE)


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
