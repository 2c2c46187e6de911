"""OpenAI's Files and Batch APIs for image requests (README.md lists the endpoints): upload a JSONL file, run it as a
job beside interactive traffic, download the output. The file is checked at upload (``batch_input.py``: a 400 names
the first bad line); each body is checked when its line runs, and a bad one fails alone. Jobs live in SQLite
(``batch_db.py``) and run one at a time at ``BATCH_JOB`` priority (interactive requests go first); a job in progress
when the server stopped resumes when it starts again. The output file holds one line per request, in the order
they finished (input order where it was rewritten from the database); the error file only the failed ones."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from zimage_common.errors import InvalidRequestError, ZImageError
from zimage_common.messages import FailureKind

from .batch_db import JobDB, creation_order
from .batch_input import COMPLETION_WINDOW_S, check_batch_body, check_file, is_text, printable, read_lines
from .batches import JobRunner, expire_unrun
from .file_quota import FileQuota, StorageRefused
from .http_errors import error_response, from_exception
from .outputs import Outputs, ServerSink, file_response
from .requests import decimal, shown
from .storage import run_blocking
from .uploads import BodyReservation, BodyTooLarge, limited, parse_json, read_body, receive_jsonl_upload

log = logging.getLogger(__name__)

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
MAX_LIST = 100  # GET /v1/batches?limit= (OpenAI's range: 1 to 100)
MAX_FILES_LIST = 10_000  # GET /v1/files?limit= (OpenAI's range and default: 1 to 10,000)
CHECK_COPIES = 3  # a line being checked is held as bytes, as text and parsed (its long string copied once more)
PUBLIC = ("id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status", "output_file_id",
          "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
          "expired_at", "cancelling_at", "cancelled_at", "request_counts", "metadata")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class JobService:
    """The server's files and jobs, and the task that runs the jobs one after another."""

    def __init__(self, service, outputs: Outputs):
        self.service = service
        self.config = service.config
        self.outputs = outputs
        self.directory = Path(self.config.batches.directory)
        self._db: JobDB | None = None
        self._open_lock = threading.Lock()
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.runner: JobRunner | None = None
        self.running_id: str | None = None
        self._stopping = False  # the server is shutting down: a job stopped part-way resumes at the next start
        # Jobs a cancel is finalizing off the worker (cancelled while waiting their turn): the worker leaves them
        self._finalizing: set[str] = set()
        self._side: set[asyncio.Task] = set()
        # Input files a POST /v1/batches is checking (on a thread): a DELETE of one is refused as in use, as for a
        # file an active batch reads. Claims and deletes go under the lock, so a file is either deleted before a
        # create finds it or in use until the batch is stored.
        self._files_lock = threading.Lock()
        self._claims: Counter[str] = Counter()
        self.quota = FileQuota(self.config.batches.max_stored_bytes, self.config.batches.min_free_disk_bytes,
                               self.directory)

    @property
    def db(self) -> JobDB:
        if self._db is None:  # made on first use: a server that runs no job writes nothing
            # under a lock: a POST /v1/batches looks its file up on a thread while the event loop may open it too
            with self._open_lock:
                if self._db is None:
                    self._db = self._open()
        return self._db

    def _open(self) -> JobDB:
        (self.directory / "files").mkdir(parents=True, exist_ok=True)
        # a server killed mid-upload left its partial file; no upload of this one has begun yet (a job
        # directory belongs to one server: each runs the jobs it finds in it)
        for partial in (self.directory / "files").glob(".upload-*"):
            partial.unlink(missing_ok=True)
        db = JobDB(self.directory / "batches.db")
        self.quota.stored = db.stored_bytes("batch")  # the files a run before this one kept
        return db

    def begin(self) -> None:
        self._stopping = False
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._work(), name="zimage-batches")

    async def stop(self) -> None:
        self._stopping = True
        if self.runner is not None:
            self.runner.stop()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
        for task in list(self._side):  # a job cut off while finalizing ends as it was going to at the next start
            task.cancel()
        await asyncio.gather(*self._side, return_exceptions=True)
        if self._db is not None:
            self._db.close()
            self._db = None

    # ---- files ---------------------------------------------------------------------------------------------
    def add_file(self, filename: str, purpose: str, path: Path, file_id: str | None = None) -> dict:
        file_id = file_id or _id("file")
        target = self.directory / "files" / f"{file_id}.jsonl"
        if path != target:
            os.replace(path, target)
        obj = {"id": file_id, "object": "file", "bytes": target.stat().st_size, "created_at": int(time.time()),
               "filename": filename, "purpose": purpose}
        try:
            self.db.add_file(obj, target)
        except BaseException:
            if purpose == "batch" and path != target:  # an upload moved in place: without its row, nothing would
                target.unlink(missing_ok=True)  # ever count or delete it
            raise
        if purpose == "batch":  # input files count against batches.max_stored_bytes; job outputs do not
            self.quota.add(obj["bytes"])
        return {**obj, "status": "processed", "status_details": None}

    def delete_file(self, file_id: str) -> tuple[dict, Path] | str | None:
        """Delete a file unless a batch uses it: the deleted file, why it is in use (for a 409), or None when there
        is no such file."""
        with self._files_lock:
            found = self.db.file(file_id)
            if found is None:
                return None
            if self._claims[file_id]:
                return f"file {file_id} is the input of a batch being created now; cancel that batch first"
            users = [b["id"] for b in self.db.batches() if b.get("status") in ACTIVE
                     and b.get("input_file_id") == file_id]
            if users:
                return f"file {file_id} is the input of {users[0]}, which is still running; cancel it first"
            self.db.delete_file(file_id)
            if found[0]["purpose"] == "batch":
                self.quota.remove(found[0]["bytes"])
        found[1].unlink(missing_ok=True)
        return found

    # ---- batches -------------------------------------------------------------------------------------------
    def public(self, b: dict) -> dict:
        out = {k: b.get(k) for k in PUBLIC}
        if b.get("status") in ACTIVE:
            completed, failed = self.db.counts(b["id"])
            out["request_counts"] = {**b["request_counts"], "completed": completed, "failed": failed}
            runner = self.runner if self.running_id == b["id"] else None
            if runner is not None and runner.paused:  # an extension: the API's statuses have no "paused"
                out["paused_reason"] = runner.paused
        return printable(out)

    def create(self, body: dict, base_url: str) -> dict:
        endpoint, window, metadata = check_batch_body(body)
        file_id = body.get("input_file_id")
        with self._files_lock:
            # (a lone surrogate, which a \u escape can make, is no id, and SQLite cannot take it)
            found = self.db.file(file_id) if isinstance(file_id, str) and file_id and is_text(file_id) else None
            if found is None:
                raise InvalidRequestError(f"no file {shown(file_id)}; upload one with POST /v1/files (purpose "
                                          f"\"batch\")", param="input_file_id")
            self._claims[file_id] += 1
        try:
            return self._create(body, base_url, endpoint, window, metadata, *found)
        finally:
            with self._files_lock:
                self._claims[file_id] -= 1
                if not self._claims[file_id]:
                    del self._claims[file_id]

    def _create(self, body: dict, base_url: str, endpoint: str, window: str, metadata: dict | None, file_obj: dict,
                path: Path) -> dict:
        """``create`` past its checks of the request, the input file claimed (safe from a DELETE)."""
        if file_obj["purpose"] != "batch":
            raise InvalidRequestError(f"file {file_obj['id']} has purpose {file_obj['purpose']!r}; a batch's input "
                                      f"needs purpose \"batch\"", param="input_file_id")
        try:
            total = check_file(path, self.config.batches.max_lines, (endpoint,))  # every line's url is the endpoint
        except FileNotFoundError:  # its row outlived its data (removed from the disk by hand)
            raise InvalidRequestError(f"file {file_obj['id']} has lost its content on this server; upload the file "
                                      f"again and use the new id", param="input_file_id") from None
        now = int(time.time())
        b = dict.fromkeys(PUBLIC) | {  # every other field null until the job reaches it
            "id": _id("batch"), "object": "batch", "endpoint": endpoint, "input_file_id": file_obj["id"],
            "completion_window": window, "status": "validating", "created_at": now,
            "expires_at": now + COMPLETION_WINDOW_S[window],
            "request_counts": {"total": total, "completed": 0, "failed": 0}, "metadata": metadata,
            "base_url": base_url, "created_ns": time.time_ns()}  # (not public) the order within one second
        self.db.put_batch(b)
        return b

    def wake(self) -> None:
        """A job was submitted or cancelled: the worker looks now instead of at its next poll."""
        self._wake.set()

    async def cancel(self, b: dict) -> dict:
        if b["status"] in ("cancelling", "cancelled") or (
                b["status"] == "finalizing" and (b.get("ending") or {}).get("status") == "cancelled"):
            return b
        if b["status"] not in ("validating", "in_progress"):
            raise InvalidRequestError(f"batch {b['id']} is {b['status']}; only a validating or in-progress batch "
                                      f"can be cancelled", param="batch_id")
        b = {**b, "status": "cancelling", "cancelling_at": int(time.time())}
        self.db.put_batch(b)
        if self.running_id == b["id"]:  # the worker ends it once its lines in flight are dropped
            if self.runner is not None:  # (else it has not started its lines: it ends before it would)
                self.runner.stop()
            self._wake.set()
            return b
        # Not running (waiting its turn): nothing to stop, so it ends now rather than when the jobs ahead of it do,
        # in a task of its own, which a client that leaves meanwhile does not stop half-way.
        self._finalizing.add(b["id"])
        task = asyncio.get_running_loop().create_task(self._finalize(b, ran=False), name=b["id"])
        self._side.add(task)
        task.add_done_callback(self._side_done)
        await asyncio.shield(task)
        return self.db.batch(b["id"]) or b

    def _side_done(self, task: asyncio.Task) -> None:
        """A cancel's finalize ended: the worker may take the job again (a failed one it finalizes itself)."""
        self._side.discard(task)
        self._finalizing.discard(task.get_name())
        if not task.cancelled() and task.exception() is not None:  # its client may have left: logged here
            log.error("batch %s: finalizing its cancel failed; the worker ends it", task.get_name(),
                      exc_info=task.exception())

    # ---- the worker ----------------------------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            self._wake.clear()
            if self._has_jobs() and self.service.accepting:
                try:
                    if await self._next():
                        continue
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - the database itself failing: looked at again at the next poll
                    log.exception("batch worker: the job database failed; trying again in a second")
            try:
                await asyncio.wait_for(self._wake.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def _next(self) -> bool:
        """Run the oldest active job to its end; True when there was one and it ended, so the next may start at
        once. A job still active afterwards (the server is stopping) is looked at again at the next poll at the
        soonest, never at once: no path reruns a job in a loop."""
        todo = [b for b in self.db.batches() if b.get("status") in ACTIVE and b["id"] not in self._finalizing]
        if not todo:
            return False
        b = min(todo, key=creation_order)
        try:
            await self._run(b)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - one job's fault must not stop the others
            log.exception("batch %s failed", b["id"])
            self._fail(b, f"the job stopped on a server error ({type(e).__name__}); see the server log")
        after = self.db.batch(b["id"])
        if after is None or after.get("status") not in ACTIVE:
            return True
        if not self._stopping:  # _finalize leaves a job active only for a shutdown
            log.error("batch %s is still %s after its run; it is failed", b["id"], after["status"])
            self._fail(after, "the job ended without finishing its requests; see the server log")
        return False

    def _has_jobs(self) -> bool:
        return self._db is not None or (self.directory / "batches.db").exists()

    def _fail(self, b: dict, message: str) -> None:
        self.db.put_batch({**(self.db.batch(b["id"]) or b), "status": "failed", "failed_at": int(time.time()),
                           "errors": _errors(message)})

    async def _run(self, b: dict) -> None:
        bid = b["id"]
        ran = expired = False
        if b["status"] in ("validating", "in_progress") and time.time() >= b["expires_at"]:
            await self._expire(b)  # its window passed before its turn (a server down that long): none ran
            await self._finalize(self.db.batch(bid) or b, ran=True, expired=True)
            return
        if b["status"] in ("validating", "in_progress"):
            found = self.db.file(b["input_file_id"])
            if found is None:  # a DELETE is refused while a job uses its file; this is a database from elsewhere
                self._fail(b, f"its input file {b['input_file_id']} no longer exists")
                return
            path = found[1]
            b = {**b, "status": "in_progress", "in_progress_at": b["in_progress_at"] or int(time.time())}
            self.db.put_batch(b)
            self.db.forget_retryable(bid)
            output = self.directory / "files" / f"{bid}-output.jsonl"
            # A resumed job's output is rewritten from its records, gigabytes for a large one: on a thread, the loop
            # serving meanwhile. It counts as running from here, so a cancel meanwhile leaves its ending to this run.
            self.running_id = bid
            try:
                await run_blocking(self.db.write_records, bid, output)
            finally:
                self.running_id = None
            if (now := self.db.batch(bid) or b)["status"] != "in_progress":  # cancelled while it was written
                await self._finalize(now, ran=True)  # (the output is the database's: nothing ran since)
                return
            sink = ServerSink(self.outputs, self.config.outputs.public_base_url or b["base_url"], output)
            dep = self.service.deployment
            batch = self.config.router.max_batch_size
            window = self.config.batches.max_inflight or 2 * max(1, len(dep.replicas)) * batch
            runner = JobRunner(dep, self.config, self.db, bid, sink, window,
                               pause_reason=self.quota.job_pause_reason)
            self.runner, self.running_id = runner, bid

            def expire():
                nonlocal expired
                expired = True
                runner.stop()

            expiry = asyncio.get_running_loop().call_later(max(0.0, b["expires_at"] - time.time()), expire)
            log.info("batch %s: running %d request(s), %d images in flight at most", bid,
                     b["request_counts"]["total"], self.runner.window)
            unreadable = None
            try:
                with open(path, "rb") as f:
                    await runner.run(read_lines(f, self.config.batches.max_lines, (b["endpoint"],)))
            except InvalidRequestError as e:  # a file taken by a server that checked less: it fails once, clearly
                unreadable = e.message
            finally:
                expiry.cancel()
                sink.close()
                self.runner, self.running_id = None, None
            if unreadable is not None:
                self._fail(b, f"its input file cannot be run: {unreadable}")
                return
            ran = runner.output_complete  # else _finalize rewrites the output from the committed records
            if runner.unrecorded:
                log.error("batch %s: %d request(s) could not be recorded", bid, runner.unrecorded)
            if expired and (self.db.batch(bid) or b)["status"] == "in_progress":  # (not cancelled meanwhile)
                # (the timer may fire as the last request ends: with none left unrun, the job completed)
                ran, expired = True, await self._expire(b) > 0
        await self._finalize(self.db.batch(bid), ran=ran, expired=expired)

    async def _expire(self, b: dict) -> int:
        """``batches.expire_unrun`` on a thread, the job counting as running meanwhile (a cancel leaves its end to
        the worker, as during a run)."""
        self.running_id = b["id"]
        try:
            return await run_blocking(expire_unrun, self.db, b, self.config.batches.max_lines,
                                      self.directory / "files" / f"{b['id']}-output.jsonl")
        finally:
            self.running_id = None

    async def _finalize(self, b: dict, ran: bool = False, expired: bool = False) -> None:
        """End a job that stopped: cancelled, expired, completed, or failed when it ran every line but some could
        not be recorded; left as it is (to resume at the next start) only when the server is stopping. ``ran``:
        its output file was just written by a run (else it is rewritten from the database). Output and error
        files are made only for a job with requests done, on a thread (an output rewritten from the database can be
        gigabytes), and registered once both are written. The job is ``finalizing`` from before the first await, so a
        cancel meanwhile is refused (answered with the job where it ends cancelled); a server stopped meanwhile ends
        it as it was going to at its next start."""
        bid = b["id"]
        completed, failed = self.db.counts(bid)
        total = b["request_counts"]["total"]
        done = completed + failed
        now = int(time.time())
        if b["status"] == "finalizing":  # the server stopped while it was finalizing: it ends as it was going to
            end = b.get("ending") or (
                {"status": "completed", "completed_at": now} if done >= total else
                {"status": "expired", "expired_at": now} if now >= b["expires_at"] else
                {"status": "cancelled", "cancelled_at": now})
        elif b["status"] == "cancelling":
            end = {"status": "cancelled", "cancelled_at": now}
        elif expired or (done < total and now >= b["expires_at"]):
            end = {"status": "expired", "expired_at": now}
        elif done < total and self._stopping:  # stopped by a shutdown: it resumes at the next start
            return
        elif done < total:  # every line was taken, yet some left no record (batches.py logged why): never rerun
            end = {"status": "failed", "failed_at": now, "errors": _errors(
                f"{total - done} of {total} request(s) could not be recorded; the cause is in the server log")}
        else:
            end = {"status": "completed", "completed_at": now}
        self.db.put_batch({**b, "status": "finalizing", "finalizing_at": now, "ending": end})
        output = self.directory / "files" / f"{bid}-output.jsonl"
        errors = self.directory / "files" / f"file-{bid}-errors.jsonl"
        out_id = error_id = None
        if done:
            out_id = f"file-{bid}-output"
            moved = self.directory / "files" / f"{out_id}.jsonl"
            if not ran and moved.exists() and not output.exists():  # a finalize the server stopped had moved it
                output = moved
            elif not ran:  # written by an earlier run, if at all: the database has every committed line
                await run_blocking(self.db.write_records, bid, output)
        else:  # nothing done: no output file (a run cancelled before its first line leaves an empty one)
            output.unlink(missing_ok=True)
        if failed:
            await run_blocking(self.db.write_records, bid, errors, False)
        if done:
            self.add_file(f"{bid}_output.jsonl", "batch_output", output, out_id)
        if failed:
            error_id = self.add_file(f"{bid}_errors.jsonl", "batch_output", errors, f"file-{bid}-errors")["id"]
        end = {k: int(time.time()) if k.endswith("_at") else v for k, v in end.items()}  # it ends now, files made
        final = {**b, **end, "finalizing_at": now, "output_file_id": out_id, "error_file_id": error_id,
                 "request_counts": {"total": total, "completed": completed, "failed": failed}}
        final.pop("ending", None)
        self.db.put_batch(final)
        log.info("batch %s %s: %d completed, %d failed of %d", bid, end["status"], completed, failed, total)


def _errors(message: str) -> dict:
    return {"object": "list", "data": [{"code": "server_error", "message": message, "param": None, "line": None}]}


def router(jobs: JobService, outputs: Outputs) -> APIRouter:
    api = APIRouter()
    config = jobs.config

    denied = jobs.service.denied

    def not_found(what: str, value: str, param: str):
        return error_response(404, f"no {what} {shown(value)}", "invalid_request_error", param=param,
                              code="not_found")

    def refused(refusal) -> JSONResponse:  # 507: the disk batch input files may take is used up
        jobs.service.observer.rejected(FailureKind.INVALID_REQUEST)
        return error_response(507, refusal.message, refusal.type_, param="file", code=refusal.code)

    @api.post("/v1/files")
    async def upload(request: Request):
        """The file part goes to disk as it arrives (never whole in memory); checking it holds a line at a time,
        CHECK_COPIES times over, which is reserved in the edits' budget of bytes in flight
        (``limits.max_inflight_upload_bytes``, ``uploads.ByteBudget``) while the check runs. Its Content-Length
        (``max_upload_bytes`` without one) is reserved against ``batches.max_stored_bytes`` and the disk's free space
        before it is read, and given back whichever way it ends (``file_quota.py``; a stored file's bytes stay)."""
        if (d := denied(request)) is not None:
            return d
        limit = config.batches.max_upload_bytes
        too_large = error_response(413, f"the upload is larger than {limit} bytes (batches.max_upload_bytes); split "
                                        f"the job into several files", "invalid_request_error", param="file")
        length = decimal(request.headers.get("content-length"), max_digits=4000)
        if length is not None and length > limit:  # refused before a byte is read
            jobs.service.observer.rejected(FailureKind.INVALID_REQUEST)
            return too_large
        tmp = jobs.db.path.parent / "files" / f".upload-{uuid.uuid4().hex}.jsonl"
        need = limit if length is None else length  # the most this upload can write
        if (refusal := jobs.quota.reserve(need)) is not None:  # the disk batches.max_stored_bytes allows
            return refused(refusal)
        try:
            try:
                purpose, filename, longest = await receive_jsonl_upload(
                    request.headers, jobs.quota.watched(limited(request.stream(), limit)), tmp)
                filename = printable(filename)
            except BodyTooLarge:
                jobs.service.observer.rejected(FailureKind.INVALID_REQUEST)
                tmp.unlink(missing_ok=True)
                return too_large
            except StorageRefused as e:
                tmp.unlink(missing_ok=True)
                return refused(e.refusal)
            budget = getattr(request.app.state, "upload_budget", None)
            cost = CHECK_COPIES * max(1, longest)
            held = None if budget is None else BodyReservation(budget, cost, cost, config.limits.upload_wait_s)
            try:
                if held is not None:
                    await held.open()
                await run_blocking(check_file, tmp, config.batches.max_lines)
            finally:
                if held is not None:
                    held.release()
            return jobs.add_file(filename, purpose, tmp)  # counts the file's real bytes as stored
        except ZImageError as e:
            tmp.unlink(missing_ok=True)
            return from_exception(e)
        except BaseException:  # a client that went away, a full disk: no half-written file left behind
            tmp.unlink(missing_ok=True)
            raise
        finally:
            jobs.quota.release(need)

    @api.get("/v1/files")
    async def list_files(request: Request, purpose: str | None = None, limit: int = MAX_FILES_LIST,
                         after: str | None = None, order: str = "desc"):
        """OpenAI's list: newest first (``order=asc``: oldest first), ``limit`` at a time, the page ``after`` an id."""
        if (d := denied(request)) is not None:
            return d
        if not 1 <= limit <= MAX_FILES_LIST:
            return error_response(400, f"limit must be between 1 and {MAX_FILES_LIST}, got {limit}",
                                  "invalid_request_error", param="limit")
        if order not in ("asc", "desc"):
            return error_response(400, f"order must be \"asc\" or \"desc\", got {shown(order)}",
                                  "invalid_request_error", param="order")
        found = jobs.db.files(purpose) if jobs._has_jobs() else []
        found = found[::-1] if order == "asc" else found
        if after is not None:
            ids = [f["id"] for f in found]
            found = found[ids.index(after) + 1:] if after in ids else []
        page = [{**f, "status": "processed", "status_details": None} for f in found[:limit]]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(found) > limit}

    @api.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, request: Request):
        if (d := denied(request)) is not None:
            return d
        found = jobs.delete_file(file_id) if jobs._has_jobs() else None
        if found is None:
            return not_found("file", file_id, "file_id")
        if isinstance(found, str):
            return error_response(409, found, "invalid_request_error", param="file_id", code="file_in_use")
        return {"id": file_id, "object": "file", "deleted": True}

    @api.get("/v1/files/{file_id}")
    async def file_object(file_id: str, request: Request):
        if (d := denied(request)) is not None:
            return d
        found = jobs.db.file(file_id) if jobs._has_jobs() else None
        return not_found("file", file_id, "file_id") if found is None else {**found[0], "status": "processed",
                                                                           "status_details": None}

    @api.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, request: Request):
        if (d := denied(request)) is not None:
            return d
        found = jobs.db.file(file_id) if jobs._has_jobs() else None
        try:
            f = None if found is None else await run_blocking(open, found[1], "rb")
        except FileNotFoundError:  # deleted since it was looked up, or its data removed from the disk
            f = None
        if f is None:
            return not_found("file", file_id, "file_id")
        range_header = None if request.headers.get("if-range") else request.headers.get("range")
        return file_response(f, found[0]["filename"], range_header)

    @api.post("/v1/batches")
    async def create_batch(request: Request):
        if (d := denied(request)) is not None:
            return d
        try:
            payload = parse_json(await read_body(request, config.limits.max_body_bytes))
            b = await run_blocking(jobs.create, payload, str(request.base_url).rstrip("/"))
            jobs.wake()
        except BodyTooLarge:
            return jobs.service.too_large("max_body_bytes", config.limits.max_body_bytes)
        except ZImageError as e:
            return from_exception(e)
        return jobs.public(b)

    @api.get("/v1/batches")
    async def list_batches(request: Request, limit: int = 20, after: str | None = None):
        if (d := denied(request)) is not None:
            return d
        if not 1 <= limit <= MAX_LIST:
            return error_response(400, f"limit must be between 1 and {MAX_LIST}, got {limit}", "invalid_request_error",
                                  param="limit")
        every = jobs.db.batches() if jobs._has_jobs() else []
        if after is not None:
            ids = [b["id"] for b in every]
            every = every[ids.index(after) + 1:] if after in ids else []
        page = []
        for b in every:
            if len(page) > limit:
                break
            try:  # one stored batch that cannot be shown (logged) must not take the listing down
                page.append(jobs.public(b))
            except Exception:  # noqa: BLE001
                log.exception("batch %s cannot be shown; it is left out of the listing", shown(b.get("id")))
        more, page = len(page) > limit, page[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": more}

    @api.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str, request: Request):
        if (d := denied(request)) is not None:
            return d
        b = jobs.db.batch(batch_id) if jobs._has_jobs() else None
        return not_found("batch", batch_id, "batch_id") if b is None else jobs.public(b)

    @api.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, request: Request):
        if (d := denied(request)) is not None:
            return d
        b = jobs.db.batch(batch_id) if jobs._has_jobs() else None
        if b is None:
            return not_found("batch", batch_id, "batch_id")
        try:
            return jobs.public(await jobs.cancel(b))
        except ZImageError as e:
            return from_exception(e)

    return api
