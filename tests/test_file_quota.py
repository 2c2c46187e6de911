"""The batch input files' disk bounds (file_quota.py, batch_api.py POST /v1/files) under concurrency, crashes and
failed inserts: the quota stays equal to the database and to what is on disk."""

import asyncio
import random
import sqlite3
import time

import httpx
from batch_fakes import TimedBackend
from test_batches_http import MiB, body_of, fake_disk, jsonl, lines_of, quota_of, req, serve, upload


def test_the_free_disk_check_counts_the_reservations_of_uploads_in_progress(tmp_path, monkeypatch):
    """Bytes reserved by uploads still streaming are not on disk yet, so they do not count as free: with room above
    the floor for one 100 MiB upload, a second is refused."""
    from orchestrator import file_quota
    from orchestrator.file_quota import FileQuota

    floor = 1 << 30
    monkeypatch.setattr(file_quota, "disk_usage", fake_disk(lambda n: floor + 150 * MiB)[0])
    quota = FileQuota(10 << 30, floor, tmp_path)
    assert quota.reserve(100 * MiB) is None
    assert quota.reserve(100 * MiB) is not None


def test_a_partial_upload_left_by_a_crash_is_removed_at_the_next_start(tmp_path):
    """A server killed mid-upload leaves files/.upload-*.jsonl, which no row counts: the next start removes it when
    it opens the job database."""
    files = tmp_path / "batches" / "files"
    with serve(tmp_path, TimedBackend(2), max_upload_bytes=MiB, max_stored_bytes=MiB) as s:
        s.wait_ready(timeout_s=30)
        assert upload(s, jsonl(req("a", prompt="x"))).status_code == 200  # the database and files/ exist
    leftover = files / ".upload-0123456789abcdef0123456789abcdef.jsonl"
    leftover.write_bytes(b"x" * (MiB // 2))  # what a SIGKILL during an upload leaves
    with serve(tmp_path, TimedBackend(2), max_upload_bytes=MiB, max_stored_bytes=MiB) as s:
        s.wait_ready(timeout_s=30)
        httpx.get(f"{s.url}/v1/files")  # opens the database: stored is counted now
        time.sleep(0.5)
        assert not leftover.exists(), (quota_of(s).stored, leftover.stat().st_size)


def test_a_failed_database_insert_leaves_no_orphan_input_file(tmp_path, monkeypatch):
    """add_file moves the checked upload to files/<id>.jsonl, then inserts its row; when the insert fails (SQLite
    'database or disk is full' is the likely one on a disk near its floor), the moved file is removed too."""
    from orchestrator.batch_db import JobDB

    with serve(tmp_path, TimedBackend(2), max_upload_bytes=MiB, max_stored_bytes=MiB) as s:
        s.wait_ready(timeout_s=30)
        assert upload(s, jsonl(req("a", prompt="x"))).status_code == 200
        files = tmp_path / "batches" / "files"
        before = set(files.iterdir())

        def full(self, obj, path):
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(JobDB, "add_file", full)
        r = upload(s, lines_of(50))
        assert r.status_code == 500 and "error" in r.json(), r.text
        assert quota_of(s).reserved == 0
        orphans = set(files.iterdir()) - before
        assert not orphans, orphans


def test_fuzz_concurrent_uploads_and_deletes_keep_the_quota_equal_to_the_database(tmp_path):
    """Concurrent uploads (declared and chunked, valid and not, some abandoned) and DELETEs on one server: at the
    end reserved is 0 and stored is the database's sum of batch files."""
    with serve(tmp_path, TimedBackend(2), max_upload_bytes=MiB, max_stored_bytes=4 * MiB) as s:
        s.wait_ready(timeout_s=30)
        quota = quota_of(s)
        rnd = random.Random(7)
        seen = {"codes": {}}

        async def worker(client, k):
            for i in range(12):
                kind = rnd.choice(["declared", "chunked", "bad", "delete", "abandon"])
                if kind == "delete":
                    listing = (await client.get("/v1/files")).json()["data"]
                    if listing:
                        r = await client.delete(f"/v1/files/{rnd.choice(listing)['id']}")
                        seen["codes"][r.status_code] = seen["codes"].get(r.status_code, 0) + 1
                    continue
                data = lines_of(rnd.randint(1, 300), f"w{k}_{i}_")
                if kind == "bad":
                    data += b"{oops\n"
                body, ctype = body_of(data)
                try:
                    if kind == "declared":
                        r = await client.post("/v1/files", content=body, headers={"content-type": ctype})
                    else:
                        async def gen(body=body, kind=kind):
                            for j in range(0, len(body), 8192):
                                if kind == "abandon" and j > len(body) // 2:
                                    raise RuntimeError("client gone")
                                yield body[j:j + 8192]
                                await asyncio.sleep(0)
                        r = await client.post("/v1/files", content=gen(), headers={"content-type": ctype})
                    seen["codes"][r.status_code] = seen["codes"].get(r.status_code, 0) + 1
                    assert r.status_code in (200, 400, 507), r.text
                except (RuntimeError, httpx.HTTPError):
                    pass

        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:
                await asyncio.gather(*(worker(client, k) for k in range(6)))

        asyncio.run(main())
        deadline = time.time() + 10
        while quota.reserved:
            assert time.time() < deadline, quota.reserved
            time.sleep(0.05)
        db = s.server.config.app.state.jobs.db
        assert quota.stored == db.stored_bytes("batch"), (quota.stored, db.stored_bytes("batch"), seen)
        files = (tmp_path / "batches" / "files").iterdir()
        on_disk = sum(p.stat().st_size for p in files if p.name.startswith("file_"))
        assert on_disk == quota.stored, (on_disk, quota.stored)
        assert not list((tmp_path / "batches" / "files").glob(".upload-*"))
