"""Replica lifecycle edges (replicas.py, deployment_loras.py's resync of runtime adapters): a check of a process that
went away, close() and a dropped replica's check, re-registration racing registration and removal, a resync that
never answers. Fakes and a manual clock only: no Ray, no real sleeps."""

import asyncio

from conftest import tiny_config
from fakes import FakeNode, ManualClock, lost
from test_replicas import FakeBackend, FakeProcess, Recorder, run_for, settle

from orchestrator.deployment import Deployment
from orchestrator.replicas import ReplicaSet, ReplicaState
from zimage_common.config import DeploymentConfig
from zimage_common.errors import ReplicaHungError, ReplicaUnavailableError

LIVE, RECOVERING, FAILED, DROPPED = ReplicaState.LIVE, ReplicaState.RECOVERING, ReplicaState.FAILED, \
    ReplicaState.DROPPED


async def started_set(n=2, **cfg):
    clock = ManualClock()
    backend = FakeBackend(FakeNode("n0", "id0"), FakeNode("n1", "id1"))
    config = DeploymentConfig(**{"health_interval_s": 10, "health_timeout_s": 60, "start_timeout_s": 60, **cfg})
    rs = ReplicaSet(backend, config, clock, Recorder())
    for i in range(n):
        rs.add(FakeProcess(f"r{i}", backend.nodes[i % 2]))
    await asyncio.gather(*(rs.start_replica(rid) for rid in rs.replicas))
    return rs, list(rs.replicas.values()), backend, clock


# ---- a health check of the old process outlives its recovery ---------------------------------------------------
async def test_recovered_process_is_health_checked_and_not_reported_silent_because_of_the_old_ones_check():
    """r0's process hangs: its health check (timeout 60 s) never answers. The router sees a batch hang first and
    reports it; the kill lands, a new process loads and r0 is back at ~t=13. The new process must be checked every
    health_interval_s, and /readyz (not_answering) must not call it silent because of the check of the old, killed
    process (left in flight, m.check / m.check_since, it would last until it timed out at t=70)."""
    rs, (r0, r1), _, clock = await started_set(health_timeout_s=60)
    r0.check_mode = "hang"
    rs.start_health_checks()
    await settle()
    await run_for(clock, 10, step=10)  # t=10: r0's check hangs
    assert r0.checks == 1
    await run_for(clock, 2)  # t=12
    rs.report_failure("r0", ReplicaHungError("batch 3 ran 300s without a step"))
    r0.new_process()  # the kill landed: a fresh process answers start()
    r0.check_mode = "ok"
    await run_for(clock, 1)
    assert rs.state("r0") is LIVE and rs.health["r0"].pid == 1001
    await run_for(clock, 17)  # t=30: two check intervals (t=20, t=30) since it came back
    assert rs.not_answering(10) == [], "the new process is reported as not answering because of the old one's check"
    assert r0.checks >= 3, f"the new process was never health-checked (checks={r0.checks})"
    await rs.close()


async def test_close_cancels_the_hung_check_of_a_dropped_replica():
    """A replica whose check hangs is lost with its node and dropped. close() must stop every task the set
    started, the dropped replica's check (and its clock alarm) included, though it is no longer a member."""
    rs, (r0, r1), backend, clock = await started_set(health_timeout_s=60)
    r1.check_mode = "hang"
    rs.start_health_checks()
    await settle()
    await run_for(clock, 10, step=10)  # t=10: r1's check hangs
    backend.dead.add("id1")
    r1.restarting = True
    rs.report_failure("r1", lost())
    await settle()
    assert rs.state("r1") is DROPPED
    await rs.close()
    await settle()
    left = sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("zimage-") and not t.done())
    assert left == [], f"tasks left running after close(): {left}"


# ---- runtime LoRA registrations and a replica coming back ------------------------------------------------------
class LoraBackend(FakeBackend):
    """Replicas that hold runtime adapters per process (a new process starts with none) and answer ``call``;
    ``gates[rid]``: a future the replica's register_lora waits for (None: answers at once); ``hang_register``:
    the replica ids whose register_lora never answers."""

    def __init__(self, *nodes):
        super().__init__(*nodes)
        self.gates = {}
        self.hang_register = set()

    def make_replica(self, spec, encoder_host=None):
        r = super().make_replica(spec, encoder_host)
        r.held = {}  # pid -> adapter names that process holds
        backend = self

        async def call(method, *args, **kwargs):
            await asyncio.sleep(0)
            if r.restarting:
                raise ReplicaUnavailableError("the actor is restarting")
            held = r.held.setdefault(r.pid, set())
            if method == "register_lora":
                if r.replica_id in backend.hang_register:
                    await asyncio.get_running_loop().create_future()
                gate = backend.gates.get(r.replica_id)
                if gate is not None:
                    await gate
                held.add(args[0]["name"])
                return {"ok": True, "info": {"bytes": 1000}}
            if method == "unregister_lora":
                had = args[0] in held
                held.discard(args[0])
                return had
            if method == "loras":
                return [{"name": n, "rank": 4, "modules": [], "bytes": 1000, "resident": True} for n in held]
            raise AssertionError(method)

        r.call = call
        return r


def lora_config(tmp_path, **deployment):
    return tiny_config(tmp_path, model={"lora_max_resident": 2, "lora_dir": str(tmp_path)},
                       deployment={"replicas": 2, "health_interval_s": 3600, "start_timeout_s": 60, **deployment})


async def test_registration_racing_a_restart_reaches_the_replica_that_came_back(tmp_path):
    """r1 is restarting while adapter x is registered: its register call fails (unreachable: "it loads the adapter
    when it is back"). The new process loads while r0 is still loading x: before_live re-registers the runtime
    adapters it finds: it must wait for the registration in flight (x is added only once every replica answered),
    or r1 would go live without x, for good, and requests naming x would fail on r1."""
    backend = LoraBackend(FakeNode("n0", "id0"), FakeNode("n1", "id1"))
    clock = ManualClock()
    dep = await Deployment.start(lora_config(tmp_path), backend=backend, clock=clock)
    try:
        r1 = backend.made["r1"]
        r1.restarting = True
        dep.report_failure("r1", lost())
        assert dep.replica_set.state("r1") is RECOVERING
        backend.gates["r0"] = asyncio.get_running_loop().create_future()  # r0 takes a while to load x
        reg = asyncio.ensure_future(dep.register_lora("x", "x.safetensors"))
        await settle()
        r1.new_process()  # r1's restart lands while r0 is still loading x
        await run_for(clock, 1)  # (today r1 is live again here, having re-registered nothing)
        backend.gates["r0"].set_result(None)
        entry = await reg
        await run_for(clock, 1)
        assert "x" in dep.lora_names and dep.replica_set.state("r1") is LIVE
        assert "x" in r1.held.get(r1.pid, set()), (
            f"r1 is live without runtime adapter x (registered while it restarted): {entry['replicas']}")
    finally:
        await dep.shutdown()


async def test_restarted_replica_whose_lora_resync_hangs_does_not_stay_recovering_forever(tmp_path):
    """A new process loads but never answers the re-registration of a runtime adapter: the replica must not stay
    RECOVERING past deployment.start_timeout_s (admission keeps counting it, requests wait for it); the lifecycle
    says it is FAILED then."""
    backend = LoraBackend(FakeNode("n0", "id0"), FakeNode("n1", "id1"))
    clock = ManualClock()
    dep = await Deployment.start(lora_config(tmp_path, start_timeout_s=60), backend=backend, clock=clock)
    try:
        r1 = backend.made["r1"]
        await dep.register_lora("x", "x.safetensors")
        r1.restarting = True
        dep.report_failure("r1", lost())
        backend.hang_register.add("r1")  # the new process hangs loading x
        r1.new_process()
        await run_for(clock, 120, step=5)  # twice start_timeout_s
        assert dep.replica_set.state("r1") is not RECOVERING, \
            "r1 is still recovering 120 s on, past start_timeout_s = 60 s (before_live never timed out)"
    finally:
        await dep.shutdown()


async def test_removal_racing_a_restart_leaves_no_adapter_behind(tmp_path):
    """The other direction of the same race: r1 comes back and before_live is re-registering runtime adapter x when
    x is removed (DELETE /v1/loras/x). The removal must not reach r1's new process before the re-registration
    lands: r1 would keep an adapter the deployment no longer knows (its memory outside model.lora_max_runtime_bytes,
    never listed, never removed)."""
    backend = LoraBackend(FakeNode("n0", "id0"), FakeNode("n1", "id1"))
    clock = ManualClock()
    dep = await Deployment.start(lora_config(tmp_path), backend=backend, clock=clock)
    try:
        r1 = backend.made["r1"]
        await dep.register_lora("x", "x.safetensors")
        r1.restarting = True
        dep.report_failure("r1", lost())
        backend.gates["r1"] = asyncio.get_running_loop().create_future()  # the new process is slow to load x
        r1.new_process()
        await run_for(clock, 1)  # recovery: start() answered, before_live is re-registering x
        assert dep.replica_set.state("r1") is RECOVERING
        removal = asyncio.ensure_future(dep.unregister_lora("x"))
        await settle()
        backend.gates["r1"].set_result(None)
        await run_for(clock, 1)
        assert await removal is True
        assert dep.replica_set.state("r1") is LIVE and "x" not in dep.lora_names
        assert r1.held.get(r1.pid, set()) == set(), f"r1 still holds removed adapter(s) {r1.held[r1.pid]}"
    finally:
        await dep.shutdown()
