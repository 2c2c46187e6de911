"""``zimage-orch batch INPUT.jsonl --config F --out DIR|s3://bucket/prefix``: a batch job on a deployment of its own,
in this process, kept saturated (``batches.max_inflight`` images queued or running), with a progress bar of
images/s and the ETA. It writes every image (``DIR/images/<custom_id>-<i>.<format>``, or under the s3 prefix), one
``output.jsonl`` line per request (an ``ImagesResponse`` body whose ``data`` entries name the image ``file``, or the
failure's status and envelope) and the job's state (``batch.db``; with an s3 ``--out`` in ``--state``). Rerun the
same command after a crash or Ctrl-C: finished requests are skipped (failures a retry may fix run again).
README.md, "Batch jobs", has the details."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import sqlite3
import sys
import time
from pathlib import Path

from zimage_common.config import Config, load_config
from zimage_common.errors import InvalidRequestError, ZImageError
from zimage_common.image_codec import image_bytes
from zimage_common.messages import ImageResult

from .batch_db import JobDB
from .batch_input import ENDPOINTS, Line, file_digest, read_lines
from .batches import JobRunner, Outcome, OutputFile
from .cli_args import at_least, output_dir
from .images_api import ImageCall
from .requests import shown
from .storage import CONTENT_TYPES, run_blocking

JOB_ID = "cli"
INTERRUPTED = "interrupted: finished requests are recorded; rerun the same command to go on"


def image_name(custom_id: str, index: int, extension: str) -> str:
    """A file name for a request's image: readable, safe on every filesystem, and unique per custom_id (the
    hash keeps apart ids that differ only in characters the readable part drops)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", custom_id)[:80].lstrip(".") or "_"
    digest = hashlib.sha256(custom_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"images/{safe}-{digest}-{index}.{extension}"


class FileSink(OutputFile):
    """Images as files under a directory or in an S3 prefix; the output JSONL on local disk."""

    def __init__(self, output: Path, directory: Path | None = None, s3=None, s3_uri: str = ""):
        super().__init__(output)
        self.directory = directory
        self.s3 = s3  # a storage.S3Store
        self.s3_uri = s3_uri.rstrip("/")

    def _write(self, name: str, image, call: ImageCall) -> str:
        data = image_bytes(image, call.output_format, call.output_compression)
        if self.s3 is not None:
            self.s3.put(name, data, CONTENT_TYPES[call.output_format])
            return f"{self.s3_uri}/{name}"
        path = self.directory / name
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return name

    async def store(self, line: Line, call: ImageCall, results: list[ImageResult]) -> list[dict]:
        names = [image_name(line.custom_id, i, call.output_format) for i in range(len(results))]
        files = await asyncio.gather(*(run_blocking(self._write, n, r.picture, call) for n, r in zip(names, results)))
        return [{"file": f} for f in files]


def _open_job(db: JobDB, input_path: Path, total: int) -> dict:
    digest = file_digest(input_path)
    job = db.batch(JOB_ID)
    if job is not None and job["input_digest"] != digest:
        raise InvalidRequestError(f"{db.path} holds a job for another input file ({job['input']}, digest "
                                  f"{job['input_digest'][:12]}...); use another --out, or delete it to start over")
    if job is None:
        job = {"id": JOB_ID, "created_at": int(time.time()), "input": str(input_path), "input_digest": digest,
               "total": total}
        db.put_batch(job)
    return job


def _record_run(db: JobDB, run: dict) -> dict:
    """Adds this run to the job's record and returns every run's together (images over the time the runs
    generated, start-up excluded; a run ended by SIGKILL never recorded itself and is not counted)."""
    job = db.batch(JOB_ID)
    job["runs"] = [*job.get("runs", []), {k: run[k] for k in ("done", "failed", "images", "elapsed_s")}]
    db.put_batch(job)
    images = sum(r["images"] for r in job["runs"])
    elapsed = sum(r["elapsed_s"] for r in job["runs"])
    return {"runs": len(job["runs"]), "images": images, "elapsed_s": round(elapsed, 3),
            "images_per_s": round(images / elapsed, 4) if elapsed > 0 else None}


def _check(input_path: Path, config: Config) -> dict[str, int]:
    """Every line checked before anything runs; the images each custom_id asks for (its n), for the bar."""
    images: dict[str, int] = {}
    try:
        f = open(input_path, "rb")  # noqa: SIM115 - closed below; only the open's error is the input's
    except OSError as e:
        raise InvalidRequestError(f"input: cannot read {str(input_path)!r}: {e.strerror}", param="input") from None
    with f:
        try:
            for line in read_lines(f, config.batches.cli_max_lines, ENDPOINTS, "batches.cli_max_lines"):
                n = line.body.get("n", 1)
                images[line.custom_id] = n if isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 128 else 1
        except InvalidRequestError as e:  # the file's name with the line's number, as compilers print them
            raise InvalidRequestError(f"{input_path}: {e.message}", param="input") from None
    if not images:
        raise InvalidRequestError(f"{input_path} holds no requests (one JSON object a line)")
    return images


def _check_paths(input_path: Path, state: Path) -> None:
    """Refuse what would destroy a file the job did not write: the input named as one of the job's own files, or a
    new job (no batch.db yet) over an output another run or tool left (output.jsonl is rewritten from the job's
    records at every start)."""
    own = {name: state / name for name in ("output.jsonl", "summary.json", "batch.db")}
    for name, path in own.items():
        if path.exists() and path.resolve() == input_path.resolve():
            raise InvalidRequestError(f"input: {input_path} is this job's own {name} (in --state {state}); give the "
                                      f"job another --out or --state, or move the input", param="input")
    if not own["batch.db"].exists() and own["output.jsonl"].exists():
        raise InvalidRequestError(f"--state {state}: holds an output.jsonl but no batch.db, so it is not this job's "
                                  f"and starting would overwrite it; give another --out (or --state), or remove "
                                  f"{own['output.jsonl']}", param="--state")


async def run_job(config: Config, input_path: Path, out: str, state: Path | None = None, deployment_factory=None,
                  window: int | None = None, progress: bool = True) -> dict:
    from tqdm import tqdm

    images = _check(input_path, config)
    s3 = None
    if out.startswith("s3://"):
        from .storage import S3Store

        bucket, _, prefix = out[len("s3://"):].partition("/")
        if not bucket:
            raise InvalidRequestError(f"--out {out!r}: name the bucket, s3://BUCKET/PREFIX", param="--out")
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        s3_cfg = config.outputs.s3
        s3 = S3Store(bucket, prefix, config.outputs.url_ttl_s,
                     endpoint_url=s3_cfg.endpoint_url if s3_cfg else None, region=s3_cfg.region if s3_cfg else None,
                     addressing_style=s3_cfg.addressing_style if s3_cfg else "auto")
        await run_blocking(s3.check)  # before the deployment starts, not at the first upload
        state = state or Path("zimage-batch-state") / bucket / prefix.strip("/")
        directory = None
    else:
        directory = output_dir(out)
        state = state or directory
        output_dir(directory / "images")
    output_dir(state, "--state")
    _check_paths(input_path, state)
    try:
        db = JobDB(state / "batch.db")
        _open_job(db, input_path, len(images))
    except sqlite3.OperationalError as e:  # locked (another run of this job?), or it cannot be opened
        raise InvalidRequestError(f"--state {state}: cannot use {state / 'batch.db'} ({e}); is another run using "
                                  f"this --state?", param="--state") from None
    except sqlite3.DatabaseError as e:
        raise InvalidRequestError(f"--state {state}: {state / 'batch.db'} is not a job's state ({e}); give another "
                                  f"--state (or --out), or remove it to start the job over", param="--state") from None
    retried = db.forget_retryable(JOB_ID)
    output = state / "output.jsonl"
    db.write_records(JOB_ID, output)
    done_before = db.finished(JOB_ID)
    sink = FileSink(output, directory, s3, out)

    from .deployment import Deployment

    dep = await (deployment_factory or Deployment.start)(config)
    window = window or config.batches.max_inflight or 3 * max(1, len(dep.replicas)) * config.router.max_batch_size
    bar = tqdm(total=sum(images.values()), initial=sum(images.get(c, 0) for c in done_before), unit="img",
               desc="batch", disable=not progress, smoothing=0.1, dynamic_ncols=True)
    counts = {"done": 0, "failed": 0, "images": 0}

    def on_outcome(o: Outcome) -> None:
        counts["done" if o.ok else "failed"] += 1
        counts["images"] += o.images
        bar.update(images.get(o.line.custom_id, 1))
        if not o.ok:
            bar.set_postfix(failed=counts["failed"], refresh=False)

    runner = JobRunner(dep, config, db, JOB_ID, sink, window, on_outcome)
    t0 = time.perf_counter()
    finished = interrupted = False
    try:
        with open(input_path, "rb") as f:
            finished = await runner.run(read_lines(f, config.batches.cli_max_lines, ENDPOINTS,
                                                   "batches.cli_max_lines"))
    except asyncio.CancelledError:
        # Ctrl-C (asyncio.run cancels this task, Python 3.11 on): the summary of what this run did is still written
        # and printed; taking the cancellation back lets asyncio.run return it instead of raising KeyboardInterrupt
        # (3.10's asyncio.run raises KeyboardInterrupt without cancelling: cmd_batch says what to do then)
        interrupted = _take_back_cancel()
    finally:
        elapsed = time.perf_counter() - t0
        bar.close()
        sink.close()
        if not runner.output_complete:  # a write of committed lines failed: the database has every one
            db.write_records(JOB_ID, output)
        try:
            await dep.shutdown()
        except asyncio.CancelledError:  # Ctrl-C while shutting down: what the run did is still summarized
            interrupted = _take_back_cancel()
        if s3 is not None:
            await run_blocking(s3.put, "output.jsonl", output.read_bytes(), CONTENT_TYPES["jsonl"])
    ok_total, failed_total = db.counts(JOB_ID)
    this_run = {"done": counts["done"], "failed": counts["failed"], "images": counts["images"],
                "elapsed_s": round(elapsed, 3), "images_per_s": round(counts["images"] / elapsed, 4)
                if elapsed > 0 else None}
    runs = _record_run(db, this_run)
    summary = {
        "input": str(input_path), "output": str(output) if s3 is None else f"{out.rstrip('/')}/output.jsonl",
        "requests": len(images), "done": ok_total, "failed": failed_total, "skipped_as_done_before": len(done_before),
        "retried_failures": retried, "this_run": this_run, "all_runs": runs,
        "window": runner.window, "interrupted": interrupted,
        "finished": finished and ok_total + failed_total == len(images),
        "slowest": [{"custom_id": c, "latency_s": round(t, 3), "prompt": p}
                    for t, c, p in sorted(runner.slowest, reverse=True)],
    }
    (state / "summary.json").write_text(json.dumps(summary, indent=2))
    db.close()
    return summary


def _take_back_cancel() -> bool:
    """Takes back the current task's cancellation (Python 3.11 on), so asyncio.run returns the summary instead of
    raising; True, for ``interrupted``."""
    task = asyncio.current_task()
    if hasattr(task, "uncancel"):
        task.uncancel()
    return True


def print_summary(s: dict) -> None:
    run = s["this_run"]
    rate = f"{run['images_per_s']:.2f} images/s" if run["images_per_s"] is not None else "-"
    print(f"\n{s['done']}/{s['requests']} requests done, {s['failed']} failed"
          f" ({s['skipped_as_done_before']} done by an earlier run); this run: {run['images']} images in "
          f"{run['elapsed_s']:.1f}s, {rate}")
    every = s["all_runs"]
    if every["runs"] > 1 and every["images_per_s"] is not None:
        print(f"all {every['runs']} runs: {every['images']} images in {every['elapsed_s']:.1f}s, "
              f"{every['images_per_s']:.2f} images/s (start-ups excluded)")
    if s["slowest"]:
        print("slowest prompts:")
        for x in s["slowest"]:
            # both escaped: a custom_id or prompt may hold terminal control sequences or line breaks
            print(f"  {x['latency_s']:8.2f}s  {shown(x['custom_id'], 80)}  {x['prompt']!r}")
    print(f"output: {s['output']}")


def cmd_batch(args, deployment_factory=None) -> int:
    config = load_config(args.config, args.set)
    try:
        summary = asyncio.run(run_job(config, Path(args.input), args.out, Path(args.state) if args.state else None,
                                      deployment_factory, args.window, progress=not args.no_progress))
    except ZImageError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{INTERRUPTED}", file=sys.stderr)
        return 130
    print_summary(summary)
    if summary["interrupted"]:
        print(INTERRUPTED, file=sys.stderr)
    if not summary["finished"]:
        return 130
    return 0 if summary["failed"] == 0 else 1


def add_parser(sub) -> None:
    p = sub.add_parser("batch", help="run a batch job (OpenAI batch JSONL) on a deployment, resumable")
    p.add_argument("input", help="JSONL, one request a line: {custom_id, method: POST, url, body}")
    p.add_argument("--config", default=None, help="deployment config (default: the embedded CPU demo)")
    p.add_argument("--out", required=True, help="a directory, or s3://bucket/prefix (outputs.s3 gives the endpoint)")
    p.add_argument("--state", default=None, help="where batch.db and output.jsonl live (default: --out; for s3, "
                                                 "./zimage-batch-state/BUCKET/PREFIX)")
    p.add_argument("--window", type=at_least(1), default=None, help="images queued or running at once "
                                                             "(default: batches.max_inflight, or 3 batches a replica)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a config field")
    p.set_defaults(fn=cmd_batch)
