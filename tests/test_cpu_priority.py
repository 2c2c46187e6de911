"""Batch-job work at a lower CPU priority (zimage_common/cpu_priority.py) where a replica runs it: the stage threads
(their queues and their niceness), the step loop, the image encoders, the prompt encodes shared between calls, and
the local Ray's workers at the driver's niceness. Fakes and plain threads; no model, no wall-clock assertions."""

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from zimage_common import cpu_priority
from zimage_common.cpu_priority import WORK_PRIORITY, can_restore, job_nice, lower_this_thread, run_as
from zimage_common.messages import BATCH_JOB, INTERACTIVE, ImageRequest

linux = pytest.mark.skipif(not cpu_priority.supported(), reason="thread niceness is Linux's")
restorable = pytest.mark.skipif(not (cpu_priority.supported() and can_restore()),
                                reason="a lowered thread cannot be raised back here (no CAP_SYS_NICE)")


def nice_here() -> int:
    """The calling thread's niceness (Linux: a thread id names that thread alone)."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def on_thread(fn):
    """``fn()`` on a fresh thread (what it does to its thread's niceness stays there)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result(timeout=30)


BASE = os.getpriority(os.PRIO_PROCESS, os.getpid()) if cpu_priority.supported() else 0


@linux
def test_a_job_only_thread_is_lowered_for_good_and_no_other_thread_is():
    def lowered():
        assert lower_this_thread()
        return nice_here()

    assert on_thread(lowered) == job_nice() == min(19, BASE + cpu_priority.JOB_NICE)
    assert nice_here() == BASE and os.getpriority(os.PRIO_PROCESS, os.getpid()) == BASE


@restorable
def test_a_shared_thread_takes_the_priority_of_the_work_it_runs():
    def steps():
        seen = []
        for p in (BATCH_JOB, BATCH_JOB, INTERACTIVE, BATCH_JOB, INTERACTIVE):
            run_as(p)
            seen.append(nice_here())
        return seen

    j = job_nice()
    assert on_thread(steps) == [j, j, BASE, j, BASE]


def test_where_a_lowered_thread_cannot_come_back_a_shared_one_is_never_lowered(monkeypatch):
    monkeypatch.setattr(cpu_priority, "_restore", False)

    def job_step():
        run_as(BATCH_JOB)
        return nice_here() if cpu_priority.supported() else BASE

    assert on_thread(job_step) == BASE


# ---- the stage threads ---------------------------------------------------------------------------------------------
@restorable
def test_a_stage_runs_waiting_calls_most_urgent_first_each_at_its_priority():
    """While the decode thread is busy, a job's decode and then an interactive one queue: the interactive one runs
    first, at the process's niceness, the job's after it, lowered; the thread is back up for the next one."""
    from actors.stages import StageThreads

    stages = StageThreads("p")
    try:
        gate, order = threading.Event(), []
        busy = stages.submit("decode", gate.wait, 10)

        def queue(name, priority):
            token = WORK_PRIORITY.set(priority)
            try:
                return stages.submit("decode", lambda: order.append((name, nice_here())))
            finally:
                WORK_PRIORITY.reset(token)

        done = [queue("job", BATCH_JOB), queue("live", INTERACTIVE), queue("job2", BATCH_JOB)]
        gate.set()
        for f in [busy, *done]:
            f.result(timeout=10)
        stages.run("decode", lambda: order.append(("after", nice_here())))
        j = job_nice()
        assert order == [("live", BASE), ("job", j), ("job2", j), ("after", BASE)]
    finally:
        stages.close()


# ---- the step loop -------------------------------------------------------------------------------------------------
@restorable
def test_the_loop_steps_job_only_sets_lowered_and_interactive_ones_at_the_process_priority():
    """The loop's thread runs a step of batch-job samples alone at job niceness, a step with an interactive sample
    (the job's parked) at the process's, and a caller's thread is back up when ``run_alone`` returns."""
    import torch

    from actors.steploop import Group, RunningSample, StepLoop

    loop = StepLoop(engine=SimpleNamespace(devices={"transformer": torch.device("cpu")}))
    seen = []

    def step(running):
        seen.append(([s.name for s in running], nice_here()))
        for s in running:
            s.step += 1

    loop._step = step
    t = torch.zeros(1)

    def group(name, steps, priority):
        return Group([RunningSample(name, 1, t, t, None, 0.0, None, steps, priority=priority)])

    def run():
        job = group("job", 3, BATCH_JOB)
        loop.submit(job, start=False)
        loop._guarded(wait=False)
        loop.run_alone(group("live", 1, INTERACTIVE))
        while not job.done.is_set():
            loop._guarded(wait=False)
        loop.run_alone(group("job2", 1, BATCH_JOB))
        return nice_here()

    after = on_thread(run)
    j = job_nice()
    assert seen == [(["job"], j), (["live"], BASE), (["job"], j), (["job"], j), (["job2"], j)] and after == BASE


# ---- the replica's image encoders and shared prompt encodes ---------------------------------------------------------
@linux
def test_a_jobs_images_are_encoded_on_lowered_threads_and_interactive_ones_are_not(monkeypatch):
    from actors import encoder_pool
    from actors.encoder_pool import EncoderPool
    from zimage_common.messages import ImageResult

    niceness = {}

    def encode(image, fmt, compression):
        niceness[int(image[0, 0, 0])] = nice_here()
        return b"png"

    monkeypatch.setattr(encoder_pool, "encode_image", encode)
    pool = EncoderPool(2)
    try:
        reqs = {f"r{i}": ImageRequest(f"r{i}", "p", i, 8, 8, 2, 0.0, priority=p, output_format="png")
                for i, p in enumerate((INTERACTIVE, BATCH_JOB, INTERACTIVE, BATCH_JOB))}
        results = [ImageResult(request_id=rid, ok=True, image=np.full((8, 8, 3), i, np.uint8))
                   for i, rid in enumerate(reqs)]
        out = pool.encode_results(results, reqs)
    finally:
        pool.close()
    assert all(r.encoded is not None for r in out)
    assert niceness == {0: BASE, 1: job_nice(), 2: BASE, 3: job_nice()}


@restorable
def test_a_shared_prompt_encode_runs_at_the_most_urgent_waiting_calls_priority():
    """Calls' prompts that wait together are encoded at once: with an interactive call's among them the encode is
    not lowered, even when a job's call queued the drain."""
    from actors.serving import SharedEncodes
    from actors.stages import StageThreads

    seen = []

    def encode_stage(prompts, negatives, guidance):
        seen.append((list(prompts), nice_here()))
        return SimpleNamespace(positive=list(prompts), negative=[]), 0.0

    stages = StageThreads("e")
    try:
        enc = SharedEncodes(stages, SimpleNamespace(encode_stage=encode_stage))
        gate = threading.Event()
        stages.submit("encode", gate.wait, 10)  # both calls wait for the encode thread

        def call(prompt, priority):
            WORK_PRIORITY.set(priority)
            return enc([prompt], [None], [0.0])

        with ThreadPoolExecutor(2) as pool:
            job = pool.submit(call, "job", BATCH_JOB)
            while not enc._waiting:
                threading.Event().wait(0.005)
            live = pool.submit(call, "live", INTERACTIVE)
            while len(enc._waiting) < 2:
                threading.Event().wait(0.005)
            gate.set()
            job.result(timeout=10), live.result(timeout=10)
        stages.run("encode", lambda: None)
        alone = threading.Thread(target=call, args=("job alone", BATCH_JOB))
        alone.start()
        alone.join(10)
    finally:
        stages.close()
    assert seen == [(["job", "live"], BASE), (["job alone"], job_nice())]


# ---- the local Ray --------------------------------------------------------------------------------------------------
def test_a_local_ray_starts_its_workers_at_the_drivers_niceness(monkeypatch):
    """Ray's default starts workers 15 steps nicer than the driver: replicas would lose every core to the front door,
    and a job's lowered work would have no room below them."""
    from orchestrator import ray_backend
    from zimage_common.cluster_config import ClusterConfig

    calls = []
    monkeypatch.setattr(ray_backend.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_backend.ray, "init", lambda **kw: calls.append(kw))
    ray_backend.connect(ClusterConfig(num_cpus=2, num_gpus=0))
    ray_backend.connect(ClusterConfig(address="auto"))
    assert calls[0]["address"] == "local" and calls[0]["_system_config"] == {"worker_niceness": 0}
    assert calls[1]["address"] == "auto" and "_system_config" not in calls[1]  # a running cluster's own setting


# ---- a job's records and output in the front door ------------------------------------------------------------------
@linux
def test_a_jobs_records_and_output_are_written_on_a_lowered_thread_never_ahead_of_the_database(tmp_path):
    """The job runner's records and output lines are made and written on a thread of the job's own, at batch-job
    niceness, off the event loop; every output line written is committed in the database first, and each line's
    JSON text is the same in both."""
    import asyncio

    from orchestrator.batch_db import JobDB
    from orchestrator.batch_input import Line
    from orchestrator.batches import JobRunner
    from zimage_common.config import load_config
    from zimage_common.messages import ImageResult

    config = load_config(None, [])
    db = JobDB(tmp_path / "jobs.db")

    class Dep:
        def admit(self, requests):
            async def done(r):
                await asyncio.sleep(0)
                return ImageResult(request_id=r.request_id, ok=True, seed=r.seed, width=r.width, height=r.height)

            return [done(r) for r in requests]

    class Sink:
        def __init__(self):
            self.lines, self.threads = [], set()

        async def store(self, line, call, results):
            return [{"b64_json": "aW1n"} for _ in results]

        def append(self, lines):
            self.threads.add((threading.get_ident(), nice_here()))
            committed = set(JobDB(tmp_path / "jobs.db").records("b1"))  # a second connection sees commits only
            assert set(lines) <= committed
            self.lines += lines

    sink = Sink()
    runner = JobRunner(Dep(), config, db, "b1", sink, window=4)
    lines = [Line(i + 1, f"c{i}", "/v1/images/generations", {"prompt": f"p{i}", "seed": i}) for i in range(12)]

    async def run():
        loop_thread = threading.get_ident()
        assert await runner.run(lines)
        return loop_thread

    loop_thread = asyncio.run(run())
    assert sorted(sink.lines) == sorted(db.records("b1")) and len(sink.lines) == 12
    assert all(tid != loop_thread and nice == job_nice() for tid, nice in sink.threads)
