"""Request bodies and input images in the HTTP process, with memory bounded by configuration whatever the input.

- ``read_body``: a body read chunk by chunk and abandoned at its limit (a chunked body too); ``parse_json``: every
  decoding failure a 400.
- ``ByteBudget`` (``limits.max_inflight_upload_bytes``) and ``BodyReservation``: an edit's body reserves its
  Content-Length before it is read, a chunked one its bytes as they arrive, and holds them until its images are
  decoded, first come first served; no room within ``limits.upload_wait_s`` is a 429. Unreserved bytes stay in the
  client's socket.
- ``stream_multipart``: a multipart body parsed as it streams in, each part held to its limit while it arrives; the
  file fields (``image``, ``image[]``, ``mask``, ``control_image``) are files by their name (RFC 7578's
  ``filename`` is optional).
- ``DecodeQueue`` (``limits.decode_pixel_budget``, ``max_concurrent_image_decodes``): decoding admitted by input
  pixels (from the headers), first come first served, except that a request that fits may pass one that does not
  yet, up to one budget's worth per wait of the one passed; waiting past ``limits.decode_wait_s`` is a 429."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from contextlib import asynccontextmanager

from zimage_common.errors import InvalidRequestError, QueueFullError

from .requests import shown

FILE_FIELDS = ("image", "image[]", "mask", "control_image")
MAX_FIELD_BYTES = 1024 * 1024
MAX_FIELDS = 64


class BodyTooLarge(Exception):
    pass


class PayloadTooLarge(InvalidRequestError):
    """A body or one of its parts is over its limit (HTTP 413); ``param`` names the part."""

    http_status = 413


async def limited(stream, limit: int):
    """``stream``'s chunks, raising BodyTooLarge once more than ``limit`` bytes have come."""
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise BodyTooLarge()
        yield chunk


async def read_body(request, limit: int) -> bytes:
    """The request body (``request``: a request, or its chunks), read chunk by chunk and abandoned at ``limit``
    bytes: a chunked body (no Content-Length) is never held whole past the limit."""
    body = bytearray()
    async for chunk in (request.stream() if hasattr(request, "stream") else request):
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge()
    return bytes(body)


def _no_constant(name: str):
    raise InvalidRequestError(f"request body is not valid JSON: {name} is not a JSON value")


def parse_json(body: bytes):
    """Decode a request body, every failure a 400: syntax, encoding, nesting too deep for the decoder, numbers
    with more digits than Python converts, NaN/Infinity (not JSON)."""
    if not body.strip():
        raise InvalidRequestError("request body is empty; send a JSON object")
    try:
        return json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidRequestError("request body is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})")\
            from None
    except UnicodeDecodeError:
        raise InvalidRequestError("request body is not valid JSON: it is not UTF-8 text") from None
    except ValueError as e:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        if "digits" in str(e):
            raise InvalidRequestError("request body is not valid JSON here: a number has too many digits") from None
        raise InvalidRequestError("request body is not valid JSON") from None


# ---- in-flight bounds ----------------------------------------------------------------------------------------
class _FifoBudget:
    """A counted semaphore whose waiters are served in arrival order; ``_pass_ok`` lets a subclass admit a later
    waiter past a head that does not fit. A waiter is ``[cost, future, kind]`` (``kind``: see ``ByteBudget``); a
    future resolved with False is a refusal, not a grant."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self.running = 0
        self._waiters: deque[list] = deque()

    def _fits(self, cost: int) -> bool:
        return self.used + cost <= self.capacity

    def _pass_ok(self, cost: int) -> bool:
        return False

    def _on_head_admitted(self) -> None:
        pass

    def _grant(self, cost: int, kind: str = "new") -> None:
        self.used += cost
        self.running += 1

    def _ungrant(self, entry: list) -> None:
        """Give back a grant whose waiter was cancelled before it could take it."""
        self.release(entry[0])

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            cost, fut, kind = self._waiters.popleft()
            if not fut.done():
                self._grant(cost, kind)
                fut.set_result(True)
                self._on_head_admitted()
        for w in list(self._waiters)[1:]:
            if self._fits(w[0]) and self._pass_ok(w[0]):
                self._waiters.remove(w)
                if not w[1].done():
                    self._grant(w[0], w[2])
                    w[1].set_result(True)

    async def acquire(self, cost: int, timeout_s: float, kind: str = "new") -> bool:
        """Take ``cost`` (at most the capacity: a larger request runs alone); False after ``timeout_s``."""
        cost = max(1, min(cost, self.capacity))
        if (not self._waiters and self._fits(cost)) or (self._waiters and self._fits(cost) and self._pass_ok(cost)):
            self._grant(cost, kind)
            return True
        entry = [cost, asyncio.get_running_loop().create_future(), kind]
        self._waiters.append(entry)
        return await self._wait(entry, timeout_s)

    async def _wait(self, entry: list, timeout_s: float) -> bool:
        try:
            return await asyncio.wait_for(asyncio.shield(entry[1]), timeout_s)
        except asyncio.TimeoutError:
            return self._withdraw(entry)
        except asyncio.CancelledError:
            if not self._withdraw(entry):
                raise
            self._ungrant(entry)
            raise

    def _withdraw(self, entry) -> bool:
        """Leave the queue; True when the grant came first (the caller holds it)."""
        if entry[1].done():
            return entry[1].result()
        entry[1].cancel()
        try:
            self._waiters.remove(entry)
        except ValueError:
            pass
        self._wake()
        return False

    def release(self, cost: int) -> None:
        cost = max(1, min(cost, self.capacity))
        self.used -= cost
        self.running -= 1
        self._wake()

    @property
    def waiting(self) -> int:
        return len(self._waiters)


class ByteBudget(_FifoBudget):
    """Bytes of request bodies in flight (module docstring): ``acquire`` before reading, ``release`` after the
    images are decoded. A body's first piece is kind ``open`` (the body is a holder from the moment it is granted);
    a body already reading that needs more (a chunked body growing: ``grow``) is served ahead of every body not
    started yet, since those may be waiting for it to finish. ``holders`` counts the bodies holding part of the
    budget: when every one of them waits to grow, none can finish and give room back, so the newest is refused at
    once instead of all waiting out ``limits.upload_wait_s``."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.holders = 0

    def _grant(self, cost: int, kind: str = "new") -> None:
        super()._grant(cost, kind)
        if kind == "open":
            self.holders += 1

    def _ungrant(self, entry: list) -> None:
        if entry[2] == "open":
            self.release_body([entry[0]])
        else:
            self.release(entry[0])

    async def grow(self, cost: int, timeout_s: float) -> bool:
        """More room for a body that holds some: True when granted, False when refused or out of time."""
        cost = max(1, min(cost, self.capacity))
        if self._fits(cost):  # what waits has waited for room that was not there: this fits now, it passes
            self._grant(cost, "grow")
            return True
        entry = [cost, asyncio.get_running_loop().create_future(), "grow"]
        growing = sum(1 for w in self._waiters if w[2] == "grow")
        self._waiters.insert(growing, entry)  # after the bodies already growing, before the new ones
        self._break_deadlock()
        return await self._wait(entry, timeout_s)

    def release_body(self, pieces: list[int]) -> None:
        """A holder's every piece at once, so the deadlock check never sees it half gone."""
        if not pieces:
            return
        self.holders -= 1
        self.used -= sum(max(1, min(n, self.capacity)) for n in pieces)
        self.running -= len(pieces)
        self._wake()

    def _wake(self) -> None:
        super()._wake()
        self._break_deadlock()

    def _break_deadlock(self) -> None:
        growing = [w for w in self._waiters if w[2] == "grow" and not w[1].done()]
        if growing and len(growing) >= self.holders:
            newest = growing[-1]
            self._waiters.remove(newest)
            newest[1].set_result(False)  # its caller answers 429 and gives back what it held


class BodyReservation:
    """What one request body holds of a ``ByteBudget``. With a declared length it reserves all of it before a byte
    is read (``open``). A chunked body has none: it reserves ``CHUNKED_FIRST`` bytes, then, whenever what has come
    passes what it holds, twice as much again (``guard`` wraps its stream), up to its limit or the whole budget
    (as a declared body larger than the budget waits for all of it, then runs alone). So a client trickling a
    chunked body holds about twice what it has sent, not the whole ``limits.max_upload_bytes`` for as long as its
    body may take (``server.body_timeout_s``): four such clients held the default budget whole. A body that cannot
    grow within ``wait_s`` (or that the budget refuses: ``ByteBudget.grow``) gets the same 429 mid-stream as one
    that cannot start."""

    CHUNKED_FIRST = 1 << 20

    def __init__(self, budget: ByteBudget, length: int | None, limit: int, wait_s: float):
        self.budget, self.length, self.wait_s = budget, length, wait_s
        self.limit = min(limit, budget.capacity)
        self.pieces: list[int] = []  # each acquire, released together (the budget counts acquisitions)
        self.held = 0

    def _full(self) -> QueueFullError:
        return QueueFullError(
            f"the server is reading as many uploads as it holds at once (limits.max_inflight_upload_bytes = "
            f"{self.budget.capacity}); retry shortly", retry_after_s=max(1.0, self.wait_s))

    async def open(self) -> None:
        """The first reservation (QueueFullError when there is no room in time)."""
        n = self.length if self.length is not None else min(self.CHUNKED_FIRST, self.limit)
        if not await self.budget.acquire(n, self.wait_s, kind="open"):
            raise self._full()
        self.pieces.append(n)
        self.held += n

    async def guard(self, stream):
        """``stream``'s chunks; a chunked body's reservation grows ahead of them."""
        seen = 0
        async for chunk in stream:
            seen += len(chunk)
            if self.length is None and seen > self.held and self.held < self.limit:
                n = min(self.limit, max(seen, 2 * self.held)) - self.held
                if not await self.budget.grow(n, self.wait_s):
                    raise self._full()
                self.pieces.append(n)
                self.held += n
            yield chunk

    def release(self) -> None:
        self.budget.release_body(self.pieces)
        self.pieces, self.held = [], 0


class DecodeQueue(_FifoBudget):
    """Input pixels being decoded, and decodes running (module docstring)."""

    def __init__(self, pixel_budget: int, max_concurrent: int):
        super().__init__(pixel_budget)
        self.max_concurrent = max_concurrent
        self._passed = 0  # pixels admitted past the current head

    def _fits(self, cost: int) -> bool:
        return self.running < self.max_concurrent and self.used + cost <= self.capacity

    def _pass_ok(self, cost: int) -> bool:
        if self._passed + cost > self.capacity:
            return False
        self._passed += cost
        return True

    def _on_head_admitted(self) -> None:
        self._passed = 0

    @asynccontextmanager
    async def slot(self, pixels: int, timeout_s: float):
        if not await self.acquire(pixels, timeout_s):
            raise QueueFullError(f"the image decoders are busy: this request waited {timeout_s:g} s "
                                 f"(limits.decode_wait_s) for {min(pixels, self.capacity)} pixels of "
                                 f"limits.decode_pixel_budget = {self.capacity}; retry shortly",
                                 retry_after_s=max(1.0, timeout_s / 2))
        try:
            yield
        finally:
            self.release(pixels)


# ---- multipart ---------------------------------------------------------------------------------------------------
async def stream_multipart(headers, stream, max_image_bytes: int, max_files: int) -> tuple[dict, dict]:
    """An edit's multipart body, parsed as ``stream`` yields it -> (text fields, ``{"image": [bytes, ...], "mask":
    bytes | None}``, plus ``control_image`` when sent). ``image`` and ``image[]`` (the official client's name for
    an array) both collect into ``image``. Every refusal an InvalidRequestError naming the part (413 for a part over
    its limit, raised as soon as it passes it)."""
    from python_multipart import MultipartParser
    from python_multipart.multipart import parse_options_header

    ctype = headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise InvalidRequestError("send the edit as multipart/form-data with the image file(s) in `image`, or as "
                                  "application/json with `images` as data: URLs", param="image")
    boundary, charset = multipart_params(ctype)

    def text(data: bytes, field: str | None) -> str:
        return _decode(data, charset, field)

    fields: dict = {}
    files: dict = {"image": [], "mask": None}
    counts = {"files": 0, "fields": 0}
    part: dict = {}

    def on_headers_finished():
        disposition = next((v for k, v in part["headers"] if k == b"content-disposition"), b"")
        _, options = parse_options_header(disposition)
        if b"name" not in options:
            raise InvalidRequestError("the multipart body cannot be read: a part's Content-Disposition has no "
                                      "name")
        name = text(options[b"name"], None)
        part["name"] = name
        part["file"] = name in FILE_FIELDS or b"filename" in options
        if part["file"]:
            counts["files"] += 1
            if counts["files"] > max_files:
                raise InvalidRequestError(f"Too many files: at most {max_files} (16 images, a mask and a control "
                                          f"image)", param=_param(name))
        else:
            counts["fields"] += 1
            if counts["fields"] > MAX_FIELDS:
                raise InvalidRequestError(f"too many fields: at most {MAX_FIELDS}", param=_param(name))

    def on_part_data(data, start, end):
        part["size"] += end - start
        limit = max_image_bytes if part["file"] else MAX_FIELD_BYTES
        if part["size"] > limit:
            name = _param(part["name"])
            what = "limits.max_image_bytes" if part["file"] else "the limit on a text field"
            raise PayloadTooLarge(f"{shown(name, 40)} is larger than {limit} bytes ({what})", param=name)
        part["data"].append(data[start:end])

    def on_part_end():
        name = part["name"]
        key = "image" if name == "image[]" else name
        data = b"".join(part["data"])
        part["data"] = []
        if not part["file"]:
            if key in fields:
                raise InvalidRequestError(f"{shown(key, 40)} is sent more than once", param=key)
            fields[key] = text(data, key)
        elif key == "image":
            files["image"].append(data)
        elif key == "mask":
            if files["mask"] is not None:
                raise InvalidRequestError("mask is sent more than once; send one mask", param="mask")
            files["mask"] = data
        elif key in files:
            raise InvalidRequestError(f"{shown(key, 40)} is sent more than once", param=key)
        else:
            files[key] = data

    parser = MultipartParser(boundary, {**_header_callbacks(part), "on_part_data": on_part_data,
                                        "on_part_end": on_part_end, "on_headers_finished": on_headers_finished})
    await _feed(parser, stream)
    return fields, files


def multipart_params(ctype: str) -> tuple[bytes, str]:
    """The boundary and the charset of a multipart Content-Type. A charset Python does not know is read as
    latin-1 (every byte a character, so a field name still shows); one whose codec refuses all text (Python's
    "undefined") is a 400, not a decode error at the first field."""
    from python_multipart.multipart import parse_options_header

    _, params = parse_options_header(ctype)
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidRequestError("the multipart body cannot be read: its Content-Type has no boundary")
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        "a".encode(charset).decode(charset)
    except LookupError:
        charset = "latin-1"
    except (UnicodeError, TypeError):
        raise InvalidRequestError(f"the multipart body's charset {shown(charset, 40)} is not a text encoding; send "
                                  f"text fields as UTF-8 (or leave charset out)") from None
    return boundary, charset


def _decode(data: bytes, charset: str, field: str | None, param: str | None = None) -> str:
    """A part's name (``field`` None) or a text field's value in the body's charset; a 400 where the codec refuses
    even with errors="replace" ("idna" on some bytes)."""
    try:
        return data.decode(charset, errors="replace")
    except UnicodeError:
        what = shown(field, 40) if field else "a part's name"
        raise InvalidRequestError(f"{what} cannot be read in the multipart body's charset {shown(charset, 40)}; "
                                  f"send text fields as UTF-8", param=param if param is not None else field) from None


def _header_callbacks(part: dict) -> dict:
    """The parser callbacks that collect each part's headers into ``part`` (reset as the part begins)."""
    def on_part_begin():
        part.clear()
        part.update(headers=[], name=None, file=False, data=[], size=0, header_name=b"", header_value=b"")

    def on_header_field(data, start, end):
        part["header_name"] += data[start:end]

    def on_header_value(data, start, end):
        part["header_value"] += data[start:end]

    def on_header_end():
        part["headers"].append((part["header_name"].lower(), part["header_value"]))
        part["header_name"], part["header_value"] = b"", b""

    return {"on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end}


async def _feed(parser, stream, after_chunk=None, param: str | None = None) -> None:
    """The body into ``parser`` as ``stream`` yields it, then the check that it ended whole: python-multipart's
    ``finalize`` does not check that the closing delimiter arrived, and a body cut off inside a part (a client or
    proxy that stopped early) parsed as the parts before it, silently one image short."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartState

    try:
        async for chunk in stream:
            parser.write(chunk)
            if after_chunk is not None:
                await after_chunk()
        parser.finalize()
    except FormParserError:
        raise InvalidRequestError("the multipart body cannot be read: it is not valid multipart/form-data",
                                  param=param) from None
    if parser.state != MultipartState.END:
        raise InvalidRequestError("the multipart body ends before its closing boundary (--BOUNDARY--): it was cut "
                                  "off; send the whole body", param=param)


def _param(name: str | None) -> str:
    return "image" if name in ("image[]", None) else shown(name, 40).strip("'\"")


async def _once(body: bytes):
    yield body


async def parse_multipart(headers, body: bytes, max_image_bytes: int = 1 << 40) -> tuple[dict, dict]:
    """``stream_multipart`` of a body already in memory (the Python API and tests)."""
    from .image_input import MAX_IMAGES

    return await stream_multipart(headers, _once(body), max_image_bytes, MAX_IMAGES + 2)


WRITE_BYTES = 1 << 20  # an upload's file part is written out in pieces of about this size, off the event loop


async def receive_jsonl_upload(headers, stream, target) -> tuple[str, str, int]:
    """A POST /v1/files multipart body, parsed as ``stream`` yields it: the ``file`` part written to ``target`` as
    it arrives, in pieces off the event loop -> (purpose, filename, the longest line's bytes). 400s name the
    field; a text field over ``uploads.MAX_FIELD_BYTES`` is a 413."""
    from python_multipart import MultipartParser
    from python_multipart.multipart import parse_options_header

    from .storage import run_blocking

    ctype = headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise InvalidRequestError("send the file as multipart/form-data with fields `file` and `purpose`",
                                  param="file")
    boundary, charset = multipart_params(ctype)

    def text(data: bytes, field: str | None) -> str:
        return _decode(data, charset, field, param=field or "file")

    fields: dict[str, str] = {}
    state = {"files": 0, "fields": 0, "filename": None, "line": 0, "longest": 0, "pending": 0}
    part: dict = {}
    pending: list[bytes] = []  # the file part's data not yet written

    def on_headers_finished():
        disposition = next((v for k, v in part["headers"] if k == b"content-disposition"), b"")
        _, options = parse_options_header(disposition)
        if b"name" not in options:
            raise InvalidRequestError("the multipart body cannot be read: a part's Content-Disposition has no name",
                                      param="file")
        name = part["name"] = text(options[b"name"], None)
        part["file"] = name == "file" or b"filename" in options
        if part["file"]:
            state["files"] += 1
            if state["files"] > 1 or name != "file":
                raise InvalidRequestError("send one file, in the multipart field `file`", param="file")
            if b"filename" in options:
                state["filename"] = text(options[b"filename"], "file")
        else:
            state["fields"] += 1
            if state["fields"] > 8:
                raise InvalidRequestError("too many fields: send `file` and `purpose`", param=_field(name))

    def on_part_data(data, start, end):
        if not part["file"]:
            part["size"] += end - start
            if part["size"] > MAX_FIELD_BYTES:
                raise PayloadTooLarge(f"{shown(part['name'], 40)} is larger than {MAX_FIELD_BYTES} bytes (the limit "
                                      f"on a text field)", param=_field(part["name"]))
            part["data"].append(data[start:end])
            return
        piece = data[start:end]
        pending.append(piece)
        state["pending"] += len(piece)
        # A bound on the longest line, for the check's reservation, in constant time a piece: the line running
        # into its first line end, and the span between its first and last (any line wholly inside is shorter).
        first = piece.find(b"\n")
        if first < 0:
            state["line"] += len(piece)
            return
        last = piece.rfind(b"\n")
        state["longest"] = max(state["longest"], state["line"] + first, last - first)
        state["line"] = len(piece) - last - 1

    def on_part_end():
        if not part["file"]:
            name = part["name"]
            if name in fields:
                raise InvalidRequestError(f"{shown(name, 40)} is sent more than once", param=_field(name))
            fields[name] = text(b"".join(part["data"]), _field(name))

    parser = MultipartParser(boundary, {**_header_callbacks(part), "on_part_data": on_part_data,
                                        "on_part_end": on_part_end, "on_headers_finished": on_headers_finished})
    with open(target, "wb") as out:
        async def write_out():
            if state["pending"] >= WRITE_BYTES:
                await run_blocking(out.writelines, pending[:])
                pending.clear()
                state["pending"] = 0

        await _feed(parser, stream, write_out, param="file")
        await run_blocking(out.writelines, pending[:])
        pending.clear()
    purpose = fields.get("purpose")
    if purpose != "batch":
        raise InvalidRequestError(f"purpose must be \"batch\" (the only files this server takes), got "
                                  f"{shown(purpose)}", param="purpose")
    if not state["files"]:
        raise InvalidRequestError("send the JSONL file in the multipart field `file`", param="file")
    # (a charset such as unicode_escape can make lone surrogates of a name's bytes: the caller escapes them)
    return purpose, (state["filename"] or "input.jsonl")[:255], max(state["longest"], state["line"])


def _field(name: str | None) -> str:
    return shown(name, 40).strip("'\"") if name else "file"
