"""The Files and Batch APIs on fake replicas: the official openai client end to end, refusals that name the line or
the field, a job that resumes after a server restart, and cancelling."""

import json
import time

import httpx
import pytest
from batch_fakes import TimedBackend, factory
from conftest import ServerThread, tiny_config

from orchestrator.batch_db import JobDB
from orchestrator.server import create_app

GEN = "/v1/images/generations"


def jsonl(*lines) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def req(cid, url=GEN, **body):
    return {"custom_id": cid, "method": "POST", "url": url, "body": {"size": "64x64", **body}}


def serve(tmp_path, backend, **batches):
    cfg = tiny_config(tmp_path, outputs={"directory": str(tmp_path / "outputs")},
                      batches={"directory": str(tmp_path / "batches"), **batches})
    return ServerThread(create_app(cfg, deployment_factory=factory(backend)))


def wait_for(client, batch_id, statuses, timeout_s=60):
    deadline = time.time() + timeout_s
    while (b := client.batches.retrieve(batch_id)).status not in statuses:
        assert time.time() < deadline, b
        time.sleep(0.05)
    return b


def test_openai_client_runs_a_batch(tmp_path):
    from openai import OpenAI

    backend = TimedBackend(2)
    with serve(tmp_path, backend) as s:
        s.wait_ready(timeout_s=30)
        client = OpenAI(base_url=f"{s.url}/v1", api_key="none")
        lines = [req(f"r{i}", prompt=f"p{i}", seed=i) for i in range(20)]
        lines += [req("bad", prompt="x", size="100x64"), req("two", prompt="y", n=2, seed=9),
                  req("linked", prompt="z", response_format="url")]
        f = client.files.create(file=("job.jsonl", jsonl(*lines)), purpose="batch")
        assert f.object == "file" and f.purpose == "batch" and f.filename == "job.jsonl" and f.bytes > 0
        b = client.batches.create(input_file_id=f.id, endpoint=GEN, completion_window="24h",
                                  metadata={"project": "catalogue"})
        assert b.object == "batch" and b.status in ("validating", "in_progress")
        assert b.metadata == {"project": "catalogue"}
        b = wait_for(client, b.id, ("completed", "failed"))
        assert b.status == "completed", b
        assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (23, 22, 1)
        assert b.in_progress_at and b.completed_at and b.expires_at == b.created_at + 86_400
        out = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
        by_id = {r["custom_id"]: r for r in out}
        assert len(out) == len(by_id) == 23
        bad = by_id["bad"]["response"]
        assert bad["status_code"] == 400 and bad["body"]["error"]["param"] == "size"
        assert [d["seed"] for d in by_id["two"]["response"]["body"]["data"]] == [9, 10]
        assert by_id["r3"]["response"]["body"]["data"][0]["b64_json"]
        link = by_id["linked"]["response"]["body"]["data"][0]["url"]
        assert httpx.get(link).headers["content-type"] == "image/png"
        errors = [json.loads(x) for x in client.files.content(b.error_file_id).text.splitlines()]
        assert [e["custom_id"] for e in errors] == ["bad"]
        assert client.files.retrieve(b.output_file_id).purpose == "batch_output"
        assert b.id in [x.id for x in client.batches.list()]
        assert len(backend.generated) == 23  # the bad line never reached a replica


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("small")
    with serve(tmp, TimedBackend(2), max_upload_bytes=4096, max_lines=3) as s:
        s.wait_ready(timeout_s=30)
        yield s


def test_reads_on_a_server_without_jobs_store_nothing(tmp_path):
    with serve(tmp_path, TimedBackend(2)) as s:
        s.wait_ready(timeout_s=30)
        for path in ("/v1/files", "/v1/batches", "/v1/files/file-nope", "/v1/files/file-nope/content",
                     "/v1/batches/batch_nope"):
            r = httpx.get(f"{s.url}{path}")
            assert r.status_code in (200, 404), r.text
            if r.status_code == 404:
                assert r.json()["error"]["param"] in ("file_id", "batch_id"), r.text
        assert not (tmp_path / "batches" / "batches.db").exists()
        r = httpx.get(f"{s.url}/v1/batches?limit=abc")  # FastAPI's own check of a query parameter
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "limit" and "query parameter 'limit'" in err["message"], r.text


def upload(s, data: bytes, purpose="batch"):
    return httpx.post(f"{s.url}/v1/files", files={"file": ("x.jsonl", data)}, data={"purpose": purpose})


@pytest.mark.parametrize("data,param,fragment", [
    (jsonl(req("a", prompt="x")) + b"{oops\n", "input_file_id", "line 2: is not valid JSON"),
    (jsonl(req("a", prompt="x"), req("a", prompt="y")), "input_file_id",
     "line 2: custom_id 'a' is already used on line 1"),
    (jsonl(req("a", url="/v1/embeddings", prompt="x")), "input_file_id", "line 1: url '/v1/embeddings'"),
    (jsonl(*[req(f"c{i}", prompt="x") for i in range(4)]), "input_file_id", "more than 3 requests (batches.max_lines)"),
    (b"", "input_file_id", "holds no requests"),
])
def test_bad_uploads_are_refused_naming_the_line(small, data, param, fragment):
    r = upload(small, data)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"] and err["type"] == "invalid_request_error"


def test_upload_and_create_limits(small):
    r = upload(small, b"x" * 5000)
    assert r.status_code == 413 and "batches.max_upload_bytes" in r.json()["error"]["message"]
    r = httpx.post(f"{small.url}/v1/batches", content=b"{" + b" " * 1_000_001 + b"}",
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limits.max_body_bytes" in r.json()["error"]["message"], r.text
    r = upload(small, jsonl(req("a", prompt="x")), purpose="fine-tune")
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    fid = upload(small, jsonl(req("a", prompt="x"))).json()["id"]
    for body, param in [({"input_file_id": fid, "endpoint": "/v1/images/edits", "completion_window": "24h"},
                         "input_file_id"),  # the file's lines are generations
                        ({"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
                         "endpoint"),
                        ({"input_file_id": fid, "endpoint": GEN, "completion_window": "1h"}, "completion_window"),
                        ({"input_file_id": "file-nope", "endpoint": GEN, "completion_window": "24h"}, "input_file_id")]:
        r = httpx.post(f"{small.url}/v1/batches", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert httpx.get(f"{small.url}/v1/batches/batch_nope").status_code == 404
    assert httpx.get(f"{small.url}/v1/files/file-nope/content").status_code == 404


def test_a_job_resumes_after_a_restart_and_can_be_cancelled(tmp_path):
    from openai import OpenAI

    n = 200
    first = TimedBackend(2, base_s=0.01, per_image_s=0.01)  # about 1.3 s of work: stopped part-way
    with serve(tmp_path, first) as s:
        s.wait_ready(timeout_s=30)
        client = OpenAI(base_url=f"{s.url}/v1", api_key="none")
        fid = client.files.create(file=("a.jsonl", jsonl(*[req(f"c{i}", prompt=f"p{i}") for i in range(n)])),
                                  purpose="batch").id
        bid = client.batches.create(input_file_id=fid, endpoint=GEN, completion_window="24h").id
        deadline = time.time() + 60
        while client.batches.retrieve(bid).request_counts.completed < n // 4:
            assert time.time() < deadline
            time.sleep(0.02)
    db = JobDB(tmp_path / "batches" / "batches.db")
    recorded = {f"p{cid[1:]}" for cid in db.finished(bid)}
    db.close()
    assert n // 4 <= len(recorded) <= len(first.generated) < n

    second = TimedBackend(2, base_s=0.01)
    with serve(tmp_path, second) as s:  # same directories: the job is in the database
        s.wait_ready(timeout_s=30)
        client = OpenAI(base_url=f"{s.url}/v1", api_key="none")
        b = wait_for(client, bid, ("completed",))
        assert b.request_counts.completed == n
        ids = [json.loads(x)["custom_id"] for x in client.files.content(b.output_file_id).text.splitlines()]
        assert sorted(ids) == sorted(f"c{i}" for i in range(n))
        assert set(second.generated).isdisjoint(recorded) and len(second.generated) == n - len(recorded)

        fid = client.files.create(file=("b.jsonl", jsonl(*[req(f"d{i}", prompt=f"q{i}") for i in range(2000)])),
                                  purpose="batch").id
        bid = client.batches.create(input_file_id=fid, endpoint=GEN, completion_window="24h").id
        wait_for(client, bid, ("in_progress",))
        b = client.batches.cancel(bid)
        assert b.status in ("cancelling", "cancelled")
        b = wait_for(client, bid, ("cancelled",))
        assert b.cancelled_at and b.request_counts.completed < 2000
        done = b.request_counts.completed + b.request_counts.failed
        if done:  # an output file only for a job with requests done
            assert len(client.files.content(b.output_file_id).text.splitlines()) == done
        else:
            assert b.output_file_id is None and b.error_file_id is None
        r = httpx.post(f"{s.url}/v1/batches/{bid}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"


def test_interactive_requests_keep_their_latency_while_a_job_runs(tmp_path):
    """benchmarks/batch_priority.py's measurement on fake replicas with a GPU-like batch cost (0.04 s + 0.03 s an
    image): the job finishes, it was still running when the interactive phase ended, and interactive p95 stays
    near the no-job run's: these fakes run calls one after another (no step loop parking the job's samples), so an
    interactive request may wait for the one job call running, a single image while interactive traffic is about
    (0.07 s). The measured ratios on real replicas, CPU demo included, are in the report."""
    import asyncio
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from batch_priority import measure

    with serve(tmp_path, TimedBackend(2, base_s=0.04, per_image_s=0.03), reserve_s=1.0) as s:
        s.wait_ready(timeout_s=30)
        r = asyncio.run(measure(s.url, rate=5.0, count=25, job_lines=120, body={"size": "64x64"}))
    print(f"\ninteractive p95 {r['alone']['p95_s']:.3f}s alone, {r['with_job']['p95_s']:.3f}s with a job "
          f"(ratio {r['p95_ratio']:.2f}); job {r['job']['images_per_s']:.1f} img/s")
    assert r["job"]["status"] == "completed" and r["job"]["request_counts"]["completed"] == 120
    assert r["job"]["still_running_at_phase_end"]
    assert r["with_job"]["p95_s"] - r["alone"]["p95_s"] < 0.07 + 0.05  # one job call, and slack for this machine


def test_files_are_listed_and_deleted(small):
    from openai import OpenAI

    client = OpenAI(base_url=f"{small.url}/v1", api_key="none")
    f = client.files.create(file=("mine.jsonl", jsonl(req("a", prompt="x"))), purpose="batch")
    assert f.id in [x.id for x in client.files.list(purpose="batch")]
    assert client.files.delete(f.id).deleted
    assert f.id not in [x.id for x in client.files.list()]
    assert httpx.get(f"{small.url}/v1/files/{f.id}").status_code == 404


# ---- the disk input files may take (batches.max_stored_bytes, batches.min_free_disk_bytes) ----------------------
MiB = 1 << 20


def lines_of(n: int, tag: str = "c") -> bytes:
    """A valid input file of n lines, about 1 KiB each."""
    return jsonl(*[req(f"{tag}{i}", prompt="p" * 1000) for i in range(n)])


def body_of(data: bytes) -> tuple[bytes, str]:
    """``data`` as the multipart body of a POST /v1/files, to send without a Content-Length (chunked)."""
    head = (b'--b0undary7e57\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--b0undary7e57\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n\r\n')
    return head + data + b"\r\n--b0undary7e57--\r\n", "multipart/form-data; boundary=b0undary7e57"


def quota_of(s):
    return s.server.config.app.state.jobs.quota


def refused(r, code: str, field: str) -> dict:
    """The 507's envelope, checked: param `file`, the code, and a message naming the field and the fix."""
    assert r.status_code == 507, r.text
    err = r.json()["error"]
    assert err["param"] == "file" and err["code"] == code, err
    assert f"batches.{field}" in err["message"] and "DELETE /v1/files/{id}" in err["message"], err
    return err


def no_partial_files(tmp_path) -> bool:
    return not list((tmp_path / "batches" / "files").glob(".upload-*"))


def test_an_upload_in_progress_holds_its_reservation_against_max_stored_bytes(tmp_path):
    """A chunked upload reserves max_upload_bytes before it is read; while it streams, one with a declared length
    that does not fit beside it is a 507. Once stored it holds only its file's real bytes."""
    import threading

    with serve(tmp_path, TimedBackend(2), max_upload_bytes=MiB, max_stored_bytes=MiB) as s:
        s.wait_ready(timeout_s=30)
        quota = quota_of(s)
        data = lines_of(100)
        body, ctype = body_of(data)
        go_on = threading.Event()

        def stalled():  # no Content-Length: it reserves batches.max_upload_bytes, the whole quota here
            yield body[:1000]
            go_on.wait(30)
            yield body[1000:]

        answers = []
        first = threading.Thread(target=lambda: answers.append(httpx.post(
            f"{s.url}/v1/files", content=stalled(), headers={"content-type": ctype}, timeout=60)))
        first.start()
        try:
            deadline = time.time() + 10
            while quota.reserved < MiB:
                assert time.time() < deadline, quota.reserved
                time.sleep(0.02)
            small = jsonl(req("a", prompt="x"))
            err = refused(upload(s, small), "storage_limit_reached", "max_stored_bytes")
            assert f"{MiB} reserved by uploads in progress" in err["message"], err
            assert quota.reserved == MiB  # the refused one reserved nothing
        finally:
            go_on.set()
            first.join(60)
        assert answers[0].status_code == 200, answers[0].text
        assert answers[0].json()["bytes"] == len(data)
        assert (quota.stored, quota.reserved) == (len(data), 0)  # the file's real bytes stay, the rest is free
        assert upload(s, small).status_code == 200  # fits beside the stored file
        assert quota.stored == len(data) + len(small) and quota.reserved == 0


def test_stored_files_fill_max_stored_bytes_until_one_is_deleted(tmp_path):
    with serve(tmp_path, TimedBackend(2), max_upload_bytes=MiB, max_stored_bytes=MiB) as s:
        s.wait_ready(timeout_s=30)
        big, other = lines_of(700, "a"), lines_of(400, "b")
        fid = upload(s, big).json()["id"]
        r = upload(s, other)  # declared length: refused before a byte is read
        err = refused(r, "storage_limit_reached", "max_stored_bytes")
        assert f"{MiB} bytes" in err["message"] and f"{len(big)} are stored" in err["message"], err
        assert err["type"] == "invalid_request_error"
        assert no_partial_files(tmp_path)
        assert httpx.delete(f"{s.url}/v1/files/{fid}").json()["deleted"]  # frees its bytes
        assert quota_of(s).stored == 0
        r = upload(s, other)
        assert r.status_code == 200 and r.json()["bytes"] == len(other), r.text


def test_stored_bytes_are_counted_from_the_database_after_a_restart(tmp_path):
    stored = lines_of(700, "a")
    with serve(tmp_path, TimedBackend(2), max_upload_bytes=MiB, max_stored_bytes=MiB) as s:
        s.wait_ready(timeout_s=30)
        fid = upload(s, stored).json()["id"]
    with serve(tmp_path, TimedBackend(2), max_upload_bytes=MiB, max_stored_bytes=MiB) as s:  # same directory
        s.wait_ready(timeout_s=30)
        err = refused(upload(s, lines_of(400, "b")), "storage_limit_reached", "max_stored_bytes")
        assert f"{len(stored)} are stored" in err["message"], err
        assert quota_of(s).stored == len(stored)
        assert httpx.delete(f"{s.url}/v1/files/{fid}").status_code == 200
        assert upload(s, lines_of(400, "b")).status_code == 200


def test_a_failed_upload_gives_its_reservation_back(tmp_path):
    """Invalid JSONL (400), a chunked body past max_upload_bytes (413) and a client gone mid-body each reserved
    nearly the whole quota; afterwards it is all free again, and an upload that needs most of it is stored."""
    import socket

    with serve(tmp_path, TimedBackend(2), max_upload_bytes=MiB, max_stored_bytes=MiB) as s:
        s.wait_ready(timeout_s=30)
        quota = quota_of(s)
        r = upload(s, lines_of(800) + b"{oops\n")
        assert r.status_code == 400 and "is not valid JSON" in r.json()["error"]["message"], r.text
        body, ctype = body_of(b"x" * (MiB + 1000))
        r = httpx.post(f"{s.url}/v1/files", content=(body[i:i + 65536] for i in range(0, len(body), 65536)),
                       headers={"content-type": ctype})
        assert r.status_code == 413 and "batches.max_upload_bytes" in r.json()["error"]["message"], r.text
        host, port = s.url.split("//")[1].split(":")
        body, ctype = body_of(lines_of(800))
        with socket.create_connection((host, int(port)), timeout=30) as sock:  # sends half, then goes away
            sock.sendall(f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) // 2])
            deadline = time.time() + 10
            while quota.reserved < len(body):
                assert time.time() < deadline, quota.reserved
                time.sleep(0.02)
        deadline = time.time() + 30
        while quota.reserved or not no_partial_files(tmp_path):
            assert time.time() < deadline, (quota.reserved, list((tmp_path / "batches" / "files").iterdir()))
            time.sleep(0.05)
        assert quota.stored == 0
        data = lines_of(800)
        r = upload(s, data)
        assert r.status_code == 200 and r.json()["bytes"] == len(data), r.text
        assert (quota.stored, quota.reserved) == (len(data), 0)
        err = refused(upload(s, lines_of(300)), "storage_limit_reached", "max_stored_bytes")
        assert f"{len(data)} are stored and 0 reserved" in err["message"], err


def fake_disk(free_after):
    """A shutil.disk_usage whose free bytes are ``free_after(call number)``."""
    from types import SimpleNamespace

    calls = []

    def disk_usage(path):
        calls.append(path)
        return SimpleNamespace(total=1 << 40, used=0, free=free_after(len(calls)))

    return disk_usage, calls


def test_an_upload_is_refused_before_reading_when_the_disk_is_nearly_full(tmp_path, monkeypatch):
    from orchestrator import file_quota

    with serve(tmp_path, TimedBackend(2)) as s:
        s.wait_ready(timeout_s=30)
        floor = 1 << 30  # batches.min_free_disk_bytes' default
        data = jsonl(req("a", prompt="x"))
        disk_usage, calls = fake_disk(lambda n: floor + 100)  # above the floor, but not by this upload's size
        monkeypatch.setattr(file_quota, "disk_usage", disk_usage)
        err = refused(upload(s, data), "insufficient_storage", "min_free_disk_bytes")
        assert f"{floor + 100} bytes free" in err["message"] and f"= {floor}" in err["message"], err
        assert calls and calls[0] == tmp_path / "batches"  # the filesystem holding batches.directory
        assert no_partial_files(tmp_path) and quota_of(s).reserved == 0
        monkeypatch.setattr(file_quota, "disk_usage", fake_disk(lambda n: floor + MiB)[0])
        assert upload(s, data).status_code == 200


def test_an_upload_stops_when_free_disk_falls_below_the_floor_while_it_streams(tmp_path, monkeypatch):
    from orchestrator import file_quota

    with serve(tmp_path, TimedBackend(2)) as s:
        s.wait_ready(timeout_s=30)
        floor = 1 << 30
        disk_usage, calls = fake_disk(lambda n: 1 << 40 if n == 1 else floor - 1)  # room at first, then not
        monkeypatch.setattr(file_quota, "disk_usage", disk_usage)
        monkeypatch.setattr(file_quota, "WATCH_BYTES", 32 * 1024)
        body, ctype = body_of(lines_of(400))
        r = httpx.post(f"{s.url}/v1/files", content=(body[i:i + 16384] for i in range(0, len(body), 16384)),
                       headers={"content-type": ctype})
        err = refused(r, "insufficient_storage", "min_free_disk_bytes")
        assert f"fell to {floor - 1} bytes free" in err["message"], err
        assert len(calls) >= 2  # looked at again while it streamed
        assert no_partial_files(tmp_path) and quota_of(s).reserved == 0  # its partial file is gone
        assert not httpx.get(f"{s.url}/v1/files").json()["data"]


def test_a_job_pauses_while_free_disk_is_below_the_floor_and_finishes_once_there_is_room(tmp_path, monkeypatch):
    """A job's outputs share the disk: while its free space is under batches.min_free_disk_bytes the job takes no
    more lines (those in flight finish) and stays in progress; once there is room it goes on to the end."""
    from openai import OpenAI

    from orchestrator import file_quota

    backend = TimedBackend(2, per_image_s=0.05)
    floor = 1 << 30
    low = {"now": False}
    monkeypatch.setattr(file_quota, "disk_usage", fake_disk(lambda n: floor - 1 if low["now"] else 1 << 40)[0])
    with serve(tmp_path, backend, max_inflight=2) as s:
        s.wait_ready(timeout_s=30)
        client = OpenAI(base_url=f"{s.url}/v1", api_key="none")
        lines = [req(f"r{i}", prompt=f"p{i}", seed=i) for i in range(40)]
        f = client.files.create(file=("job.jsonl", jsonl(*lines)), purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint=GEN, completion_window="24h")
        deadline = time.time() + 30
        while len(backend.generated) < 4:
            assert time.time() < deadline, "the job did not start"
            time.sleep(0.01)
        low["now"] = True
        time.sleep(1.0)  # the lines in flight finish
        paused_at = len(backend.generated)
        time.sleep(1.5)
        assert len(backend.generated) == paused_at < 40  # nothing taken while the disk is low
        seen = httpx.get(f"{s.url}/v1/batches/{b.id}").json()
        assert seen["status"] == "in_progress" and "min_free_disk_bytes" in seen["paused_reason"], seen
        low["now"] = False
        b = wait_for(client, b.id, ("completed", "failed"))
        assert b.status == "completed" and b.request_counts.completed == 40, b
        assert "paused_reason" not in httpx.get(f"{s.url}/v1/batches/{b.id}").json()
        assert len(backend.generated) == 40
