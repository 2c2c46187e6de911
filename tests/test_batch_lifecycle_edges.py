"""Batch job lifecycle edges (batches.py, batch_api.py): output writes that fail mid-run and at the end, jobs created
in one second, a stop while the window holds only unstarted lines, a job whose window passed before its turn."""

import itertools
import json
import time

import httpx
from batch_fakes import TimedBackend
from test_batch_edge_cases import create as raw_create
from test_batch_edge_cases import wait_end
from test_batches_http import GEN, jsonl, req, serve, upload

from orchestrator import batch_api
from orchestrator.batches import OutputFile


def create(s, fid, **extra):
    r = raw_create(s, fid, **extra)
    assert r.status_code == 200, r.text
    return r.json()


def content(s, fid) -> list[dict]:
    r = httpx.get(f"{s.url}/v1/files/{fid}/content")
    assert r.status_code == 200, r.text
    return [json.loads(x) for x in r.text.splitlines()]


def fail_first_output_write(monkeypatch) -> dict:
    """``OutputFile.append`` raises once (a full disk for a moment), then writes; returns its call count."""
    real = OutputFile.append
    calls = {"n": 0}

    def append(self, lines):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        return real(self, lines)

    monkeypatch.setattr(OutputFile, "append", append)
    return calls


# ---- a failed write of the output file --------------------------------------------------------------------------
def test_a_failed_periodic_output_write_loses_no_committed_line(tmp_path, monkeypatch):
    """The periodic flush commits the recorded outcomes, then appends them to the output file; when the append fails
    (a full disk for a moment) it logs "retrying"; the lines are committed and counted, so the output file the job
    ends with must hold them (rebuilt from the database), not miss them."""
    calls = fail_first_output_write(monkeypatch)
    # the bad line fails at once (recorded before the first periodic flush); the rest take a few flushes to finish
    lines = [req("bad", prompt="x", size="100x64")] + [req(f"r{i}", prompt=f"p{i}", seed=i) for i in range(6)]
    with serve(tmp_path, TimedBackend(2, base_s=0.3)) as s:
        s.wait_ready(timeout_s=30)
        b = wait_end(s, create(s, upload(s, jsonl(*lines)).json()["id"])["id"])
        assert calls["n"] >= 2  # the failed write, then later ones that succeeded
        assert b["status"] == "completed", b
        assert b["request_counts"] == {"total": 7, "completed": 6, "failed": 1}, b
        out = content(s, b["output_file_id"])
        assert sorted(x["custom_id"] for x in out) == sorted(x["custom_id"] for x in lines), out


# ---- one job at a time, in creation order -----------------------------------------------------------------------
def test_jobs_created_in_the_same_second_run_and_list_in_creation_order(tmp_path, monkeypatch):
    """README: "Jobs run one at a time, in the order they were created"; GET /v1/batches lists newest first.
    created_at is whole seconds and the id is random (uuid4): jobs created within one second must still run (and
    list) in creation order, not in the order of their random ids. The ids are made decreasing here (one possible
    draw of uuid4) to make that deterministic."""
    counter = itertools.count()

    def _id(prefix):
        return f"{prefix}_{(1 << 90) - next(counter):024x}"

    monkeypatch.setattr(batch_api, "_id", _id)
    backend = TimedBackend(2, base_s=0.3)
    with serve(tmp_path, backend) as s:
        s.wait_ready(timeout_s=30)
        blocker = upload(s, jsonl(*[req(f"b{i}", prompt=f"blocker{i}") for i in range(3)])).json()["id"]
        fids = [upload(s, jsonl(req("only", prompt=f"job{i}"))).json()["id"] for i in range(3)]
        for _ in range(50):  # the three creates below in one second
            if time.time() % 1 < 0.3:
                break
            time.sleep(0.02)
        first = create(s, blocker)
        made = [create(s, fid) for fid in fids]
        assert len({b["created_at"] for b in made}) == 1, made  # the premise: one second
        for b in [first, *made]:
            assert wait_end(s, b["id"])["status"] == "completed"
        ran = [p for p in backend.generated if p.startswith("job")]
        assert ran == ["job0", "job1", "job2"], ran
        listed = [b["id"] for b in httpx.get(f"{s.url}/v1/batches").json()["data"]]
        assert listed[:3] == [b["id"] for b in reversed(made)], listed


# ---- a stop while the window holds only lines not yet started ----------------------------------------------------
async def test_a_stop_while_the_window_holds_only_unstarted_lines_ends_the_run(tmp_path):
    """``stop`` (a cancel, an expiry) must wake ``run`` waiting in ``_take`` for room itself: a line task cancelled
    before its first step never runs its ``finally: _give``, so when every task in the window is such a one (the
    window holds one line, or the cancel lands right after the run filled it), nothing else notifies the condition;
    the server's job would stay ``cancelling`` and every later job wait behind it."""
    import asyncio

    from conftest import tiny_config

    from orchestrator.batch_db import JobDB
    from orchestrator.batch_input import Line
    from orchestrator.batches import JobRunner
    from zimage_common.messages import ImageResult

    class Dep:
        def admit(self, requests):
            async def one(r):
                await asyncio.sleep(0.01)
                return ImageResult(r.request_id, False, error="boom", error_type="replica_error")

            return [one(r) for r in requests]

    class Sink:
        lines = []

        async def store(self, line, call, results):
            raise AssertionError("no line succeeds here")

        def append(self, lines):
            self.lines.extend(lines)

    loop = asyncio.get_running_loop()
    cfg = tiny_config(tmp_path)
    db = JobDB(tmp_path / "b.db")
    stopped = []

    def on_outcome(o):  # the first line ends: a cancel arrives in the same turn of the loop
        if not stopped:
            stopped.append(o.line.custom_id)
            loop.call_soon(runner.stop)

    n = cfg.limits.max_n  # a line fills the window
    runner = JobRunner(Dep(), cfg, db, "b1", Sink(), 1, on_outcome=on_outcome)
    lines = [Line(i + 1, f"c{i}", GEN, {"prompt": f"p{i}", "size": "64x64", "n": n}) for i in range(4)]
    try:
        finished = await asyncio.wait_for(runner.run(lines), 5)
    except asyncio.TimeoutError:
        raise AssertionError(f"run() still waiting for room 5 s after stop(); in_flight={runner.in_flight}") from None
    assert finished is False and stopped == ["c0"]
    db.close()


# ---- a failed write at the run's last flush ----------------------------------------------------------------------
def test_a_failed_last_output_write_does_not_discard_the_committed_work(tmp_path, monkeypatch):
    """The run's last flush (``JobRunner.run``'s ``finally``): an output write that fails there once must not fail
    the job (request_counts 0/0, no output_file_id although every line is generated and committed, a partial
    ``{batch}-output.jsonl`` left with no file row): the job ends with its output rebuilt from the database."""
    calls = fail_first_output_write(monkeypatch)
    backend = TimedBackend(2)
    with serve(tmp_path, backend) as s:
        s.wait_ready(timeout_s=30)
        b = wait_end(s, create(s, upload(s, jsonl(req("one", prompt="p1", seed=1))).json()["id"])["id"])
        assert calls["n"] == 1 and backend.generated == ["p1"]
        assert b["request_counts"] == {"total": 1, "completed": 1, "failed": 0}, b
        assert b["status"] == "completed" and b["output_file_id"], b
        assert [x["custom_id"] for x in content(s, b["output_file_id"])] == ["one"]
        files = {f["id"] for f in httpx.get(f"{s.url}/v1/files").json()["data"]}
        on_disk = sorted(p.name for p in (tmp_path / "batches" / "files").iterdir())
        assert on_disk == sorted(f"{fid}.jsonl" for fid in files), (on_disk, files)  # no orphan file


# ---- a completion window that passed while the server was down -------------------------------------------------
def test_a_job_whose_window_passed_before_its_turn_expires_without_starting(tmp_path):
    """A job whose ``expires_at`` passed before its turn came (the server was down, or jobs ahead of it ran long) must
    go straight to ``expired``, never ``in_progress`` (``in_progress_at`` stamped after ``expires_at``, taking lines
    until the running job's expiry timer fires)."""
    from test_batch_edge_cases import raw_line, seed_batch

    from orchestrator.batch_db import JobDB

    db = JobDB(tmp_path / "batches" / "batches.db")
    now = int(time.time())
    seed_batch(db, tmp_path / "batches", "batch_late", raw_line('"a"', '"late"'), 1, now - 90_000)
    db.close()
    with serve(tmp_path, TimedBackend(2)) as s:
        s.wait_ready(timeout_s=30)
        late = wait_end(s, "batch_late")
        assert late["status"] == "expired" and late["expired_at"], late
        assert late["in_progress_at"] is None, late
        # as OpenAI's error file lists them: each request that never ran, by custom_id, with no response
        assert late["request_counts"] == {"total": 1, "completed": 0, "failed": 1}, late
        errors = content(s, late["error_file_id"])
        assert [(x["custom_id"], x["response"], x["error"]["code"]) for x in errors] == [
            ("a", None, "batch_expired")]


def test_a_job_that_expires_while_it_runs_lists_the_requests_it_never_ran_as_batch_expired(tmp_path):
    """Its window ends mid-run: the requests done stay in its output; every other one is in its error file once,
    ``batch_expired``, and the counts add up to the total."""
    from test_batch_edge_cases import raw_line, seed_batch

    from orchestrator.batch_db import JobDB

    db = JobDB(tmp_path / "batches" / "batches.db")
    now = int(time.time())
    lines = b"".join(raw_line(f'"r{i}"') for i in range(12))
    seed_batch(db, tmp_path / "batches", "batch_short", lines, 12, now - 86_400 + 2)  # about 2 s of window left
    db.close()
    with serve(tmp_path, TimedBackend(2, per_image_s=0.4)) as s:
        s.wait_ready(timeout_s=30)
        b = wait_end(s, "batch_short")
        assert b["status"] == "expired", b
        counts = b["request_counts"]
        assert counts["failed"] > 0 and counts["completed"] + counts["failed"] == 12, b
        out = content(s, b["output_file_id"])
        errors = content(s, b["error_file_id"])
        assert sorted(x["custom_id"] for x in out) == [f"r{i}" for i in sorted(range(12), key=str)]
        expired = [x for x in errors if x["error"] and x["error"]["code"] == "batch_expired"]
        assert len(expired) == counts["failed"] and all(x["response"] is None for x in expired)
        assert {x["custom_id"] for x in expired}.isdisjoint(x["custom_id"] for x in out if x["response"])
