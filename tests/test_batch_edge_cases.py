"""The Files and Batch APIs at their edges, on fake replicas: text that is not Unicode (lone surrogates) refused
before it is stored, a line whose outcome cannot be recorded ends the job instead of rerunning it, a cancel of a
job waiting its turn, a DELETE racing a POST /v1/batches on the same file, output lines that stay one line under
str.splitlines(), the memory an upload holds, and the range of ``limit``."""

import asyncio
import json
import socket
import sqlite3
import threading
import time
import tracemalloc

import httpx
import pytest
from batch_fakes import TimedBackend
from test_batches_http import GEN, jsonl, req, serve, upload

from orchestrator import batch_api
from orchestrator.batch_api import PUBLIC
from orchestrator.batch_db import JobDB

TERMINAL = ("completed", "failed", "expired", "cancelled")


def create(s, fid, **extra):
    return httpx.post(f"{s.url}/v1/batches", json={"input_file_id": fid, "endpoint": GEN, "completion_window": "24h",
                                                   **extra}, timeout=30)


def wait_end(s, bid, timeout_s=30):
    deadline = time.time() + timeout_s
    while (b := httpx.get(f"{s.url}/v1/batches/{bid}").json())["status"] not in TERMINAL:
        assert time.time() < deadline, b
        time.sleep(0.05)
    return b


def content(s, fid) -> str:
    r = httpx.get(f"{s.url}/v1/files/{fid}/content")
    assert r.status_code == 200, r.text
    return r.text


def raw_line(cid_json: str, prompt_json: str = '"x"') -> bytes:
    """A line whose custom_id and prompt are JSON text as given (escapes kept as written)."""
    return (f'{{"custom_id": {cid_json}, "method": "POST", "url": "{GEN}", '
            f'"body": {{"size": "64x64", "prompt": {prompt_json}}}}}\n').encode()


def seed_batch(db: JobDB, directory, bid: str, lines: bytes, total: int, created_at: int, **fields) -> None:
    """A file and a batch in the database as an earlier server version stored them."""
    path = directory / "files" / f"file-{bid}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lines)
    db.add_file({"id": f"file-{bid}", "filename": "x.jsonl", "purpose": "batch", "bytes": len(lines),
                 "created_at": created_at}, path)
    db.put_batch(dict.fromkeys(PUBLIC) | {
        "id": bid, "object": "batch", "endpoint": GEN, "input_file_id": f"file-{bid}", "completion_window": "24h",
        "status": "validating", "created_at": created_at, "expires_at": created_at + 86_400,
        "request_counts": {"total": total, "completed": 0, "failed": 0}, "metadata": None,
        "base_url": "http://127.0.0.1"} | fields)


# ---- lone surrogates ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edges")
    with serve(tmp, TimedBackend(2)) as s:
        s.wait_ready(timeout_s=30)
        yield s


@pytest.mark.parametrize("line,field", [
    (raw_line('"b\\ud800"'), "'custom_id'"),
    (raw_line('"b"', '"a cat \\udc00"'), "'body.prompt'"),
    (raw_line('"b"', '["x", {"\\uD800": 1}]'), "a key in 'body.prompt[1]'"),
])
def test_an_upload_with_a_lone_surrogate_is_refused_naming_the_line_and_field(server, line, field):
    r = upload(server, jsonl(req("a", prompt="x")) + line)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"].startswith(f"line 2: {field} holds a lone UTF-16 surrogate"), err
    ok = upload(server, jsonl(req("a", prompt="x")) + raw_line('"b\\ud83d\\ude00"'))  # a pair is text: taken
    assert ok.status_code == 200, ok.text


def test_a_job_whose_input_holds_a_lone_surrogate_fails_once_and_the_next_job_runs(tmp_path):
    """A file taken by a server that did not refuse lone surrogates: its job used to rerun the line forever (SQLite
    cannot store the custom_id), ~50 times a second, blocking every later job. Now it fails once, naming the line."""
    db = JobDB(tmp_path / "batches" / "batches.db")
    now = int(time.time())
    seed_batch(db, tmp_path / "batches", "batch_old", raw_line('"ok1"', '"p1"') + raw_line('"bad\\ud800"', '"p2"')
               + raw_line('"ok2"', '"p3"'), 3, now - 10)
    seed_batch(db, tmp_path / "batches", "batch_next", raw_line('"n1"', '"q1"'), 1, now - 5)
    db.close()
    backend = TimedBackend(2)
    with serve(tmp_path, backend) as s:
        s.wait_ready(timeout_s=30)
        b = wait_end(s, "batch_old")
        assert b["status"] == "failed", b
        message = b["errors"]["data"][0]["message"]
        assert "line 2: 'custom_id' holds a lone UTF-16 surrogate" in message, message
        assert wait_end(s, "batch_next")["status"] == "completed"
        time.sleep(0.5)
        assert backend.generated.count("p1") <= 1 and "p2" not in backend.generated


def test_a_line_whose_outcome_cannot_be_recorded_ends_as_a_failed_line(tmp_path, monkeypatch):
    """The database refuses a line's record once: the line is recorded as failed (retryable, so a rerun tries it
    again), and the job ends instead of running it again and again."""
    real = JobDB.record

    def record(self, batch_id, custom_id, line, ok, *args):
        if custom_id == "flaky" and ok:
            raise sqlite3.OperationalError("database is locked")
        return real(self, batch_id, custom_id, line, ok, *args)

    monkeypatch.setattr(JobDB, "record", record)
    backend = TimedBackend(2)
    with serve(tmp_path, backend) as s:
        s.wait_ready(timeout_s=30)
        fid = upload(s, jsonl(req("a", prompt="pa"), req("flaky", prompt="pf"), req("b", prompt="pb"))).json()["id"]
        b = wait_end(s, create(s, fid).json()["id"])
        assert b["status"] == "completed" and b["request_counts"] == {"total": 3, "completed": 2, "failed": 1}, b
        [err] = [json.loads(x) for x in content(s, b["error_file_id"]).splitlines()]
        assert err["custom_id"] == "flaky" and err["response"]["status_code"] == 500
        assert err["response"]["body"]["error"]["code"] == "record_failed"
        assert len(content(s, b["output_file_id"]).splitlines()) == 3
        time.sleep(0.5)
        assert backend.generated.count("pf") == 1


def test_a_line_that_cannot_be_recorded_at_all_fails_the_job_once(tmp_path, monkeypatch):
    """The database refuses a line's record, and its record as a failure too: the job ends failed, saying so, with
    what was done in its output, and the next job runs; nothing is run again."""
    real = JobDB.record

    def record(self, batch_id, custom_id, *args):
        if custom_id == "poison":
            raise sqlite3.OperationalError("disk I/O error")
        return real(self, batch_id, custom_id, *args)

    monkeypatch.setattr(JobDB, "record", record)
    backend = TimedBackend(2)
    with serve(tmp_path, backend) as s:
        s.wait_ready(timeout_s=30)
        fid = upload(s, jsonl(req("a", prompt="pa"), req("poison", prompt="pp"), req("b", prompt="pb"))).json()["id"]
        bid = create(s, fid).json()["id"]
        nxt = create(s, upload(s, jsonl(req("c", prompt="pc"))).json()["id"]).json()["id"]
        b = wait_end(s, bid)
        assert b["status"] == "failed" and b["request_counts"] == {"total": 3, "completed": 2, "failed": 0}, b
        assert "1 of 3 request(s) could not be recorded" in b["errors"]["data"][0]["message"]
        assert len(content(s, b["output_file_id"]).splitlines()) == 2
        assert wait_end(s, nxt)["status"] == "completed"
        time.sleep(0.5)
        assert backend.generated.count("pp") == 1


def test_metadata_with_a_lone_surrogate_is_refused_and_stored_rows_never_break_the_listing(tmp_path):
    db = JobDB(tmp_path / "batches" / "batches.db")
    now = int(time.time())
    # as a server that took such metadata stored it; and a row no server wrote (not JSON)
    seed_batch(db, tmp_path / "batches", "batch_sur", raw_line('"a"'), 1, now - 10, status="completed",
               metadata={"k": "v\ud800"})
    seed_batch(db, tmp_path / "batches", "batch_fine", raw_line('"a"'), 1, now - 5, status="completed")
    with db._lock:
        db._db.execute("INSERT INTO batches VALUES ('batch_junk', '{not json')")
        db._db.commit()
    db.close()
    with serve(tmp_path, TimedBackend(2)) as s:
        s.wait_ready(timeout_s=30)
        fid = upload(s, jsonl(req("a", prompt="x"))).json()["id"]
        r = httpx.post(f"{s.url}/v1/batches", content=json.dumps(
            {"input_file_id": fid, "endpoint": GEN, "completion_window": "24h", "metadata": {"k": "v\ud800"}}),
            headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "metadata", r.text
        r = httpx.get(f"{s.url}/v1/batches")
        assert r.status_code == 200, r.text
        assert [b["id"] for b in r.json()["data"]] == ["batch_fine", "batch_sur"]  # nothing stored by the 400
        r = httpx.get(f"{s.url}/v1/batches/batch_sur")
        assert r.status_code == 200 and r.json()["metadata"] == {"k": "v\\ud800"}, r.text
        assert httpx.get(f"{s.url}/v1/batches/batch_junk").status_code == 404


# ---- cancelling a job that waits its turn ------------------------------------------------------------------------
def test_cancelling_a_job_waiting_behind_another_ends_it_cancelled_without_files(tmp_path):
    with serve(tmp_path, TimedBackend(2, base_s=0.02, per_image_s=0.02)) as s:
        s.wait_ready(timeout_s=30)
        long = create(s, upload(s, jsonl(*[req(f"l{i}", prompt=f"l{i}") for i in range(2000)])).json()["id"])
        queued = create(s, upload(s, jsonl(req("q", prompt="q"))).json()["id"]).json()["id"]
        long = long.json()["id"]
        deadline = time.time() + 30
        while httpx.get(f"{s.url}/v1/batches/{long}").json()["status"] != "in_progress":
            assert time.time() < deadline
            time.sleep(0.02)
        assert httpx.get(f"{s.url}/v1/batches/{queued}").json()["status"] == "validating"
        r = httpx.post(f"{s.url}/v1/batches/{queued}/cancel")
        assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled"), r.text
        b = wait_end(s, queued)
        assert b["status"] == "cancelled" and b["cancelled_at"] and b["errors"] is None, b
        assert b["output_file_id"] is None and b["error_file_id"] is None
        assert b["request_counts"] == {"total": 1, "completed": 0, "failed": 0}
        assert httpx.get(f"{s.url}/v1/batches/{long}").json()["status"] == "in_progress"  # untouched
        httpx.post(f"{s.url}/v1/batches/{long}/cancel")
        assert wait_end(s, long)["status"] == "cancelled"


# ---- DELETE racing POST /v1/batches ------------------------------------------------------------------------------
def test_a_delete_while_a_batch_is_created_from_the_file_is_refused_as_in_use(tmp_path, monkeypatch):
    """POST /v1/batches checks the file on a thread; a DELETE of it meanwhile used to succeed, and the job then
    failed with a server error. Now the file is in use from the moment the create finds it."""
    entered, release, gate = threading.Event(), threading.Event(), {"on": False}
    real = batch_api.check_file

    def check_file(path, *args):
        if gate["on"]:
            entered.set()
            assert release.wait(30)
        return real(path, *args)

    monkeypatch.setattr(batch_api, "check_file", check_file)
    with serve(tmp_path, TimedBackend(2)) as s:
        s.wait_ready(timeout_s=30)
        fid = upload(s, jsonl(req("a", prompt="x"), req("b", prompt="y"))).json()["id"]
        gate["on"] = True
        made = {}
        t = threading.Thread(target=lambda: made.setdefault("r", create(s, fid)))
        t.start()
        assert entered.wait(30)
        r = httpx.delete(f"{s.url}/v1/files/{fid}")
        release.set()
        t.join(30)
        assert r.status_code == 409 and r.json()["error"]["code"] == "file_in_use", r.text
        assert made["r"].status_code == 200, made["r"].text
        b = wait_end(s, made["r"].json()["id"])
        assert b["status"] == "completed" and b["request_counts"]["completed"] == 2, b
        assert httpx.delete(f"{s.url}/v1/files/{fid}").status_code == 200  # the job is over: it may go now
        r = create(s, fid)
        assert r.status_code == 400 and r.json()["error"]["param"] == "input_file_id", r.text


# ---- output lines --------------------------------------------------------------------------------------------------
def test_output_lines_stay_one_line_each_under_splitlines(server):
    ids = ["a\u2028b", "c\u0085d", "e\u2029f", "g\x1ch"]
    lines = [req(cid, prompt=f"x\u2028y\u0085z {i}") for i, cid in enumerate(ids)]
    lines.append(req("bad\u2029", prompt="w", size="100x64"))  # fails: into the error file too
    b = wait_end(server, create(server, upload(server, jsonl(*lines)).json()["id"]).json()["id"])
    assert b["status"] == "completed", b
    out = [json.loads(x) for x in content(server, b["output_file_id"]).splitlines()]
    assert sorted(r["custom_id"] for r in out) == sorted([*ids, "bad\u2029"])
    errors = [json.loads(x) for x in content(server, b["error_file_id"]).splitlines()]
    assert [r["custom_id"] for r in errors] == ["bad\u2029"]


# ---- uploads' memory ---------------------------------------------------------------------------------------------
def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "b0undary7e57"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
            f'Content-Type: application/jsonl\r\n\r\n').encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def raw_post(url: str, path: str, body: bytes, ctype: str) -> tuple[int, bytes]:
    """A POST from a plain socket: an HTTP client would copy the body (its allocations would count as the
    server's, in this process)."""
    host, port = url.split("//")[1].split(":")
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    answer = b""
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head)
        sock.sendall(body)
        while chunk := sock.recv(1 << 16):
            answer += chunk
    status, _, rest = answer.partition(b"\r\n\r\n")
    return int(status.split()[1]), rest


def test_an_upload_is_streamed_to_disk_not_held_in_memory(tmp_path):
    """A 24 MB upload used to be held three times over (the body, the parsed part, its read); its lines are ~1 KB."""
    data = jsonl(*[req(f"c{i}", prompt="p" * 1000) for i in range(20_000)])
    body, ctype = multipart(data)
    with serve(tmp_path, TimedBackend(2), max_lines=50_000) as s:
        s.wait_ready(timeout_s=30)
        tracemalloc.start()
        try:
            status, answer = raw_post(s.url, "/v1/files", body, ctype)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert status == 200, answer
        made = json.loads(answer)
        assert made["bytes"] == len(data) and made["filename"] == "big.jsonl"
        assert content(s, made["id"]).encode() == data
        assert peak < len(data) / 2, f"peak {peak / 2**20:.1f} MiB for a {len(data) / 2**20:.1f} MiB upload"


def test_an_upload_waits_for_room_in_the_bytes_in_flight_then_is_refused(tmp_path):
    """Checking a file holds its longest line a few times over: that is reserved in limits.max_inflight_upload_bytes,
    the budget edits' bodies share; an upload that finds no room within limits.upload_wait_s gets a 429."""
    cfg_limits = {"upload_wait_s": 0.3}
    from batch_fakes import factory
    from conftest import ServerThread, tiny_config

    from orchestrator.server import create_app

    cfg = tiny_config(tmp_path, batches={"directory": str(tmp_path / "batches"), "max_upload_bytes": 4096},
                      limits=cfg_limits)
    with ServerThread(create_app(cfg, deployment_factory=factory(TimedBackend(2)))) as s:
        s.wait_ready(timeout_s=30)
        app = s.server.config.app
        budget, loop = app.state.upload_budget, app.state.jobs._task.get_loop()
        full = budget.capacity
        assert asyncio.run_coroutine_threadsafe(budget.acquire(full, 1.0), loop).result(5)  # as edits in flight
        try:
            r = upload(s, jsonl(req("a", prompt="x")))
            assert r.status_code == 429 and "limits.max_inflight_upload_bytes" in r.json()["error"]["message"], r.text
            assert r.headers.get("retry-after")
        finally:
            loop.call_soon_threadsafe(budget.release, full)
        r = upload(s, jsonl(req("a", prompt="x")))
        assert r.status_code == 200, r.text
        assert budget.used == 0  # given back
        body, ctype = multipart(b"x" * 5000)

        def chunks():  # no Content-Length: cut off at batches.max_upload_bytes as it streams
            yield from (body[i:i + 1000] for i in range(0, len(body), 1000))

        r = httpx.post(f"{s.url}/v1/files", content=chunks(), headers={"content-type": ctype})
        assert r.status_code == 413 and "batches.max_upload_bytes" in r.json()["error"]["message"], r.text
        assert not list((tmp_path / "batches" / "files").glob(".upload-*"))  # the refused one's file is gone


def form(*parts: tuple[str, bytes, str | None], charset: str = "") -> tuple[bytes, str]:
    """A multipart body of (name, data, filename) parts, in the order given."""
    body = b""
    for name, data, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += b"--b0undary7e57\r\nContent-Disposition: " + disposition.encode("latin-1") + b"\r\n\r\n"
        body += data + b"\r\n"
    return body + b"--b0undary7e57--\r\n", "multipart/form-data; boundary=b0undary7e57" + charset


def test_upload_forms_are_read_as_they_stream(server):
    good = jsonl(req("a", prompt="x"))

    def post(body_ctype):
        body, ctype = body_ctype
        return httpx.post(f"{server.url}/v1/files", content=body, headers={"content-type": ctype})

    r = post(form(("file", good, "first.jsonl"), ("purpose", b"batch", None)))  # the file before the purpose
    assert r.status_code == 200 and r.json()["filename"] == "first.jsonl", r.text
    r = post(form(("purpose", b"batch", None), ("file", good, None)))  # `file` without a filename: still the file
    assert r.status_code == 200 and r.json()["filename"] == "input.jsonl", r.text
    # a charset whose decoding makes a lone surrogate of a name's bytes: shown escaped, never a 500
    r = post(form(("purpose", b"batch", None), ("file", good, "\\ud800.jsonl"), charset="; charset=unicode_escape"))
    assert r.status_code == 200 and r.json()["filename"] == "\\ud800.jsonl", r.text
    assert httpx.get(f"{server.url}/v1/files").status_code == 200
    for parts, param in [
        ((("purpose", b"batch", None), ("file", good, "a.jsonl"), ("file", good, "b.jsonl")), "file"),
        ((("purpose", b"batch", None), ("other", good, "a.jsonl")), "file"),
        ((("purpose", b"batch", None),), "file"),
        ((("purpose", b"batch", None), ("purpose", b"batch", None), ("file", good, "a.jsonl")), "purpose"),
        ((("purpose", b"fine-tune", None), ("file", good, "a.jsonl")), "purpose"),
    ]:
        r = post(form(*parts))
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (parts, r.text)
    body, ctype = form(("purpose", b"batch", None), ("file", good, "a.jsonl"))
    r = post((body[:-30], ctype))
    assert r.status_code == 400 and "closing boundary" in r.json()["error"]["message"], r.text
    files = server.server.config.app.state.jobs.directory / "files"
    assert not list(files.glob(".upload-*"))  # no refused upload leaves its file behind


# ---- listing -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("limit", ["0", "-1", "101"])
def test_a_limit_out_of_range_is_refused_naming_it(server, limit):
    r = httpx.get(f"{server.url}/v1/batches?limit={limit}")
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "limit" and "between 1 and 100" in err["message"], r.text
    assert httpx.get(f"{server.url}/v1/batches?limit=100").status_code == 200
