"""Running a batch job: each line through the deployment, many in flight, each outcome recorded once; shared by
``zimage-orch batch`` (``batch_cli.py``) and ``POST /v1/batches`` (``batch_api.py``). Each line's body is checked as
the API checks it (a bad one fails alone); its requests are queued with ``BATCH_JOB`` priority within the job's
window (a full queue means wait, never fail); its images go to the job's sink, then its outcome to SQLite
(``batch_db.py``); every ``FLUSH_S`` the recorded outcomes are committed, and only then appended to the output
JSONL. So an output line is always a committed record: a rerun after a crash rewrites the output from the database
and skips every recorded ``custom_id``; what was in flight runs again (same seed, same image).

The records and the output writes run in order on one thread of the job's own, at batch-job CPU priority
(``zimage_common/cpu_priority.py``), not on the event loop the interactive requests share: each line's JSON text
(its images' base64 included) is made once there, for the database and the output file alike."""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from zimage_common.config import Config
from zimage_common.cpu_priority import lower_this_thread
from zimage_common.errors import InvalidRequestError, NotReadyError, QueueFullError, ZImageError
from zimage_common.messages import BATCH_JOB, ImageResult, failure

from .batch_db import JobDB, dumps
from .batch_input import EDITS, Line, read_lines
from .images_api import ImageCall, images_response, parse_generation, parse_json_edit
from .request_id import valid_request_id
from .requests import shown

log = logging.getLogger(__name__)

FLUSH_S = 0.25  # how often outcomes are committed and written out (at most this much work is redone after a crash)
PAUSE_POLL_S = 1.0  # how often a paused job looks at the disk again
PAUSE_LOG_S = 60.0  # how often a paused job says so in the log
QUEUE_FULL_RETRY_S = 0.05


@dataclass(frozen=True)
class Outcome:
    line: Line
    ok: bool
    record: dict  # the output line: {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}
    retryable: bool = False
    latency_s: float | None = None
    images: int = 0


class Sink(Protocol):
    async def store(self, line: Line, call: ImageCall, results: list[ImageResult]) -> list[dict]:
        """Store a line's images; return each one's entry in the response's ``data`` (``{"url": ...}``,
        ``{"b64_json": ...}``, ``{"file": ...}``). Raise ``StorageError`` when they cannot be stored."""

    def append(self, lines: list[str]) -> None:
        """Append committed output lines (JSON text) to the output file."""


class OutputFile:
    """The ``append`` of a sink: the job's output JSONL on local disk, flushed after every group of lines."""

    def __init__(self, output: Path):
        self._out = open(output, "a", encoding="utf-8")

    def append(self, lines: list[str]) -> None:
        self._out.write("".join(x + "\n" for x in lines))
        self._out.flush()

    def close(self) -> None:
        self._out.close()


def trace_id(batch_id: str, line: Line) -> str:
    """A line's requests' id on every log line about them (the router's and replicas' ``request_id=``) and in its
    output's ``response.request_id``: ``batch_id:custom_id`` where that is a valid X-Request-ID, else
    ``batch_id:line-N`` (a custom_id may be any text: a line break in it would forge log lines)."""
    trace = f"{batch_id}:{line.custom_id}"
    return trace if valid_request_id(trace) else f"{batch_id}:line-{line.number}"


def record(line: Line, status: int, body: dict | None, request_id: str = "", error: dict | None = None) -> dict:
    response = None if body is None else {"status_code": status, "request_id": request_id, "body": body}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id, "response": response,
            "error": error}


def failed(line: Line, status: int, type_: str, message: str, param: str | None = None, code: str | None = None,
           retryable: bool = False, latency_s: float | None = None) -> Outcome:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Outcome(line, False, record(line, status, body), retryable, latency_s)


EXPIRED = {"code": "batch_expired", "message": "This request could not be executed before the completion window "
                                               "expired."}


def expire_unrun(db, b: dict, max_lines: int, output: Path) -> int:
    """A server job that expired (on a thread: its input may be 200 MB): each request it never ran recorded as failed
    with ``batch_expired`` and no response, as OpenAI's error file lists them (send them again by custom_id), and
    ``output`` rewritten from the records with them. Returns how many."""
    found, done = db.file(b["input_file_id"]), db.finished(b["id"])
    unrun = []
    try:
        if found is None:
            raise OSError(f"its input file {b['input_file_id']} is gone")
        with open(found[1], "rb") as f:
            unrun = [x for x in read_lines(f, max_lines, (b["endpoint"],)) if x.custom_id not in done]
    except (OSError, InvalidRequestError) as e:  # no input file, or one it cannot read: none listed
        log.error("batch %s expired; its requests that never ran are not listed (%s)", b["id"], e)
    for x in unrun:
        db.record(b["id"], x.custom_id, x.number, False, False, None, record(x, 0, None, error=EXPIRED))
    db.commit()
    db.write_records(b["id"], output)
    log.info("batch %s expired: %d request(s) never ran (batch_expired in its error file)", b["id"], len(unrun))
    return len(unrun)


def _result_failure(line: Line, r: ImageResult, latency_s: float) -> Outcome:
    f = failure(r.error_type)
    if f.http_status < 500:
        message = r.error or "invalid request"
    elif f.http_status == 507:
        message = f"out of GPU memory for a single {r.width}x{r.height} image; use a smaller size"
    elif f.http_status in (503, 504):
        message = r.error or "no replica could run this request"
    else:  # the replica's own text stays in the server log, as for the HTTP API
        log.error("batch line %d (%s) failed on replica %s: %s", line.number, shown(line.custom_id),
                  r.replica_id or "-", r.error)
        message = f"the server failed to generate this image (request {r.request_id}); the cause is in its log"
    return failed(line, f.http_status, f.openai_type, message, r.param if f.http_status == 400 else None,
                  str(r.error_type) if r.error_type else None, f.retryable, latency_s)


class JobRunner:
    """Runs the lines of one job on a deployment (``Deployment`` or anything with ``admit``, ``max_side`` and
    ``lora_names``), keeping ``window`` images queued or running."""

    def __init__(self, dep, config: Config, db: JobDB, batch_id: str, sink: Sink, window: int,
                 on_outcome: Callable[[Outcome], None] | None = None,
                 pause_reason: Callable[[], str | None] | None = None):
        self.dep = dep
        self.config = config
        self.db = db
        self.batch_id = batch_id
        self.sink = sink
        self.window = max(window, config.limits.max_n)  # a line of n images must always fit
        self.on_outcome = on_outcome
        self.in_flight = 0
        self._room = asyncio.Condition()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"job-writer-{batch_id}"[:40],
                                          initializer=lower_this_thread)
        self._pending: list[str] = []  # recorded, not yet committed: their output lines (the writer's only)
        self.unrecorded = 0  # lines whose outcome could not be recorded even as a failure (the writer's only)
        # False once a write of committed lines to the output failed: the file is then rebuilt from the database
        self.output_complete = True
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self.slowest: list[tuple[float, str, str]] = []  # (latency, custom_id, prompt): the 5 slowest of this run
        # asked before each line is taken: while it gives a reason the run waits (the lines in flight finish)
        self.pause_reason = pause_reason
        self.paused: str | None = None  # the reason while the run waits, for the batch object

    # ---- the job -----------------------------------------------------------------------------------------
    async def run(self, lines: Iterable[Line]) -> bool:
        """Run every line not yet recorded; True when every one was (False: stopped by ``stop``)."""
        done = self.db.finished(self.batch_id)
        flusher = asyncio.get_running_loop().create_task(self._flush_every())
        try:
            for line in lines:
                if self._stopping:
                    break
                if line.custom_id in done:
                    continue
                if self.pause_reason is not None:
                    await self._while_paused()
                    if self._stopping:
                        break
                outcome_or_call = await self._call(line)
                if isinstance(outcome_or_call, Outcome):
                    self._finish(outcome_or_call)
                    continue
                n = len(outcome_or_call.requests)
                await self._take(n)
                if self._stopping:
                    await self._give(n)
                    break
                task = asyncio.get_running_loop().create_task(self._one(line, outcome_or_call))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
        except BaseException:
            # Ctrl-C, or an input line that cannot be read: drop what is in flight (no task outlives the run), keep
            # what is recorded
            self.stop()
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            raise
        finally:
            flusher.cancel()
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - committed lines are in the database: the output is rebuilt from it
                log.exception("batch %s: writing the last outcomes failed", self.batch_id)
            self._writer.shutdown(wait=True)
        return not self._stopping

    async def _while_paused(self) -> None:
        """Wait while ``pause_reason`` gives a reason (a dip below the disk's floor must not fail a job that could
        finish once there is room); a stop (cancel, expiry, shutdown) ends the wait."""
        said = None  # when the pause was last logged (None: not paused)
        while not self._stopping and (reason := self.pause_reason()) is not None:
            self.paused = reason
            now = time.monotonic()
            if said is None or now - said >= PAUSE_LOG_S:
                log.warning("batch %s paused: %s", self.batch_id, reason)
                said = now
            await asyncio.sleep(PAUSE_POLL_S)
        self.paused = None
        if said is not None and not self._stopping:
            log.info("batch %s resumed", self.batch_id)

    def stop(self) -> None:
        """Stop taking lines and drop those in flight (queued requests leave the router; they run again on a
        rerun). Recorded outcomes stay."""
        self._stopping = True
        for t in list(self._tasks):
            t.cancel()
        try:  # a run waiting for room in the window wakes (a task cancelled before it ran never gives its room)
            asyncio.get_running_loop().create_task(self._wake())
        except RuntimeError:  # not on the loop: nothing there waits
            pass

    async def _wake(self) -> None:
        async with self._room:
            self._room.notify_all()

    # ---- one line ----------------------------------------------------------------------------------------
    async def _call(self, line: Line) -> ImageCall | Outcome:
        body = line.body
        if body.get("stream"):
            return failed(line, 400, "invalid_request_error", "stream is not available in a batch job (its output "
                          "is a file); leave stream out", param="stream")
        dep = self.dep
        try:
            if line.url == EDITS or body.get("control_image") is not None:  # images to decode: off the loop
                fn = parse_json_edit if line.url == EDITS else parse_generation
                call = await asyncio.get_running_loop().run_in_executor(
                    None, fn, body, self.config, getattr(dep, "max_side", None), getattr(dep, "lora_names", None))
            else:
                call = parse_generation(body, self.config, getattr(dep, "max_side", None),
                                        getattr(dep, "lora_names", None))
        except ZImageError as e:
            return failed(line, e.http_status, e.error_type, e.message, e.param)
        except Exception:  # noqa: BLE001 - a fault in the parser: this line fails (as the API's 500), not the job
            log.exception("batch %s line %d (%s): reading the request failed", self.batch_id, line.number,
                          shown(line.custom_id))
            return failed(line, 500, "server_error", "the server failed to read this request; the cause is in its "
                          "log")
        trace = trace_id(self.batch_id, line)
        return replace(call, requests=[replace(r, priority=BATCH_JOB, trace_id=trace) for r in call.requests])

    async def _one(self, line: Line, call: ImageCall) -> None:
        t0 = time.perf_counter()
        n = len(call.requests)
        try:
            waiters = await self._admit(line, call)
            if isinstance(waiters, Outcome):
                self._finish(waiters)
                return
            results = list(await asyncio.gather(*waiters))
        finally:
            await self._give(n)
        latency = time.perf_counter() - t0
        bad = next((r for r in results if not r.ok), None)
        if bad is not None:
            self._finish(_result_failure(line, bad, latency))
            return
        try:
            entries = await self.sink.store(line, call, results)
        except ZImageError as e:  # StorageError: retryable, the line runs again on a rerun
            # the store's own text names host paths and credentials' errors: the log has it, the client's file not
            log.error("batch %s line %d: %s", self.batch_id, line.number, e.message)
            self._finish(failed(line, e.http_status, e.error_type, "the images were generated but could not be "
                                "stored (the storage backend failed; the cause is in the server log); the line runs "
                                "again if the job is resumed", code="storage_unavailable", retryable=True,
                                latency_s=latency))
            return
        except Exception:  # noqa: BLE001 - an encoder's own error: this line fails, the job goes on
            log.exception("batch %s line %d (%s): encoding its images failed", self.batch_id, line.number,
                          shown(line.custom_id))
            self._finish(failed(line, 500, "server_error", f"the server failed to encode this request's images "
                                f"(request {call.requests[0].trace_id}); the cause is in its log", latency_s=latency))
            return
        body = images_response(call, results, [""] * len(results), int(time.time()))
        body["data"] = [{**entry, "seed": r.seed} for entry, r in zip(entries, results)]
        self._finish(Outcome(line, True, record(line, 200, body, call.requests[0].trace_id), False, latency,
                             len(results)))
        entry = (latency, line.custom_id, call.requests[0].prompt[:80])
        if len(self.slowest) < 5:
            heapq.heappush(self.slowest, entry)
        else:
            heapq.heappushpop(self.slowest, entry)

    async def _admit(self, line: Line, call: ImageCall) -> list[Awaitable[ImageResult]] | Outcome:
        """Queue the line's requests; a full queue or a deployment between replicas is waited out."""
        waited = 0.0
        while True:
            try:
                return self.dep.admit(call.requests)
            except (QueueFullError, NotReadyError) as e:
                if waited > self.config.router.request_timeout_s:
                    return failed(line, e.http_status, e.error_type, e.message, retryable=True)
                pause = QUEUE_FULL_RETRY_S if isinstance(e, QueueFullError) else 1.0
                await asyncio.sleep(pause)
                waited += pause
            except InvalidRequestError as e:  # too large for every replica (CapacityError) and the like
                return failed(line, e.http_status, e.error_type, e.message, e.param)

    # ---- the window and the records ----------------------------------------------------------------------
    async def _take(self, n: int) -> None:
        async with self._room:
            await self._room.wait_for(lambda: self.in_flight + n <= self.window or self._stopping)
            self.in_flight += n

    async def _give(self, n: int) -> None:
        async with self._room:
            self.in_flight -= n
            self._room.notify_all()

    def _finish(self, o: Outcome) -> None:
        try:
            self._writer.submit(self._record, o)
        except RuntimeError:  # a task that outlived ``run`` (it raised): recorded here, committed with the next
            self._record(o)
        if self.on_outcome is not None:
            self.on_outcome(o)

    def _record(self, o: Outcome) -> None:
        """On the writer: the outcome into the database (uncommitted) and its line into the pending output. An
        outcome that cannot be recorded is recorded as the line's failure instead, retryable (a rerun tries it
        again): left unrecorded, the job would never count it done and never end. When even that fails,
        ``unrecorded`` counts the line, and a server job ends failed (``batch_api``)."""
        try:
            text = dumps(o.record)
            self.db.record(self.batch_id, o.line.custom_id, o.line.number, o.ok, o.retryable, o.latency_s, text)
        except Exception as e:  # noqa: BLE001 - any error: the line must still end
            log.exception("batch %s: recording line %d failed; it is recorded as failed", self.batch_id,
                          o.line.number)
            f = failed(o.line, 500, "server_error", f"the outcome of this request could not be recorded "
                       f"({type(e).__name__}); the cause is in the server log", code="record_failed",
                       retryable=True, latency_s=o.latency_s)
            try:
                text = dumps(f.record)
                self.db.record(self.batch_id, o.line.custom_id, o.line.number, False, True, o.latency_s, text)
            except Exception:  # noqa: BLE001 - the database itself refuses: counted, never retried in a loop
                log.exception("batch %s: recording line %d as failed failed too", self.batch_id, o.line.number)
                self.unrecorded += 1
                return
        self._pending.append(text)

    def _write(self) -> None:
        """On the writer: commit what is recorded, then write it out (an output line is never ahead of the
        database)."""
        if not self._pending:
            return
        self.db.commit()
        pending, self._pending = self._pending, []
        try:
            self.sink.append(pending)
        except BaseException:
            self.output_complete = False  # committed, but not all in the file: rebuilt from the database at the end
            raise

    def flush(self) -> None:
        """Record, commit and write out every outcome finished so far; returns when it is done."""
        self._writer.submit(self._write).result()

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                await asyncio.wrap_future(self._writer.submit(self._write))
            except Exception:  # noqa: BLE001 - a full disk must not kill the job silently; the log says why
                log.exception("batch %s: writing outcomes failed; retrying", self.batch_id)
