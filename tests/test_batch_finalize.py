"""A job's finalize off the event loop: a failure while it writes its files, and a server stopped meanwhile."""

import asyncio
import threading
import time

import httpx
from batch_fakes import TimedBackend, factory
from conftest import tiny_config
from test_batch_edge_cases import raw_line, seed_batch, wait_end
from test_batches_http import serve

from orchestrator.batch_db import JobDB
from orchestrator.server import create_app


def seed_cancelled_half_done(directory, bid: str, status: str) -> None:
    db = JobDB(directory / "batches.db")
    seed_batch(db, directory, bid, raw_line('"c1"') + raw_line('"c2"'), 2, int(time.time()) - 10, status=status)
    db.record(bid, "c1", 1, True, False, 0.1, {"custom_id": "c1", "response": None, "error": None})
    db.commit()
    db.close()


def test_a_finalize_that_cannot_write_fails_the_job_and_a_cancel_of_it_is_then_refused(tmp_path, monkeypatch):
    """A full disk while the output is written fails the job (it stops there); the cancel it was ending does not
    make a later cancel of the failed job look accepted."""
    seed_cancelled_half_done(tmp_path / "batches", "batch_x", "cancelling")

    def broken(self, batch_id, path, ok=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(JobDB, "write_records", broken)
    with serve(tmp_path, TimedBackend(2)) as s:
        s.wait_ready(timeout_s=30)
        assert wait_end(s, "batch_x")["status"] == "failed"
        r = httpx.post(f"{s.url}/v1/batches/batch_x/cancel", timeout=5)
        assert r.status_code == 400 and r.json()["error"]["param"] == "batch_id", r.text


async def test_a_server_stopped_while_a_cancel_finalizes_ends_the_job_cancelled_at_its_next_start(tmp_path,
                                                                                                   monkeypatch):
    seed_cancelled_half_done(tmp_path / "batches", "batch_w", "in_progress")
    real, go = JobDB.write_records, threading.Event()

    def slow(self, batch_id, path, ok=None):
        go.wait(2)
        return real(self, batch_id, path, ok)

    monkeypatch.setattr(JobDB, "write_records", slow)
    cfg = tiny_config(tmp_path, outputs={"directory": str(tmp_path / "outputs")},
                      batches={"directory": str(tmp_path / "batches")})
    jobs = create_app(cfg, deployment_factory=factory(TimedBackend(1))).state.jobs
    t = asyncio.ensure_future(jobs.cancel(jobs.db.batch("batch_w")))
    await asyncio.sleep(0.1)
    assert jobs.db.batch("batch_w")["status"] == "finalizing"
    await jobs.stop()
    try:
        await t
    except asyncio.CancelledError:
        pass
    go.set()
    await asyncio.sleep(0.5)  # the thread it left ends (on a closed database)
    jobs._stopping = False  # the next start, as its worker would take the job
    b = jobs.db.batch("batch_w")
    assert b["status"] == "finalizing" and b["ending"]["status"] == "cancelled"
    await jobs._run(b)
    b = jobs.db.batch("batch_w")
    assert b["status"] == "cancelled" and b["request_counts"]["completed"] == 1, b
    assert b["cancelled_at"] >= b["finalizing_at"] and b["output_file_id"] == "file-batch_w-output"
    jobs._db.close()
