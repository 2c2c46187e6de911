"""A replica pool shared by front doors (orchestrator/pool.py) on a fake cluster: the first front door creates the
replicas, later ones attach without loading anything, one leaving keeps the replicas for the others, a config that
shapes replicas differently is refused naming the sections, a front door arriving while another creates waits for
it, and a creator that died part-way is taken over. The Ray version: test_frontdoors.py."""

import asyncio
import time

import pytest
from conftest import tiny_config
from fakes import FakeNode, FakeReplica

from orchestrator.deployment import Deployment
from orchestrator.pool import pool_deployment_id, pool_namespace
from orchestrator.ray_pool import PoolRegistry
from zimage_common.errors import ConfigError
from zimage_common.messages import ReplicaHealth


class Registry:
    """``ray_pool.PoolRegistry`` (the actor's class) behind the async face front doors use."""

    def __init__(self):
        self.inner = PoolRegistry()

    async def get(self):
        return self.inner.get()

    async def claim_creation(self, owner, lease_s):
        return self.inner.claim_creation(owner, lease_s)

    async def publish(self, owner, record):
        return self.inner.publish(owner, record)


class PooledReplica(FakeReplica):
    """A handle on a named replica of the fake cluster; every handle on one name shares its process."""

    def __init__(self, spec, process):
        super().__init__(spec.replica_id, spec.max_pixels, spec.max_batch_tokens)
        self.node, self.spec, self.process = spec.node, spec, process

    async def start(self, timeout_s):
        if not self.process["loaded"]:
            await asyncio.sleep(0.01)
            self.process["loaded"] = True
            self.process["loads"] += 1
        return ReplicaHealth(self.replica_id, True, {}, "float32", pid=self.process["pid"])

    async def check(self):
        return 0.0

    async def health(self):
        return ReplicaHealth(self.replica_id, True, {}, "float32", pid=self.process["pid"])

    def kill(self, no_restart=False):
        pass

    def close(self):
        if self.spec.namespace is None:  # as RayReplica: a pooled replica outlives its front door
            self.process["ended"] = True


class Cluster:
    """The fake Ray cluster every front door of a test connects to: named replicas and pool registries."""

    def __init__(self, gpus=2):
        self.nodes = [FakeNode(f"n{i}", f"id{i}") for i in range(gpus)]
        self.processes = {}  # actor name -> its state
        self.registries = {}
        self.created = []  # names, in creation order
        self.gpu_wait_s = 0.0

    def backend(self):
        cluster = self

        class Backend:
            def connect(self, cfg):
                pass

            def live_nodes(self):
                return cluster.nodes

            def probe_gpu_memory_gib(self, node):
                return 24.0

            def node_alive(self, node_id):
                return True

            def make_replica(self, spec, encoder_host=None):
                name = f"{spec.namespace}/zimage-{spec.deployment_id}-{spec.replica_id}"
                if name not in cluster.processes:
                    cluster.processes[name] = {"loaded": False, "loads": 0, "pid": len(cluster.processes) + 1}
                    cluster.created.append(name)
                return PooledReplica(spec, cluster.processes[name])

            def pool_registry(self, namespace):
                return cluster.registries.setdefault(namespace, Registry())

            async def wait_for_gpus(self, n, timeout_s):
                await asyncio.sleep(cluster.gpu_wait_s)  # GPU pods joining
                return cluster.nodes

        return Backend()


def pooled(tmp_path, **sections):
    sections["cluster"] = {"address": "auto", "gpu_memory_gib": 24, **sections.get("cluster", {})}
    return tiny_config(tmp_path, frontdoor={"pool": "p1"}, **sections)


def test_later_front_doors_attach_to_the_loaded_replicas_and_one_leaving_keeps_them(tmp_path):
    async def go():
        cluster, cfg = Cluster(), pooled(tmp_path)
        a = await Deployment.start(cfg, backend=cluster.backend())
        b = await Deployment.start(cfg, backend=cluster.backend())
        assert a.deployment_id == b.deployment_id == pool_deployment_id("p1")
        assert len(cluster.created) == 2 and all(p["loads"] == 1 for p in cluster.processes.values())
        assert a.pool_record is b.pool_record and b.plan == a.plan
        assert all(s.namespace == pool_namespace("zimage", "p1") and s.control_slots > 0
                   for s in a.pool_record["specs"])
        ra, rb = await a.generate("a fox", seed=1), await b.generate("a cat", seed=2)
        assert ra[0].ok and rb[0].ok
        await a.shutdown()
        assert not any(p.get("ended") for p in cluster.processes.values())
        again = await Deployment.start(cfg, backend=cluster.backend())  # a front door restarted alone
        assert (await again.generate("a fox", seed=1))[0].ok
        assert len(cluster.created) == 2 and all(p["loads"] == 1 for p in cluster.processes.values())
        await b.shutdown()
        await again.shutdown()

    asyncio.run(go())


def test_a_front_door_whose_config_shapes_replicas_differently_is_refused(tmp_path):
    async def go():
        cluster = Cluster()
        a = await Deployment.start(pooled(tmp_path), backend=cluster.backend())
        with pytest.raises(ConfigError, match=r"pool 'p1' \(frontdoor.pool\) was created by .* another config: "
                                              r"router differ.*zimage-orch pool down"):
            await Deployment.start(pooled(tmp_path, router={"max_batch_size": 2}), backend=cluster.backend())
        ok = await Deployment.start(pooled(tmp_path, router={"queue_limit": 9}), backend=cluster.backend())
        await ok.shutdown()
        await a.shutdown()

    asyncio.run(go())


def test_a_front_door_waits_while_another_creates_and_takes_over_from_one_that_died(tmp_path):
    async def go():
        cluster = Cluster()
        cfg = pooled(tmp_path)
        registry = cluster.backend().pool_registry(pool_namespace("zimage", "p1"))
        assert registry.inner.claim_creation("someone-else", lease_s=0.3)  # creating, or dead: we cannot tell yet
        t0 = time.monotonic()
        dep = await Deployment.start(cfg, backend=cluster.backend())
        assert time.monotonic() - t0 >= 0.25  # waited out the lease, then created the pool itself
        assert dep.pool_record["created_by"] != "someone-else" and len(cluster.created) == 2
        await dep.shutdown()

    asyncio.run(go())


def test_a_creator_waiting_long_for_gpus_keeps_its_lease_and_the_others_attach(tmp_path, monkeypatch):
    import orchestrator.pool as pool

    monkeypatch.setattr(pool, "CREATE_LEASE_S", 0.2)
    monkeypatch.setattr(pool, "RENEW_S", 0.05)

    async def go():
        cluster = Cluster()
        cluster.gpu_wait_s = 0.8  # four leases long
        cfg = pooled(tmp_path, cluster={"wait_for_gpus": 2})
        first = asyncio.ensure_future(Deployment.start(cfg, backend=cluster.backend()))
        await asyncio.sleep(0.05)
        second = await Deployment.start(cfg, backend=cluster.backend())
        first = await first
        assert first.pool_record is second.pool_record  # one creator; the other attached
        assert len(cluster.created) == 2 and all(p["loads"] == 1 for p in cluster.processes.values())
        await first.shutdown()
        await second.shutdown()

    asyncio.run(go())
