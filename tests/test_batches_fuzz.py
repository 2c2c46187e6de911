"""Hostile and odd inputs to the Files and Batch APIs on fake replicas: every one a 4xx in the error envelope naming
the field (never a 500), and the service serving on."""

import asyncio
import json
import time

import httpx
import pytest
from batch_fakes import TimedBackend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_batches_http import GEN, jsonl, req, serve, upload

from orchestrator.batch_input import read_lines

SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=8))
JSON = st.recursive(SCALARS,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=6)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    with serve(tmp, TimedBackend(2)) as s:
        s.wait_ready(timeout_s=30)
        s.fid = upload(s, jsonl(req("a", prompt="x"))).json()["id"]
        yield s


def wait_end(s, bid, timeout_s=30):
    deadline = time.time() + timeout_s
    while (b := httpx.get(f"{s.url}/v1/batches/{bid}").json())["status"] not in ("completed", "failed", "expired",
                                                                                  "cancelled"):
        assert time.time() < deadline, b
        time.sleep(0.02)
    return b


def create(s, **body):
    return httpx.post(f"{s.url}/v1/batches", json={"input_file_id": s.fid, "endpoint": GEN,
                                                   "completion_window": "24h", **body}, timeout=30)


@pytest.mark.parametrize("window", [[], {}, {"24h": 1}, ["24h"]])
def test_a_completion_window_that_is_a_list_or_object_is_a_400(server, window):
    r = create(server, completion_window=window)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "completion_window", r.text


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"]),
       value=JSON)
def test_any_json_in_a_create_field_is_answered_never_a_500(server, field, value):
    r = create(server, **{field: value})
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["error"]["param"] == field, r.text


def test_a_file_whose_data_is_gone_is_a_404_to_download_and_a_400_to_run(server):
    fid = upload(server, jsonl(req("a", prompt="x"))).json()["id"]
    jobs = server.server.config.app.state.jobs
    jobs.db.file(fid)[1].unlink()
    r = httpx.get(f"{server.url}/v1/files/{fid}/content")
    assert r.status_code == 404 and r.json()["error"]["param"] == "file_id", r.text
    r = httpx.post(f"{server.url}/v1/batches", json={"input_file_id": fid, "endpoint": GEN, "completion_window": "24h"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_file_id", r.text
    assert "upload the file again" in r.json()["error"]["message"], r.text
    assert httpx.delete(f"{server.url}/v1/files/{fid}").status_code == 200


def test_a_download_outlives_a_delete_of_its_file(server):
    """The content is read from a descriptor opened before the answer began: a DELETE in between unlinks the file,
    and the download still gets all of it."""
    data = jsonl(*[req(f"c{i}", prompt="p" * 1000) for i in range(1500)])  # more than one chunk
    fid = upload(server, data).json()["id"]
    with httpx.stream("GET", f"{server.url}/v1/files/{fid}/content") as r:
        assert r.status_code == 200 and int(r.headers["content-length"]) == len(data)
        got = iter(r.iter_raw())
        head = next(got)
        assert httpx.delete(f"{server.url}/v1/files/{fid}").json()["deleted"]
        assert head + b"".join(got) == data


@pytest.mark.parametrize("header,span", [
    ("bytes=abc", None), ("bytes=999999-", None), ("bytes=0-1,3-4", None), ("bytes=-", None),
    ("bytes=0-1", lambda n: (0, 1)), ("bytes=5-", lambda n: (5, n - 1)), ("bytes=-3", lambda n: (n - 3, n - 1)),
    ("bytes=2-99999999", lambda n: (2, n - 1)),
])
def test_a_range_of_a_file_is_served_or_ignored_never_a_plain_text_error(server, header, span):
    """One satisfiable range is a 206; any other (malformed, several, past the end) is ignored, as RFC 9110 allows:
    the whole file, where Starlette's file response answered in plain text, outside the envelope."""
    data = jsonl(req("a", prompt="x"))
    fid = upload(server, data).json()["id"]
    r = httpx.get(f"{server.url}/v1/files/{fid}/content", headers={"Range": header})
    assert r.headers["content-type"] == "application/jsonl", (r.status_code, r.text)
    if span is None:
        assert r.status_code == 200 and r.content == data
    else:
        first, last = span(len(data))
        assert r.status_code == 206 and r.content == data[first:last + 1]
        assert r.headers["content-range"] == f"bytes {first}-{last}/{len(data)}"


def test_a_file_with_a_byte_order_mark_and_crlf_line_ends_runs(server):
    """Windows tools write UTF-8 with a BOM (PowerShell 5's Out-File) and CRLF line ends; it used to be refused as
    "line 1: is not valid JSON (Unexpected UTF-8 BOM ...)"."""
    data = b"\xef\xbb\xbf" + jsonl(req("a", prompt="x"), req("b", prompt="y")).replace(b"\n", b"\r\n") + b"\r\n"
    r = upload(server, data)
    assert r.status_code == 200, r.text
    b = create(server, input_file_id=r.json()["id"]).json()
    b = wait_end(server, b["id"])
    assert b["status"] == "completed" and b["request_counts"] == {"total": 2, "completed": 2, "failed": 0}, b
    out = httpx.get(f"{server.url}/v1/files/{b['output_file_id']}/content").text
    assert sorted(json.loads(x)["custom_id"] for x in out.splitlines()) == ["a", "b"]
    assert [x.custom_id for x in read_lines(["\ufeff" + json.dumps(req("c", prompt="z"))], 1)] == ["c"]


def test_an_unexpected_error_on_one_line_fails_that_line_not_the_job(server, monkeypatch):
    """A line whose parsing or encoding raises something unforeseen (a bug, a codec's own error) is answered as a
    500 on that line; it used to stop the job, failed, with the lines after it never run."""
    from orchestrator import batches, outputs

    parse, encode = batches.parse_generation, outputs.b64_text

    def parse_generation(body, *args):
        if body.get("prompt") == "unreadable":
            raise KeyError("width")
        return parse(body, *args)

    def b64_text(picture, call):
        if call.requests[0].prompt == "unencodable":
            raise OSError("encoder error -2")
        return encode(picture, call)

    monkeypatch.setattr(batches, "parse_generation", parse_generation)
    monkeypatch.setattr(outputs, "b64_text", b64_text)  # (the server's sink, outputs.ServerSink, calls it)
    lines = [req("a", prompt="x"), req("b", prompt="unreadable"), req("c", prompt="unencodable"), req("d", prompt="y")]
    b = create(server, input_file_id=upload(server, jsonl(*lines)).json()["id"]).json()
    b = wait_end(server, b["id"])
    assert b["status"] == "completed" and b["request_counts"] == {"total": 4, "completed": 2, "failed": 2}, b
    out = {r["custom_id"]: r for r in map(json.loads, httpx.get(
        f"{server.url}/v1/files/{b['output_file_id']}/content").text.splitlines())}
    for cid in ("b", "c"):
        err = out[cid]["response"]["body"]["error"]
        assert out[cid]["response"]["status_code"] == 500 and err["type"] == "server_error", out[cid]
        assert "in its log" in err["message"] and "encoder error" not in err["message"], err
    assert out["d"]["response"]["status_code"] == 200


def test_the_job_database_is_opened_once_when_first_used_from_two_threads(tmp_path, monkeypatch):
    """POST /v1/batches looks its file up on a thread while the event loop may open the database too: each used to
    open its own, the second sweeping partial uploads and resetting the stored-bytes count after the first began."""
    import threading
    from types import SimpleNamespace

    from conftest import tiny_config

    from orchestrator import batch_api

    opened = []

    class SlowDB(batch_api.JobDB):
        def __init__(self, path):
            opened.append(path)
            time.sleep(0.1)  # long enough for the other thread to look meanwhile
            super().__init__(path)

    monkeypatch.setattr(batch_api, "JobDB", SlowDB)
    jobs = batch_api.JobService(SimpleNamespace(config=tiny_config(tmp_path)), outputs=None)
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(jobs.db)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(opened) == 1 and seen[0] is seen[1]
    jobs.db.close()


def test_files_are_listed_a_page_at_a_time(server):
    """GET /v1/files takes OpenAI's limit, after and order; they used to be ignored (every file, has_more false)."""
    from openai import OpenAI

    for i in range(3):
        upload(server, jsonl(req(f"p{i}", prompt="x")))
    every = httpx.get(f"{server.url}/v1/files").json()
    ids = [f["id"] for f in every["data"]]
    assert len(ids) >= 3 and not every["has_more"] and every["last_id"] == ids[-1]
    assert [f["id"] for f in httpx.get(f"{server.url}/v1/files?order=asc").json()["data"]] == ids[::-1]
    walked, after = [], None
    while True:
        page = httpx.get(f"{server.url}/v1/files", params={"limit": 2, **({"after": after} if after else {})}).json()
        assert len(page["data"]) <= 2 and page["first_id"] == page["data"][0]["id"], page
        walked += [f["id"] for f in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert walked == ids
    client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
    assert [f.id for f in client.files.list(limit=2)] == ids  # the client follows the pages
    for query, param in [("limit=0", "limit"), ("limit=10001", "limit"), ("order=newest", "order")]:
        r = httpx.get(f"{server.url}/v1/files?{query}")
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("after,status", [
    ({"anchor": "created_at", "seconds": 3600}, 200), (None, 200), ("1h", 400), ({"seconds": 3600}, 400),
    ({"anchor": "created_at", "seconds": 60}, 400), ({"anchor": "created_at", "seconds": True}, 400),
    ({"anchor": "completed_at", "seconds": 3600}, 400),
])
def test_output_expires_after_is_checked_against_openais_shape(server, after, status):
    r = create(server, output_expires_after=after)
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["param"] == "output_expires_after", r.text


def test_an_input_file_id_with_a_lone_surrogate_is_a_400_not_a_500(server):
    r = httpx.post(f"{server.url}/v1/batches", content=b'{"input_file_id": "file-\\ud800", "endpoint": "'
                   + GEN.encode() + b'", "completion_window": "24h"}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_file_id", r.text
    assert "\\ud800" in r.json()["error"]["message"], r.text


def test_an_output_is_rewritten_from_the_database_without_holding_it_all_in_memory(tmp_path):
    """A resumed or finalized job's output is rewritten from its records: gigabytes of base64 for a large job, which
    used to be read whole into memory (fetchall) on the way."""
    import tracemalloc

    from orchestrator.batch_db import JobDB

    db = JobDB(tmp_path / "batches.db")
    image = "A" * 200_000
    for i in range(150):  # 30 MB of records, in input order 1..150 though recorded out of order
        n = (i * 7) % 150 + 1
        db.record("b", f"c{n}", n, True, False, None, {"custom_id": f"c{n}", "b64_json": image})
    db.commit()
    tracemalloc.start()
    try:
        db.write_records("b", tmp_path / "out.jsonl")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [json.loads(x)["custom_id"] for x in lines] == [f"c{n}" for n in range(1, 151)]
    assert peak < 150 * len(image) / 4, f"peak {peak / 2**20:.1f} MiB to write {150 * len(image) / 2**20:.0f} MiB"
    db.close()


def held_rewrites(monkeypatch, hold):
    """``JobDB.write_records`` watched: the files it wrote on the event loop (``on_loop``), and each call that
    ``hold(batch_id, ok, entered)`` picks (``rewrites``) held until ``go`` is set, ``entered`` set as it starts."""
    import threading

    from orchestrator.batch_db import JobDB

    entered, go, on_loop, rewrites = threading.Event(), threading.Event(), [], []
    real = JobDB.write_records

    def write_records(self, batch_id, path, ok=None):
        try:
            asyncio.get_running_loop()
            on_loop.append(path.name)
        except RuntimeError:  # no loop running here: a worker thread
            pass
        if hold(batch_id, ok, entered.is_set()):
            rewrites.append((path.name, ok))
            entered.set()
            go.wait(10)
        return real(self, batch_id, path, ok)

    monkeypatch.setattr(JobDB, "write_records", write_records)
    return entered, go, on_loop, rewrites


def test_a_resumed_jobs_output_is_rewritten_off_the_event_loop_and_a_cancel_meanwhile_ends_it(tmp_path, monkeypatch):
    """A job resumed after a restart first rewrites its output from its records (gigabytes for a large one): that
    used to run on the event loop, every request waiting for it. A cancel that comes meanwhile ends the job before
    it takes a line."""
    from test_batch_edge_cases import raw_line, seed_batch

    from orchestrator.batch_db import JobDB

    db = JobDB(tmp_path / "batches" / "batches.db")
    now = int(time.time())
    seed_batch(db, tmp_path / "batches", "batch_resumed", raw_line('"c1"', '"p1"') + raw_line('"c2"', '"p2"'), 2,
               now - 10, status="in_progress", in_progress_at=now - 9)
    db.record("batch_resumed", "c1", 1, True, False, 0.1, {"custom_id": "c1", "response": None, "error": None})
    db.commit()
    db.close()
    entered, go, on_loop, _ = held_rewrites(monkeypatch, lambda batch_id, ok, entered: ok is None and not entered)
    backend = TimedBackend(2)
    with serve(tmp_path, backend) as s:
        try:
            s.wait_ready(timeout_s=30)
            assert entered.wait(10)
            r = httpx.post(f"{s.url}/v1/batches/batch_resumed/cancel", timeout=5)  # the loop answers meanwhile
            assert r.status_code == 200 and r.json()["status"] == "cancelling", r.text
        finally:
            go.set()
        b = wait_end(s, "batch_resumed")
        assert b["status"] == "cancelled" and b["request_counts"] == {"total": 2, "completed": 1, "failed": 0}, b
        out = httpx.get(f"{s.url}/v1/files/{b['output_file_id']}/content").text.splitlines()
        assert [json.loads(x)["custom_id"] for x in out] == ["c1"]
    assert backend.generated == [] and on_loop == []


def test_a_custom_id_never_writes_its_own_text_into_a_log_line(tmp_path, monkeypatch, caplog):
    """A line's trace id (``request_id=`` on the router's and replicas' log lines, and the output's
    ``response.request_id``) is ``batch_id:custom_id`` only when that is a valid X-Request-ID, else
    ``batch_id:line-N``; log messages show a custom_id escaped. A custom_id holding a line break used to forge a log
    line."""
    import logging

    from batch_fakes import TimedReplica

    from orchestrator.request_id import valid_request_id

    seen = []
    real = TimedReplica.run

    async def run(self, batch, on_progress=None):
        seen.extend(r.trace_id for r in batch.requests)
        return await real(self, batch, on_progress)

    monkeypatch.setattr(TimedReplica, "run", run)
    backend = TimedBackend(2)
    forged = "x\n2026-12-07 00:00:00 ERROR orchestrator: FORGED"
    lines = [req("plain-1", prompt="a"), req(forged, prompt="boom"), req("sp ace", prompt="b"),
             req("y" * 200, prompt="c")]
    with serve(tmp_path, backend) as s, caplog.at_level(logging.INFO):
        s.wait_ready(timeout_s=30)
        for r in backend.made.values():
            r.fail_prompts = {"boom"}
        s.fid = upload(s, jsonl(*lines)).json()["id"]
        b = wait_end(s, create(s).json()["id"])
        out = {r["custom_id"]: r for r in map(json.loads, httpx.get(
            f"{s.url}/v1/files/{b['output_file_id']}/content").text.splitlines())}
    assert len(seen) == 4 and all(valid_request_id(t) for t in seen), seen
    assert out["plain-1"]["response"]["request_id"] == f"{b['id']}:plain-1"
    assert out[forged]["response"]["status_code"] == 500 and f"{b['id']}:line-2" in seen
    assert out["sp ace"]["response"]["request_id"] == f"{b['id']}:line-3"
    assert out["y" * 200]["response"]["request_id"] == f"{b['id']}:line-4"
    assert not [r for r in caplog.records if "FORGED" in r.getMessage() and "\n" in r.getMessage()]


def test_cancelling_a_waiting_job_with_records_rewrites_its_output_off_the_event_loop_once(tmp_path, monkeypatch):
    """A job that waits its turn with requests already done (it ran before a restart) is ended by its cancel at
    once, and its output is rewritten from the database: on a thread, the service answering meanwhile (a second
    cancel included), and by that cancel alone (the worker, free again meanwhile, leaves it)."""
    import threading

    from test_batch_edge_cases import raw_line, seed_batch

    from orchestrator.batch_db import JobDB

    db = JobDB(tmp_path / "batches" / "batches.db")
    now = int(time.time())
    seed_batch(db, tmp_path / "batches", "batch_first", b"".join(raw_line(f'"a{i}"', f'"p{i}"') for i in range(60)),
               60, now - 20)
    seed_batch(db, tmp_path / "batches", "batch_waits", raw_line('"c1"', '"p1"') + raw_line('"c2"', '"p2"'), 2,
               now - 10)
    db.record("batch_waits", "c1", 1, True, False, 0.1, {"custom_id": "c1", "response": None, "error": None})
    db.commit()
    db.close()
    entered, go, on_loop, rewrites = held_rewrites(monkeypatch, lambda batch_id, ok, entered: batch_id == "batch_waits")
    with serve(tmp_path, TimedBackend(2, base_s=0.01, per_image_s=0.01)) as s:
        cancel = f"{s.url}/v1/batches/batch_waits/cancel"
        answers = {}
        try:
            s.wait_ready(timeout_s=30)
            deadline = time.time() + 30
            while httpx.get(f"{s.url}/v1/batches/batch_first").json()["status"] != "in_progress":
                assert time.time() < deadline
                time.sleep(0.02)
            t = threading.Thread(target=lambda: answers.setdefault("first", httpx.post(cancel, timeout=30)))
            t.start()
            assert entered.wait(10)  # the rewrite has begun, and holds
            assert httpx.get(f"{s.url}/v1/batches/batch_waits", timeout=5).json()["status"] == "finalizing"
            again = httpx.post(cancel, timeout=5)
            assert again.status_code == 200 and again.json()["status"] == "finalizing", again.text
            assert wait_end(s, "batch_first")["status"] == "completed"  # the worker is free while it is held
            time.sleep(0.3)
        finally:
            go.set()
        t.join(30)
        assert answers["first"].status_code == 200 and answers["first"].json()["status"] == "cancelled"
        b = wait_end(s, "batch_waits")
        assert b["status"] == "cancelled" and b["request_counts"] == {"total": 2, "completed": 1, "failed": 0}, b
        out = httpx.get(f"{s.url}/v1/files/{b['output_file_id']}/content").text.splitlines()
        assert [json.loads(x)["custom_id"] for x in out] == ["c1"]
    assert on_loop == [] and rewrites == [("batch_waits-output.jsonl", None)]
