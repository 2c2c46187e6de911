"""The inventory's GPU memory probe asks NVML (no torch import, no CUDA context) and falls back to torch when NVML
cannot answer. Pure logic against a fake NVML module."""

import sys
import types

import pytest

from orchestrator.ray_backend import _nvml_memory_gib

GIB = 1024**3


class FakeNvml(types.ModuleType):
    nvmlMemory_v2 = "v2"

    def __init__(self, fail_init=False):
        super().__init__("fake_pynvml")
        self.fail_init, self.calls, self.open = fail_init, [], 0

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")
        self.open += 1

    def nvmlShutdown(self):
        self.open -= 1

    def nvmlDeviceGetHandleByIndex(self, i):
        self.calls.append(("index", i))
        return f"h{i}"

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.calls.append(("uuid", uuid))
        return uuid

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        assert version == "v2"  # v1 has no `reserved`, and its total is more than CUDA's
        return types.SimpleNamespace(total=int(79.6474609375 * GIB), reserved=int(0.46875 * GIB))


def install(monkeypatch, fake: FakeNvml) -> FakeNvml:
    """Put ``fake`` where the probe imports NVML from: the module table, and the parent package's attribute (once
    anything imported the real one, ``import a.b.c as m`` finds it there)."""
    import ray._private.thirdparty as parent

    monkeypatch.setitem(sys.modules, "ray._private.thirdparty.pynvml", fake)
    monkeypatch.setattr(parent, "pynvml", fake, raising=False)
    return fake


@pytest.fixture
def nvml(monkeypatch):
    import ray._private.thirdparty.pynvml  # noqa: F401 - the real one imported first, as Ray's GPU count does

    return install(monkeypatch, FakeNvml())


def test_nvml_total_less_reserved_is_cudas_total(nvml):
    # the numbers NVML and torch gave on one H100 80GB HBM3 (torch 2.11, 2026-11-27): 79.65 - 0.47 = torch's 79.18
    assert _nvml_memory_gib([3]) == pytest.approx(79.1787109375, abs=1e-6)
    assert nvml.calls == [("index", 3)] and nvml.open == 0  # shut down again


def test_nvml_takes_ray_uuids_too(nvml):
    _nvml_memory_gib(["GPU-5a1b", "GPU-77"])
    _nvml_memory_gib(["MIG-0c2d"])
    assert nvml.calls == [("uuid", "GPU-5a1b"), ("uuid", "MIG-0c2d")]


def test_no_gpu_or_no_nvml_is_none(monkeypatch, nvml):
    assert _nvml_memory_gib([]) is None and nvml.calls == []
    install(monkeypatch, FakeNvml(fail_init=True))
    assert _nvml_memory_gib([0]) is None  # the caller asks torch instead


@pytest.mark.ray
def test_drivers_own_node_is_probed_here_without_a_task(ray_cluster, monkeypatch, nvml):
    """The driver's node answers through NVML in the driver (no Ray task: no worker process to start), on the first
    GPU this process may use; where NVML cannot answer, a task on the node does, as for any other node."""
    from orchestrator import ray_backend

    (node,) = ray_backend.live_nodes()
    monkeypatch.setattr(ray_backend, "_probe_gpu_memory", None)  # a task would fail: none may run
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert ray_backend.probe_gpu_memory_gib(node) == pytest.approx(79.1787109375, abs=1e-6)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-77,GPU-5a1b")
    ray_backend.probe_gpu_memory_gib(node)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    ray_backend.probe_gpu_memory_gib(node)
    assert nvml.calls == [("index", 0), ("uuid", "GPU-77"), ("index", 2)]

    monkeypatch.undo()  # the real task, on a CPU machine's logical GPUs: NVML and CUDA absent there
    install(monkeypatch, FakeNvml(fail_init=True))
    assert ray_backend.probe_gpu_memory_gib(node) == ray_backend.LOGICAL_GPU_MEMORY_GIB
