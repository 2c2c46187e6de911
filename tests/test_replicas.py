"""The replica set's lifecycle with a fake backend and a manual clock (no Ray, milliseconds): a replica that dies
and comes back, the old process answering during a restart, node loss, a replica that never comes back,
concurrent health checks and recycling after N failed checks in a row; and a whole Deployment on the fake
backend."""

import asyncio

import pytest
from conftest import tiny_config
from fakes import FakeNode, FakeReplica, ManualClock, lost

from orchestrator.deployment import Deployment
from orchestrator.replicas import OLD_PROCESS_GRACE_S, ReplicaSet, ReplicaState
from orchestrator.router import STEP_QUEUE_DEPTH, RouterObserver
from zimage_common.config import DeploymentConfig, config_from_dict
from zimage_common.errors import ConfigError, NotReadyError, ReplicaError, ReplicaHungError, ReplicaUnavailableError
from zimage_common.messages import ReplicaHealth

LIVE, RECOVERING, FAILED, DROPPED = ReplicaState.LIVE, ReplicaState.RECOVERING, ReplicaState.FAILED, \
    ReplicaState.DROPPED


# ---- fakes ---------------------------------------------------------------------------------------------------
class FakeProcess(FakeReplica):
    """A replica handle whose process the test controls: its pid, a restart in progress, how checks behave."""

    def __init__(self, replica_id, node, max_pixels=1 << 40, max_batch_tokens=1 << 40):
        super().__init__(replica_id, max_pixels, max_batch_tokens)
        self.node = node
        self.pid = 1000
        self.restarting = False  # start() raises ReplicaUnavailableError, as Ray does while it restarts an actor
        self.start_error = None  # or start() raises this
        self.check_mode = "ok"  # ok | fail (the check raises) | hang (never answers) | gone (process unreachable)
        self.starts = 0
        self.checks = 0
        self.kills = []
        self.closed = False
        self.start_log = None  # a list shared by the fakes of one backend: the order of first starts
        self._hung = []

    async def start(self, timeout_s):
        self.starts += 1
        if self.start_log is not None and self.starts == 1:
            self.start_log.append(("begin", self.replica_id))
        await asyncio.sleep(0)
        if self.start_error is not None:
            raise self.start_error
        if self.restarting:
            raise ReplicaUnavailableError("the actor is restarting")
        if self.start_log is not None and self.starts == 1:
            self.start_log.append(("ready", self.replica_id))
        return ReplicaHealth(self.replica_id, True, {}, "float32", pid=self.pid)

    async def check(self):
        self.checks += 1
        if self.check_mode == "hang":
            fut = asyncio.get_running_loop().create_future()
            self._hung.append(fut)
            return await fut
        if self.check_mode == "fail":
            raise ReplicaError("health forward produced non-finite values")
        if self.check_mode == "gone":
            raise ReplicaUnavailableError("the actor died unexpectedly")
        return 0.01

    def answer_hung_checks(self, error):
        for f in self._hung:
            if not f.done():
                f.set_exception(error)
        self._hung.clear()

    async def health(self):
        return ReplicaHealth(self.replica_id, True, {}, "float32", pid=self.pid)

    def kill(self, no_restart=False):
        self.kills.append(no_restart)

    def new_process(self):
        """The backend's restart lands: a fresh process answers."""
        self.pid += 1
        self.restarting = False

    def close(self):
        self.closed = True


class FakeBackend:
    def __init__(self, *nodes):
        self.nodes = list(nodes)
        self.dead = set()
        self.made = {}
        self.encoder_hosts = {}
        self.start_log = []

    def connect(self, cluster):
        pass

    def live_nodes(self):
        return [n for n in self.nodes if n.node_id not in self.dead]

    def probe_gpu_memory_gib(self, node):
        return 24.0

    def node_alive(self, node_id):
        return node_id not in self.dead

    def make_replica(self, spec, encoder_host=None):
        r = FakeProcess(spec.replica_id, spec.node, spec.max_pixels, spec.max_batch_tokens)
        r.spec, r.start_log = spec, self.start_log
        self.made[spec.replica_id] = r
        self.encoder_hosts[spec.replica_id] = encoder_host
        return r


class Recorder(RouterObserver):
    def __init__(self):
        self.replica_events = []

    def replica_event(self, replica_id, event):
        self.replica_events.append((replica_id, event))


async def settle(n=20):
    for _ in range(n):
        await asyncio.sleep(0)


async def run_for(clock, seconds, step=0.5):
    """Move the manual clock on by ``seconds`` in steps, letting the woken tasks run after each."""
    for _ in range(round(seconds / step)):
        await clock.advance(step)
        await settle()


async def started_set(n=2, **cfg):
    clock = ManualClock()
    backend = FakeBackend(FakeNode("n0", "id0"), FakeNode("n1", "id1"))
    config = DeploymentConfig(**{"health_interval_s": 10, "health_timeout_s": 5, "start_timeout_s": 60, **cfg})
    changes = []
    rs = ReplicaSet(backend, config, clock, Recorder(), on_change=lambda *a: changes.append(a[:2]))
    for i in range(n):
        rs.add(FakeProcess(f"r{i}", backend.nodes[i % 2]))
    await asyncio.gather(*(rs.start_replica(rid) for rid in rs.replicas))
    return rs, list(rs.replicas.values()), backend, clock, changes


def what(rs, replica_id):
    return [w.split(":")[0] for _, rid, w in rs.events if rid == replica_id]


# ---- recovery ------------------------------------------------------------------------------------------------
async def test_lost_replica_waits_for_its_restart_then_is_back():
    rs, (r0, r1), _, clock, changes = await started_set()
    r0.restarting = True
    rs.report_failure("r0", lost())
    assert rs.state("r0") is RECOVERING and rs.live() == [r1] and rs.members() == [r0, r1]
    assert r0.kills == []  # a lost process is already gone: nothing to kill
    await run_for(clock, 5)
    assert rs.state("r0") is RECOVERING and r0.starts > 5  # still asking, every RETRY_S
    r0.new_process()
    await run_for(clock, 1)
    assert rs.state("r0") is LIVE and rs.live() == [r0, r1]
    assert rs.health["r0"].pid == 1001
    assert what(rs, "r0") == ["lost", "back"] and rs.observer.replica_events == [("r0", "lost"), ("r0", "back")]
    assert changes == [("r0", RECOVERING), ("r0", LIVE)]


async def test_hung_replica_is_killed_and_its_old_process_answering_does_not_count_as_back():
    rs, (r0, _), _, clock, _ = await started_set()
    rs.report_failure("r0", ReplicaHungError("batch 7 ran 300s"))
    assert r0.kills == [False]  # killed so that the backend restarts it fresh
    # The kill has not landed: the old process (same pid) keeps answering start() at once.
    await run_for(clock, OLD_PROCESS_GRACE_S - 1)
    assert rs.state("r0") is RECOVERING and r0.starts > 10
    r0.new_process()
    await run_for(clock, 1)
    assert rs.state("r0") is LIVE and rs.health["r0"].pid == 1001
    assert what(rs, "r0") == ["hung", "back"]


async def test_old_process_answering_past_the_grace_counts_as_back():
    """An error that was transient after all (the process never went away) does not keep the replica out."""
    rs, (r0, _), _, clock, _ = await started_set()  # the clock starts at 0.0
    rs.report_failure("r0", lost())
    await settle()  # the old process answers at once, at t=0
    await run_for(clock, OLD_PROCESS_GRACE_S - 0.5)
    assert rs.state("r0") is RECOVERING
    await run_for(clock, 0.5)  # the grace counts from that first answer
    assert rs.state("r0") is LIVE and rs.health["r0"].pid == 1000


async def test_node_loss_drops_the_replica():
    rs, (r0, r1), backend, clock, changes = await started_set()
    backend.dead.add("id1")
    r1.restarting = True
    rs.report_failure("r1", lost())
    await settle()
    assert rs.state("r1") is DROPPED and r1.closed
    assert list(rs.replicas) == ["r0"] and rs.members() == [r0] and rs.live() == [r0]
    assert rs.events[-1][1:] == ("r1", "dropped: its node n1 left the cluster")
    assert changes[-1] == ("r1", DROPPED)
    rs.report_failure("r1", lost())  # a late report about a dropped replica is ignored
    await run_for(clock, 5)
    assert what(rs, "r1") == ["lost", "dropped"] and r1.starts == 1  # never asked to start again


async def test_replica_that_never_comes_back_fails_after_start_timeout():
    rs, (r0, r1), _, clock, changes = await started_set(start_timeout_s=60)
    r0.restarting = True  # forever
    rs.report_failure("r0", lost())
    await run_for(clock, 59)
    assert rs.state("r0") is RECOVERING
    await run_for(clock, 2)
    assert rs.state("r0") is FAILED
    assert rs.live() == [r1] and rs.members() == [r0, r1]  # still a member: requests may wait for it
    assert rs.events[-1][2] == "failed: no new process within deployment.start_timeout_s"
    starts = r0.starts
    rs.report_failure("r0", lost())
    await run_for(clock, 10)
    assert r0.starts == starts and what(rs, "r0") == ["lost", "failed"]  # given up: no more attempts
    assert changes[-1] == ("r0", FAILED)


async def test_restart_that_raises_a_real_error_fails_at_once():
    rs, (r0, _), _, clock, _ = await started_set()
    r0.start_error = ReplicaError("model weights not found")
    rs.report_failure("r0", lost())
    await settle()
    assert rs.state("r0") is FAILED and "model weights not found" in rs.events[-1][2]


async def test_slow_restart_is_waited_for():
    rs, (r0, _), _, clock, _ = await started_set()
    r0.start_error = NotReadyError("did not become ready within 20s")
    rs.report_failure("r0", lost())
    await run_for(clock, 30)
    assert rs.state("r0") is RECOVERING
    r0.start_error = None
    r0.new_process()
    await run_for(clock, 1)
    assert rs.state("r0") is LIVE


async def test_failure_reports_count_only_for_live_replicas():
    rs, (r0, _), _, clock, _ = await started_set()
    r0.restarting = True
    rs.report_failure("r0", lost())
    rs.report_failure("r0", ReplicaHungError("late hang report"))  # already recovering
    rs.report_failure("nope", lost())  # not a replica of this set
    await settle()
    assert what(rs, "r0") == ["lost"] and r0.kills == []


# ---- health checks -------------------------------------------------------------------------------------------
async def test_health_checks_run_concurrently_one_in_flight_per_replica():
    rs, (r0, r1, r2), _, clock, _ = await started_set(3, health_timeout_s=25)
    r0.check_mode = "hang"
    rs.start_health_checks()
    await settle()  # the loop is waiting out its first interval from t=0
    await run_for(clock, 10, step=10)
    assert (r0.checks, r1.checks, r2.checks) == (1, 1, 1)  # all at once: none waits for the hung one
    await run_for(clock, 10, step=10)  # t=20: r0's first check is still in flight (its timeout is 25 s)
    assert (r0.checks, r1.checks, r2.checks) == (1, 2, 2)
    assert rs.consecutive_failures("r0") == 0
    await run_for(clock, 20, step=5)  # t=35: r0's check timed out; t=40: a new one started
    assert rs.consecutive_failures("r0") == 1 and rs.state("r0") is LIVE
    assert (r0.checks, r1.checks, r2.checks) == (2, 4, 4)
    await rs.close()


async def test_a_replica_that_stops_answering_is_reported_before_its_checks_time_out():
    rs, (r0, r1), _, clock, _ = await started_set(2, health_timeout_s=60)
    r0.check_mode = "hang"  # its interpreter held: the check never comes back
    rs.start_health_checks()
    await settle()
    await run_for(clock, 10, step=10)  # t=10: both checks started, r1's answered
    assert rs.not_answering(5) == []
    await run_for(clock, 6, step=2)  # t=16: r0's check has waited 6 s
    assert rs.not_answering(5) == ["r0"] and rs.state("r0") is LIVE  # long before its 60 s timeout recycles it
    r0.answer_hung_checks(ReplicaError("answered at last"))
    await settle()
    assert rs.not_answering(5) == []
    await rs.close()


@pytest.mark.parametrize("mode", ["fail", "hang"])
async def test_replica_is_recycled_only_after_n_failed_checks_in_a_row(mode):
    rs, (r0, r1), _, clock, _ = await started_set(health_failures_before_restart=3)
    rs.start_health_checks()
    await settle()  # the loop is waiting out its first interval from t=0
    r0.check_mode = mode
    await run_for(clock, 20)  # checks at t=10 and 20 fail (a hung one times out 5 s later)
    r0.check_mode = "ok"
    await run_for(clock, 10)  # t=30: passes
    assert rs.consecutive_failures("r0") == 0 and rs.state("r0") is LIVE
    r0.answer_hung_checks(RuntimeError("never mind"))
    r0.check_mode = mode
    await run_for(clock, 29)  # t=59: two more failed in a row
    assert rs.state("r0") is LIVE and rs.consecutive_failures("r0") == 2 and r0.kills == []
    await run_for(clock, 7)  # t=66: the third
    assert rs.state("r0") is RECOVERING and r0.kills == [False]
    assert rs.live() == [r1]
    (_, _, event), = [e for e in rs.events if e[1] == "r0"]
    assert event.startswith("hung: 3 health check(s) in a row failed, the last: health check ")
    await rs.close()


async def test_unreachable_process_is_taken_out_at_the_first_check():
    rs, (r0, r1), _, clock, _ = await started_set(health_failures_before_restart=3)
    r0.check_mode = "gone"
    r0.restarting = True
    rs.start_health_checks()
    await settle()  # the loop is waiting out its first interval from t=0
    await run_for(clock, 10)
    assert rs.state("r0") is RECOVERING and what(rs, "r0") == ["lost"] and r0.kills == []
    await rs.close()


async def test_late_check_result_about_the_old_process_is_ignored():
    rs, (r0, _), _, clock, _ = await started_set(health_failures_before_restart=1,
                                                               health_timeout_s=30)
    r0.check_mode = "hang"
    rs.start_health_checks()
    await settle()  # the loop is waiting out its first interval from t=0
    await run_for(clock, 10)  # a check of the old process is in flight
    r0.restarting = True
    rs.report_failure("r0", lost())  # the router saw it die
    r0.new_process()
    r0.check_mode = "ok"
    await run_for(clock, 1)
    assert rs.state("r0") is LIVE
    r0.answer_hung_checks(ReplicaError("late failure from the old process"))
    await settle()
    assert rs.state("r0") is LIVE and rs.consecutive_failures("r0") == 0  # with N=1 it would have been recycled
    await run_for(clock, 10)  # and the new process gets checked again
    assert r0.checks == 2 and rs.state("r0") is LIVE
    await rs.close()


async def test_close_stops_checks_and_recoveries_and_closes_every_replica():
    rs, (r0, r1), _, clock, _ = await started_set()
    r0.restarting = True
    r1.check_mode = "hang"
    rs.start_health_checks()
    await settle()  # the loop is waiting out its first interval from t=0
    rs.report_failure("r0", lost())
    await run_for(clock, 10)
    await rs.close()
    assert r0.closed and r1.closed
    starts = r0.starts
    await run_for(clock, 30)
    assert r0.starts == starts and r1.checks == 1
    rs.report_failure("r1", lost())
    assert rs.state("r1") is LIVE  # nothing is recovered after close


def test_health_failures_before_restart_is_validated():
    assert DeploymentConfig().health_failures_before_restart == 3
    with pytest.raises(ConfigError, match="deployment.health_failures_before_restart"):
        config_from_dict({"deployment": {"health_failures_before_restart": 0}})


# ---- a whole deployment on the fake backend ------------------------------------------------------------------
async def drive(clock, aw, step=0.05, limit=2000):
    """Await ``aw`` while the manual clock moves on (the router waits out max_wait_ms on it)."""
    task = asyncio.ensure_future(aw)
    for _ in range(limit):
        if task.done():
            return task.result()
        await clock.advance(step)
        await settle()
    raise AssertionError("still not done")


async def test_deployment_on_a_fake_backend_recovers_and_drops(tmp_path):
    backend = FakeBackend(FakeNode("n0", "id0"), FakeNode("n1", "id1"))
    clock = ManualClock()
    cfg = tiny_config(tmp_path, router={"max_attempts": 4})
    dep = await Deployment.start(cfg, backend=backend, clock=clock)
    assert sorted(r.node for r in dep.plan.replicas) == ["n0", "n1"]
    r0, r1 = backend.made["r0"], backend.made["r1"]
    assert dep.replicas == {"r0": r0, "r1": r1} and dep.live() == [r0, r1]
    # two running sets' worth of calls (max_batch_size 4) for interactive work and as many for a batch job's, a slot
    # for health checks and one for cancels
    assert r0.spec.warmup_sizes[0] == (64, 64) and r0.spec.max_concurrency == 2 * STEP_QUEUE_DEPTH * 4 + 2

    r0.fail_with, r0.restarting = lost(), True  # r0 dies under its next batch
    results = await drive(clock, dep.generate([f"a{i}" for i in range(8)], seed=1))
    assert all(r.ok for r in results) and {r.replica_id for r in results} == {"r1"}
    assert dep.replica_set.state("r0") is RECOVERING and dep.members() == [r0, r1]
    assert (await dep.replica_health())["r0"] == "down"
    r0.fail_with = None
    r0.new_process()
    await run_for(clock, 1)
    assert dep.live() == [r0, r1]

    backend.dead.add("id1")  # r1's node leaves under load
    r1.fail_with, r1.restarting = lost(), True
    results = await drive(clock, dep.generate([f"b{i}" for i in range(8)], seed=2))
    assert all(r.ok for r in results) and {r.replica_id for r in results} == {"r0"}
    assert list(dep.replicas) == ["r0"] and [r.replica_id for r in dep.plan.replicas] == ["r0"]
    assert {g.node for g in dep.plan.gpus} == {"n0"}
    assert dep.plan.notes[-1] == "r1 dropped: its node n1 left the cluster"
    assert [w.split(":")[0] for _, _, w in dep.events] == ["lost", "back", "lost", "dropped"]
    await dep.shutdown()
    assert r0.closed and r1.closed


async def test_deployment_starts_shared_encoder_hosts_first(tmp_path):
    backend = FakeBackend(FakeNode("n0", "id0", gpus=3))
    cfg = tiny_config(tmp_path, deployment={"mode": "shared-encoder", "replicas": 3})
    dep = await Deployment.start(cfg, backend=backend, clock=ManualClock())
    assert backend.encoder_hosts == {"r0": None, "r1": backend.made["r0"], "r2": backend.made["r0"]}
    assert backend.start_log.index(("ready", "r0")) < backend.start_log.index(("begin", "r1"))
    # its calls, checks and cancels, and one slot for each of its two borrowers' encodes
    assert backend.made["r0"].spec.max_concurrency == 2 * STEP_QUEUE_DEPTH * 4 + 2 + 2
    await dep.shutdown()


async def test_deployment_that_fails_to_start_closes_what_it_made(tmp_path):
    class Broken(FakeBackend):
        def make_replica(self, spec, encoder_host=None):
            r = super().make_replica(spec, encoder_host)
            if spec.replica_id == "r1":
                r.start_error = NotReadyError("no GPU free")
            return r

    backend = Broken(FakeNode("n0", "id0"), FakeNode("n1", "id1"))
    with pytest.raises(NotReadyError, match="no GPU free"):
        await Deployment.start(tiny_config(tmp_path), backend=backend, clock=ManualClock())
    assert all(r.closed for r in backend.made.values())
