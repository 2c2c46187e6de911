"""`zimage-orch batch`: input checks that name the line, a bad line failing alone, and resume after SIGKILL with
every custom_id once and no finished image generated again (fake replicas that count their images; no Ray)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from batch_fakes import TimedBackend, factory
from conftest import ROOT, tiny_config

from orchestrator.batch_cli import run_job
from orchestrator.batch_db import JobDB
from orchestrator.batch_input import read_lines
from zimage_common.errors import InvalidRequestError


def line(cid, url="/v1/images/generations", **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": {"size": "64x64", **body}})


def write_job(path: Path, n: int, **extra) -> Path:
    path.write_text("".join(line(f"c{i}", prompt=f"prompt {i}", seed=i, **extra) + "\n" for i in range(n)))
    return path


@pytest.mark.parametrize("lines,fragment", [
    (['{"custom_id": "a", "method": "POST", "url": "/v1/images/generations", "body": {"prompt": "x"}}', "{not json"],
     "line 2: is not valid JSON"),
    ([line("a", prompt="x"), line("b", prompt="y"), line("a", prompt="z")],
     "line 3: custom_id 'a' is already used on line 1"),
    ([line("a", url="/v1/chat/completions", prompt="x")], "line 1: url '/v1/chat/completions' is not an endpoint"),
    (['{"custom_id": "a", "method": "GET", "url": "/v1/images/generations", "body": {}}'], 'line 1: method must be'),
    (['[1, 2]'], "line 1: must be a JSON object"),
    ([line("a", prompt="x"), line("b", prompt="y"), line("c", prompt="z")], "more than 2 requests"),
])
def test_malformed_files_are_refused_naming_the_line(lines, fragment):
    with pytest.raises(InvalidRequestError) as e:
        list(read_lines([x.encode() for x in lines], max_lines=2))
    assert fragment in e.value.message


async def test_a_bad_line_fails_alone_and_a_rerun_skips_what_is_done(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([
        line("ok-1", prompt="one", seed=1), line("bad-size", prompt="two", size="100x64"),
        line("two-images", prompt="three", n=2, seed=5), line("stream", prompt="four", stream=True),
        line("replica-fails", prompt="boom")]) + "\n")
    cfg = tiny_config(tmp_path)
    backend = TimedBackend(2)

    async def start(config, observer=None):
        dep = await factory(backend)(config)
        for r in backend.made.values():
            r.fail_prompts = {"boom"}
        return dep

    s = await run_job(cfg, src, str(tmp_path / "out"), deployment_factory=start, progress=False)
    assert (s["done"], s["failed"], s["finished"]) == (2, 3, True)
    out = {r["custom_id"]: r for r in map(json.loads, (tmp_path / "out/output.jsonl").read_text().splitlines())}
    assert sorted(out) == ["bad-size", "ok-1", "replica-fails", "stream", "two-images"]
    assert out["bad-size"]["response"]["status_code"] == 400
    assert out["bad-size"]["response"]["body"]["error"]["param"] == "size"
    assert out["stream"]["response"]["body"]["error"]["param"] == "stream"
    assert out["replica-fails"]["response"]["status_code"] == 500
    data = out["two-images"]["response"]["body"]["data"]
    assert [d["seed"] for d in data] == [5, 6]
    assert all((tmp_path / "out" / d["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for d in data)
    assert sorted(backend.generated) == ["boom", "one", "three", "three"]

    s = await run_job(cfg, src, str(tmp_path / "out"), deployment_factory=start, progress=False)
    # the replica's failure is a server error (not retryable: it would fail the same way); nothing runs again
    assert s["skipped_as_done_before"] == 5 and s["this_run"]["images"] == 0
    assert sorted(backend.generated) == ["boom", "one", "three", "three"]

    other = write_job(tmp_path / "other.jsonl", 3)
    with pytest.raises(InvalidRequestError, match="another input file"):
        await run_job(cfg, other, str(tmp_path / "out"), deployment_factory=start, progress=False)


async def test_ctrl_c_still_writes_the_summary_and_a_rerun_finishes(tmp_path):
    """Ctrl-C under asyncio.run cancels the job's task: what this run did is still summarized (and written), nothing
    recorded is lost, and the same command run again finishes the rest."""
    import asyncio

    src = write_job(tmp_path / "in.jsonl", 60)
    cfg = tiny_config(tmp_path)
    backend = TimedBackend(2, base_s=0.01)
    task = asyncio.get_running_loop().create_task(
        run_job(cfg, src, str(tmp_path / "out"), deployment_factory=factory(backend), progress=False))
    while len(backend.generated) < 20 and not task.done():
        await asyncio.sleep(0.005)
    task.cancel()
    s = await task
    assert s["interrupted"] and not s["finished"] and 0 < s["done"] < 60
    assert s["this_run"]["images"] == s["done"] and s["this_run"]["images_per_s"] > 0
    assert json.loads((tmp_path / "out/summary.json").read_text())["done"] == s["done"]
    s2 = await run_job(cfg, src, str(tmp_path / "out"), deployment_factory=factory(backend), progress=False)
    assert s2["finished"] and s2["done"] == 60 and s2["skipped_as_done_before"] == s["done"]
    assert s2["all_runs"]["runs"] == 2 and s2["all_runs"]["images"] == 60  # the rate of the job over both runs
    assert s2["all_runs"]["elapsed_s"] == pytest.approx(s["this_run"]["elapsed_s"] + s2["this_run"]["elapsed_s"],
                                                        abs=2e-3)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="3.10's asyncio.run raises KeyboardInterrupt on Ctrl-C")
async def test_ctrl_c_while_the_deployment_shuts_down_still_writes_the_summary(tmp_path):
    import asyncio

    src = write_job(tmp_path / "in.jsonl", 10)
    cfg = tiny_config(tmp_path)
    closing = asyncio.Event()

    async def start(config, observer=None):
        dep = await factory(TimedBackend(2, base_s=0.0))(config, observer)
        real = dep.shutdown

        async def slow_shutdown():
            closing.set()
            await asyncio.sleep(0.5)
            await real()

        dep.shutdown = slow_shutdown
        return dep

    task = asyncio.get_running_loop().create_task(
        run_job(cfg, src, str(tmp_path / "out"), deployment_factory=start, progress=False))
    await asyncio.wait_for(closing.wait(), 30)
    task.cancel()
    s = await task
    assert s["interrupted"] and s["finished"] and s["done"] == 10
    assert json.loads((tmp_path / "out/summary.json").read_text())["done"] == 10


WORKER = """
import asyncio, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from batch_fakes import TimedBackend, factory
from conftest import tiny_config
from orchestrator.batch_cli import run_job
from orchestrator.batch_db import JobDB
cfg = tiny_config(Path({cache!r}))
backend = TimedBackend(2, base_s=0.02, per_image_s=0.0, count_file={count!r})
asyncio.run(run_job(cfg, Path({src!r}), {out!r}, deployment_factory=factory(backend), progress=False))
"""


def test_sigkill_halfway_then_rerun_generates_each_image_once(tmp_path):
    """2,000 lines; the job is SIGKILLed once about half of its images are generated, then run again: every
    custom_id is in the output exactly once, and no request whose line was written before the kill runs again."""
    n = 2000
    src = write_job(tmp_path / "in.jsonl", n)
    out, count = tmp_path / "out", tmp_path / "generated.txt"
    script = WORKER.format(tests=str(ROOT / "tests"), cache=str(tmp_path), count=str(count), src=str(src),
                           out=str(out))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path)
    deadline = time.time() + 120
    while (not count.exists() or len(count.read_text().splitlines()) < n // 2) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = count.read_text().splitlines()
    written = [json.loads(x)["custom_id"] for x in (out / "output.jsonl").read_text().splitlines()
               if x.endswith("}")]  # a line cut short by the kill is not a record
    db = JobDB(out / "batch.db")
    recorded = set(db.finished("cli"))
    db.close()
    assert n // 2 <= len(first) < n and 0 < len(written) and set(written) <= recorded

    subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, check=True, timeout=120)
    second = count.read_text().splitlines()[len(first):]
    records = [json.loads(x) for x in (out / "output.jsonl").read_text().splitlines()]
    ids = [r["custom_id"] for r in records]
    assert sorted(ids) == sorted(f"c{i}" for i in range(n))  # every custom_id exactly once
    assert all(r["response"]["status_code"] == 200 for r in records)
    rerun = {"c" + p.removeprefix("prompt ") for p in second}
    assert not rerun & recorded and len(second) == n - len(recorded)  # nothing recorded before the kill ran again
    summary = json.loads((out / "summary.json").read_text())
    print(f"\nSIGKILL resume: {n} lines; run 1 generated {len(first)} images, recorded {len(recorded)} and wrote "
          f"{len(written)} output lines before the kill; run 2 generated {len(second)} "
          f"({summary['this_run']['images_per_s']} img/s); replica calls in all {len(first) + len(second)} "
          f"(= {n} + {len(first) + len(second) - n} in flight at the kill, generated again)")


def test_cli_entry_point_refuses_a_bad_file_naming_the_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(line("a", prompt="x") + "\n" + line("a", prompt="y") + "\n")
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "batch", str(src), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 2 and f"{src}: line 2: custom_id 'a' is already used on line 1" in r.stderr
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "batch", str(tmp_path / "missing.jsonl"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: input: cannot read"), r.stderr
    assert "missing.jsonl" in r.stderr


async def test_images_and_output_go_to_s3(tmp_path, moto_s3):
    import boto3

    src = write_job(tmp_path / "in.jsonl", 6)
    cfg = tiny_config(tmp_path, outputs={"s3": {"bucket": "images", "endpoint_url": moto_s3, "region": "us-east-1",
                                                "addressing_style": "path"}})
    s = await run_job(cfg, src, "s3://images/run1", state=tmp_path / "state",
                      deployment_factory=factory(TimedBackend(2)), progress=False)
    assert (s["done"], s["output"]) == (6, "s3://images/run1/output.jsonl")
    s3 = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    out = [json.loads(x) for x in s3.get_object(Bucket="images", Key="run1/output.jsonl")["Body"].read().splitlines()]
    files = [r["response"]["body"]["data"][0]["file"] for r in out]
    assert len(out) == 6 and all(f.startswith("s3://images/run1/images/") for f in files)
    key = files[0].removeprefix("s3://images/")
    assert s3.get_object(Bucket="images", Key=key)["Body"].read()[:4] == b"\x89PNG"
    assert (tmp_path / "state" / "batch.db").exists()


async def test_an_s3_bucket_that_cannot_be_reached_is_refused_before_anything_runs(tmp_path, moto_s3, monkeypatch):
    import boto3

    from orchestrator.storage import StorageError

    def never():
        raise AssertionError("a deployment started")

    src = write_job(tmp_path / "in.jsonl", 2)
    cfg = tiny_config(tmp_path, outputs={"s3": {"bucket": "images", "endpoint_url": moto_s3, "region": "us-east-1",
                                                "addressing_style": "path"}})
    with pytest.raises(StorageError, match="s3://absent: .*404"):
        await run_job(cfg, src, "s3://absent/run1", state=tmp_path / "state", deployment_factory=never,
                      progress=False)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # its credentials are resolved once and kept
    with pytest.raises(StorageError, match="Unable to locate credentials; give credentials"):
        await run_job(cfg, src, "s3://images/run1", state=tmp_path / "state", deployment_factory=never,
                      progress=False)
    assert not (tmp_path / "state").exists()


def test_the_summary_shows_a_custom_id_escaped(capsys):
    """A custom_id holding a terminal escape or a line break was printed raw in the slowest prompts."""
    from orchestrator.batch_cli import print_summary

    run = {"done": 1, "failed": 0, "images": 1, "elapsed_s": 1.0, "images_per_s": 1.0}
    print_summary({"done": 1, "requests": 1, "failed": 0, "skipped_as_done_before": 0, "this_run": run,
                   "all_runs": {"runs": 1, "images_per_s": None}, "output": "out",
                   "slowest": [{"custom_id": "a\x1b[2J\nforged", "latency_s": 1.0, "prompt": "p"}]})
    out = capsys.readouterr().out
    assert "\x1b" not in out and "forged" in out and "\nforged" not in out
