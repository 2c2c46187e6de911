"""OpenAI's Files and Batch APIs for image requests (README.md lists the endpoints): upload a JSONL file, run it as a
job beside interactive traffic, download the output. The file is checked at upload (``batch_input.py``: a 400 names
the first bad line); each body is checked when its line runs, and a bad one fails alone. Jobs live in SQLite
(``batch_db.py``) and run one at a time at ``BATCH_JOB`` priority (interactive requests go first); a job in progress
when the server stopped resumes when it starts again. The output file holds one line per request, in input order;
the error file only the failed ones."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from zimage_common.errors import InvalidRequestError, ZImageError
from zimage_common.messages import FailureKind, ImageResult

from .batch_db import JobDB
from .batch_input import ENDPOINTS, check_file, read_lines
from .batches import JobRunner, OutputFile
from .http_errors import error_response, from_exception
from .images_api import ImageCall
from .outputs import Outputs, b64_text
from .requests import shown
from .storage import run_blocking
from .uploads import BodyTooLarge, check_multipart_body, parse_json, read_body

log = logging.getLogger(__name__)

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
COMPLETION_WINDOW_S = {"24h": 86_400}
PUBLIC = ("id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status", "output_file_id",
          "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
          "expired_at", "cancelling_at", "cancelled_at", "request_counts", "metadata")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class ServerSink(OutputFile):
    """A server job's images: answered as the line asked (``b64_json`` in the output, or ``url``: stored, with a
    link made from ``outputs.public_base_url`` or the address the job was submitted to)."""

    def __init__(self, outputs: Outputs, base_url: str, output: Path):
        super().__init__(output)
        self.outputs = outputs
        self.base_url = base_url

    async def store(self, line, call: ImageCall, results: list[ImageResult]) -> list[dict]:
        if call.response_format == "url":
            return [{"url": await self.outputs.publish(r.picture, call, self.base_url, r.request_id)}
                    for r in results]
        return [{"b64_json": await run_blocking(b64_text, r.picture, call)} for r in results]


class JobService:
    """The server's files and jobs, and the task that runs the jobs one after another."""

    def __init__(self, service, outputs: Outputs):
        self.service = service
        self.config = service.config
        self.outputs = outputs
        self.directory = Path(self.config.batches.directory)
        self._db: JobDB | None = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.runner: JobRunner | None = None
        self.running_id: str | None = None

    @property
    def db(self) -> JobDB:
        if self._db is None:  # made on first use: a server that runs no job writes nothing
            (self.directory / "files").mkdir(parents=True, exist_ok=True)
            self._db = JobDB(self.directory / "batches.db")
        return self._db

    def begin(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._work(), name="zimage-batches")

    async def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
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
        self.db.add_file(obj, target)
        return {**obj, "status": "processed", "status_details": None}

    # ---- batches -------------------------------------------------------------------------------------------
    def public(self, b: dict) -> dict:
        out = {k: b.get(k) for k in PUBLIC}
        if b["status"] in ACTIVE:
            completed, failed = self.db.counts(b["id"])
            out["request_counts"] = {**b["request_counts"], "completed": completed, "failed": failed}
        return out

    def create(self, body: dict, base_url: str) -> dict:
        if not isinstance(body, dict):
            raise InvalidRequestError("request body must be a JSON object")
        unknown = sorted(set(body) - {"input_file_id", "endpoint", "completion_window", "metadata",
                                      "output_expires_after"})
        if unknown:
            raise InvalidRequestError(f"unknown field(s) {', '.join(shown(k, 40) for k in unknown[:5])}",
                                      param=str(unknown[0])[:40])
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise InvalidRequestError(f"endpoint {shown(endpoint)} is not one this server batches; use "
                                      f"{' or '.join(repr(e) for e in ENDPOINTS)}", param="endpoint")
        window = body.get("completion_window")
        if window not in COMPLETION_WINDOW_S:
            raise InvalidRequestError(f"completion_window must be \"24h\", got {shown(window)}",
                                      param="completion_window")
        metadata = body.get("metadata")
        if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or any(
                not isinstance(k, str) or not isinstance(v, str) or len(k) > 64 or len(v) > 512
                for k, v in metadata.items())):
            raise InvalidRequestError("metadata must be an object of at most 16 string keys (64 characters) and "
                                      "string values (512 characters)", param="metadata")
        found = self.db.file(body.get("input_file_id") or "") if isinstance(body.get("input_file_id"), str) else None
        if found is None:
            raise InvalidRequestError(f"no file {shown(body.get('input_file_id'))}; upload one with POST /v1/files "
                                      f"(purpose \"batch\")", param="input_file_id")
        file_obj, path = found
        if file_obj["purpose"] != "batch":
            raise InvalidRequestError(f"file {file_obj['id']} has purpose {file_obj['purpose']!r}; a batch's input "
                                      f"needs purpose \"batch\"", param="input_file_id")
        total = check_file(path, self.config.batches.max_lines, (endpoint,))  # every line's url is the endpoint
        now = int(time.time())
        b = dict.fromkeys(PUBLIC) | {  # every other field null until the job reaches it
            "id": _id("batch"), "object": "batch", "endpoint": endpoint, "input_file_id": file_obj["id"],
            "completion_window": window, "status": "validating", "created_at": now,
            "expires_at": now + COMPLETION_WINDOW_S[window],
            "request_counts": {"total": total, "completed": 0, "failed": 0}, "metadata": metadata,
            "base_url": base_url}
        self.db.put_batch(b)
        return b

    def wake(self) -> None:
        """A job was submitted or cancelled: the worker looks now instead of at its next poll."""
        self._wake.set()

    def cancel(self, b: dict) -> dict:
        if b["status"] in ("cancelling", "cancelled"):
            return b
        if b["status"] not in ("validating", "in_progress"):
            raise InvalidRequestError(f"batch {b['id']} is {b['status']}; only a validating or in-progress batch "
                                      f"can be cancelled", param="batch_id")
        b = {**b, "status": "cancelling", "cancelling_at": int(time.time())}
        self.db.put_batch(b)
        if self.running_id == b["id"] and self.runner is not None:
            self.runner.stop()
        self._wake.set()
        return b

    # ---- the worker ----------------------------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            self._wake.clear()
            if self._has_jobs() and self.service.accepting:
                todo = [b for b in self.db.batches() if b["status"] in ACTIVE]
                if todo:
                    b = min(todo, key=lambda x: (x["created_at"], x["id"]))
                    try:
                        await self._run(b)
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:  # noqa: BLE001 - one job's fault must not stop the others
                        log.exception("batch %s failed", b["id"])
                        self._fail(b, f"the job stopped on a server error ({type(e).__name__}); see the server log")
                    continue
            try:
                await asyncio.wait_for(self._wake.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    def _has_jobs(self) -> bool:
        return self._db is not None or (self.directory / "batches.db").exists()

    def _fail(self, b: dict, message: str) -> None:
        self.db.put_batch({**self.db.batch(b["id"]), "status": "failed", "failed_at": int(time.time()),
                           "errors": {"object": "list", "data": [{"code": "server_error", "message": message,
                                                                 "param": None, "line": None}]}})

    async def _run(self, b: dict) -> None:
        bid = b["id"]
        if b["status"] in ("validating", "in_progress"):
            b = {**b, "status": "in_progress", "in_progress_at": b["in_progress_at"] or int(time.time())}
            self.db.put_batch(b)
            self.db.forget_retryable(bid)
            _, path = self.db.file(b["input_file_id"])
            output = self.directory / "files" / f"{bid}-output.jsonl"
            self.db.write_records(bid, output)
            sink = ServerSink(self.outputs, self.config.outputs.public_base_url or b["base_url"], output)
            dep = self.service.deployment
            batch = self.config.router.max_batch_size
            window = self.config.batches.max_inflight or 2 * max(1, len(dep.replicas)) * batch
            self.runner, self.running_id = JobRunner(dep, self.config, self.db, bid, sink, window), bid
            expiry = asyncio.get_running_loop().call_later(max(0.0, b["expires_at"] - time.time()), self.runner.stop)
            log.info("batch %s: running %d request(s), %d images in flight at most", bid,
                     b["request_counts"]["total"], self.runner.window)
            try:
                with open(path, "rb") as f:
                    await self.runner.run(read_lines(f, self.config.batches.max_lines, (b["endpoint"],)))
            finally:
                expiry.cancel()
                sink.close()
                self.runner, self.running_id = None, None
        await self._finalize(self.db.batch(bid))

    async def _finalize(self, b: dict) -> None:
        bid = b["id"]
        completed, failed = self.db.counts(bid)
        total = b["request_counts"]["total"]
        now = int(time.time())
        if b["status"] == "cancelling":
            end = {"status": "cancelled", "cancelled_at": now}
        elif completed + failed < total and now >= b["expires_at"]:
            end = {"status": "expired", "expired_at": now}
        elif completed + failed < total:  # stopped by a shutdown: it resumes at the next start
            return
        else:
            end = {"status": "completed", "completed_at": now}
        self.db.put_batch({**b, "status": "finalizing", "finalizing_at": now})
        output = self.directory / "files" / f"{bid}-output.jsonl"
        out_obj = self.add_file(f"{bid}_output.jsonl", "batch_output", output, f"file-{bid}-output")
        error_id = None
        if failed:
            errors = self.directory / "files" / f"file-{bid}-errors.jsonl"
            self.db.write_records(bid, errors, ok=False)
            error_id = self.add_file(f"{bid}_errors.jsonl", "batch_output", errors, f"file-{bid}-errors")["id"]
        self.db.put_batch({**b, **end, "finalizing_at": now, "output_file_id": out_obj["id"],
                           "error_file_id": error_id,
                           "request_counts": {"total": total, "completed": completed, "failed": failed}})
        log.info("batch %s %s: %d completed, %d failed of %d", bid, end["status"], completed, failed, total)


def router(jobs: JobService, outputs: Outputs) -> APIRouter:
    api = APIRouter()
    config = jobs.config

    denied = jobs.service.denied

    def not_found(what: str, value: str, param: str):
        return error_response(404, f"no {what} {shown(value)}", "invalid_request_error", param=param,
                              code="not_found")

    @api.post("/v1/files")
    async def upload(request: Request):
        if (d := denied(request)) is not None:
            return d
        limit = config.batches.max_upload_bytes
        try:
            body = await read_body(request, limit)
        except BodyTooLarge:
            jobs.service.observer.rejected(FailureKind.INVALID_REQUEST)
            return error_response(413, f"the upload is larger than {limit} bytes (batches.max_upload_bytes); split "
                                       f"the job into several files", "invalid_request_error", param="file")
        try:
            purpose, filename, data = await _read_upload(request.headers, body)
            tmp = jobs.db.path.parent / "files" / f".upload-{uuid.uuid4().hex}.jsonl"
            await run_blocking(tmp.write_bytes, data)
            try:
                await run_blocking(check_file, tmp, config.batches.max_lines)
            except ZImageError:
                tmp.unlink(missing_ok=True)
                raise
        except ZImageError as e:
            return from_exception(e)
        return jobs.add_file(filename, purpose, tmp)

    @api.get("/v1/files")
    async def list_files(request: Request, purpose: str | None = None):
        if (d := denied(request)) is not None:
            return d
        found = jobs.db.files(purpose) if jobs._has_jobs() else []
        return {"object": "list", "data": [{**f, "status": "processed"} for f in found], "has_more": False}

    @api.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, request: Request):
        if (d := denied(request)) is not None:
            return d
        found = jobs.db.file(file_id) if jobs._has_jobs() else None
        if found is None:
            return not_found("file", file_id, "file_id")
        users = [b["id"] for b in jobs.db.batches() if b["status"] in ACTIVE and b["input_file_id"] == file_id]
        if users:
            return error_response(409, f"file {file_id} is the input of {users[0]}, which is still running; cancel "
                                       f"it first", "invalid_request_error", param="file_id", code="file_in_use")
        jobs.db.delete_file(file_id)
        found[1].unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    @api.get("/v1/files/{file_id}")
    async def file_object(file_id: str, request: Request):
        if (d := denied(request)) is not None:
            return d
        found = jobs.db.file(file_id) if jobs._has_jobs() else None
        return not_found("file", file_id, "file_id") if found is None else {**found[0], "status": "processed"}

    @api.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, request: Request):
        if (d := denied(request)) is not None:
            return d
        found = jobs.db.file(file_id) if jobs._has_jobs() else None
        if found is None:
            return not_found("file", file_id, "file_id")
        return FileResponse(found[1], media_type="application/jsonl", filename=found[0]["filename"])

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
        every = jobs.db.batches() if jobs._has_jobs() else []
        if after is not None:
            ids = [b["id"] for b in every]
            every = every[ids.index(after) + 1:] if after in ids else []
        page = every[:max(1, min(limit, 100))]
        return {"object": "list", "data": [jobs.public(b) for b in page], "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(every) > len(page)}

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
            return jobs.public(jobs.cancel(b))
        except ZImageError as e:
            return from_exception(e)

    return api


async def _read_upload(headers, body: bytes) -> tuple[str, str, bytes]:
    """``purpose`` and the ``file`` part (its name and bytes) of an upload; 400s name the field."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    class _InMemoryParser(MultiPartParser):
        spool_max_size = 1 << 40  # the body is in memory already (within limits): no round trip through a file

    ctype = headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise InvalidRequestError("send the file as multipart/form-data with fields `file` and `purpose`",
                                  param="file")
    check_multipart_body(ctype, body)  # cut off, or a charset that decodes nothing: Starlette's parser checks neither

    async def chunks():
        yield body

    try:
        form = await _InMemoryParser(headers, chunks(), max_files=1, max_fields=8).parse()
    except MultiPartException as e:
        raise InvalidRequestError(f"the multipart body cannot be read: {e.message}", param="file") from None
    except UnicodeError:  # a part's name or value the body's charset cannot decode ("idna" on some bytes)
        raise InvalidRequestError("the multipart body cannot be read in its charset; send text fields as UTF-8",
                                  param="file") from None
    try:
        purpose = form.get("purpose")
        if purpose != "batch":
            raise InvalidRequestError(f"purpose must be \"batch\" (the only files this server takes), got "
                                      f"{shown(purpose)}", param="purpose")
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise InvalidRequestError("send the JSONL file in the multipart field `file`", param="file")
        return purpose, (upload.filename or "input.jsonl")[:255], await upload.read()
    finally:
        await form.close()
