"""Batch input files: OpenAI's batch JSONL, one request a line, checked before any of it runs.

    {"custom_id": "cat-1", "method": "POST", "url": "/v1/images/generations", "body": {"prompt": "a cat"}}

The file is refused whole (``InvalidRequestError`` naming the line) for what would make the job ambiguous or
impossible to record: a line that is not a JSON object, a string in it that is not Unicode text (a lone surrogate
such as ``"\\ud800"``: SQLite and the UTF-8 output cannot hold it), a missing or repeated ``custom_id``, a method
other than POST, a ``url`` not batched here, a body that is not an object, or too many lines. A body's own fields
are checked when its line runs, as the HTTP API checks them, so a bad body fails that line alone. The fields of a
``POST /v1/batches`` body are checked here too (``check_batch_body``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from zimage_common.errors import InvalidRequestError

from .requests import shown

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"  # the JSON form: images as data: URLs (images_api.parse_json_edit)
ENDPOINTS = (GENERATIONS, EDITS)
COMPLETION_WINDOW_S = {"24h": 86_400}
MAX_CUSTOM_ID = 512
LINE_KEYS = frozenset({"custom_id", "method", "url", "body"})


@dataclass(frozen=True)
class Line:
    number: int  # 1-based, as editors count
    custom_id: str
    url: str
    body: dict


def _refuse(number: int, message: str, param: str = "input_file_id") -> InvalidRequestError:
    return InvalidRequestError(f"line {number}: {message}", param=param)


def _lone_surrogate(obj) -> str | None:
    """Where in a parsed line a string (a key or a value) holds a lone surrogate, for a message: ``'custom_id'``,
    ``'body.prompt'``, ``a key in 'body'``; None when every string is text. Walked without recursion: a line may
    nest deeply."""
    stack: list[tuple[object, str]] = [(obj, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if not is_text(value):
                return shown(where, 80) if where else "the line"
        elif isinstance(value, dict):
            for k, v in value.items():
                name = f"{where}.{k}" if where else k
                if not is_text(k):
                    return f"a key in {shown(where, 80)}" if where else "a key"
                stack.append((v, name))
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
    return None


def is_text(value: str) -> bool:
    """True for a string UTF-8 can encode (not one holding a lone surrogate, which JSON's \\u escapes can make)."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def printable(value):
    """``value`` with every string UTF-8 can encode: a response with a lone surrogate fails to render (a 500), so
    one stored before it was refused is shown escaped, as ``\\ud800``, instead."""
    if isinstance(value, str):
        return value if is_text(value) else value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [printable(v) for v in value]
    return value


def check_metadata(metadata):
    """A batch's ``metadata`` as OpenAI bounds it (None, or up to 16 string pairs), refused otherwise."""
    if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or any(
            not isinstance(k, str) or not isinstance(v, str) or len(k) > 64 or len(v) > 512
            for k, v in metadata.items())):
        raise InvalidRequestError("metadata must be an object of at most 16 string keys (64 characters) and "
                                  "string values (512 characters)", param="metadata")
    if metadata is not None and not all(is_text(k) and is_text(v) for k, v in metadata.items()):
        raise InvalidRequestError("metadata holds a string that is not Unicode text (a lone UTF-16 surrogate, "
                                  "a \\ud800-\\udfff escape without its pair); send text", param="metadata")
    return metadata


def check_output_expiry(after) -> None:
    """A batch's ``output_expires_after`` in OpenAI's shape, checked so that a typo is not taken silently (output
    files here are kept until deleted)."""
    if after is not None and not (isinstance(after, dict) and set(after) == {"anchor", "seconds"}
                                  and after["anchor"] == "created_at" and type(after["seconds"]) is int
                                  and 3600 <= after["seconds"] <= 2_592_000):
        raise InvalidRequestError("output_expires_after must be {\"anchor\": \"created_at\", \"seconds\": N} with "
                                  "N from 3600 to 2592000", param="output_expires_after")


def check_batch_body(body) -> tuple[str, str, dict | None]:
    """A ``POST /v1/batches`` body's fields other than its input file: (endpoint, completion_window, metadata)."""
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
    if not isinstance(window, str) or window not in COMPLETION_WINDOW_S:  # a list or object is unhashable
        raise InvalidRequestError(f"completion_window must be \"24h\", got {shown(window)}",
                                  param="completion_window")
    metadata = check_metadata(body.get("metadata"))
    check_output_expiry(body.get("output_expires_after"))
    return endpoint, window, metadata


def parse_line(number: int, raw: bytes | str, endpoints: Iterable[str] = ENDPOINTS) -> Line | None:
    """One line of the file; None for a blank line."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _refuse(number, "is not UTF-8 text") from None
    if not raw.strip():
        return None
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        where = f" ({e.msg}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise _refuse(number, f"is not valid JSON{where}; each line must be one JSON object") from None
    # Only a \u escape makes a lone surrogate (the UTF-8 decode above refuses encoded ones): most lines skip the walk.
    if ("\\ud" in raw or "\\uD" in raw) and (field := _lone_surrogate(obj)) is not None:
        raise _refuse(number, f"{field} holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without "
                              f"its pair), which is not Unicode text and cannot be stored or written out; send text")
    if not isinstance(obj, dict):
        raise _refuse(number, "must be a JSON object with custom_id, method, url and body")
    unknown = sorted(set(obj) - LINE_KEYS)
    if unknown:
        raise _refuse(number, f"unknown key(s) {', '.join(shown(k, 40) for k in unknown[:5])}; a line has "
                              f"custom_id, method, url and body")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid or len(cid) > MAX_CUSTOM_ID:
        raise _refuse(number, f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID} characters, got "
                              f"{shown(cid)}")
    method = obj.get("method")
    if method != "POST":
        raise _refuse(number, f"method must be \"POST\", got {shown(method)}")
    url = obj.get("url")
    if url not in endpoints:
        raise _refuse(number, f"url {shown(url)} is not an endpoint this job runs; use "
                              f"{' or '.join(repr(e) for e in endpoints)}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise _refuse(number, f"body must be a JSON object (the request {url} takes), got {shown(body)}")
    return Line(number, cid, url, body)


def read_lines(raw_lines: Iterable[bytes | str], max_lines: int, endpoints: Iterable[str] = ENDPOINTS,
               limit_name: str = "batches.max_lines") -> Iterator[Line]:
    """Every line of a file, checked; raises on the first problem (duplicates name both lines)."""
    endpoints = tuple(endpoints)
    seen: dict[str, int] = {}
    count = 0
    for number, raw in enumerate(raw_lines, start=1):
        if number == 1:  # a UTF-8 byte order mark, as Windows tools (PowerShell 5's Out-File) write: not the line's
            raw = raw.removeprefix(b"\xef\xbb\xbf" if isinstance(raw, bytes) else "\ufeff")
        line = parse_line(number, raw, endpoints)
        if line is None:
            continue
        first = seen.setdefault(line.custom_id, number)
        if first != number:
            raise _refuse(number, f"custom_id {shown(line.custom_id)} is already used on line {first}; each "
                                  f"request needs its own")
        count += 1
        if count > max_lines:
            raise _refuse(number, f"the job has more than {max_lines} requests ({limit_name}); split the file")
        yield line


def check_file(path: Path, max_lines: int, endpoints: Iterable[str] = ENDPOINTS,
               limit_name: str = "batches.max_lines") -> int:
    """Check a whole file without keeping it in memory; returns the number of requests."""
    with open(path, "rb") as f:
        n = sum(1 for _ in read_lines(f, max_lines, endpoints, limit_name))
    if n == 0:
        raise InvalidRequestError("the file holds no requests (one JSON object a line)", param="input_file_id")
    return n


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
