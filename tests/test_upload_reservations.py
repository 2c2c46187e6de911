"""The upload budget's reservations (uploads.ByteBudget, uploads.BodyReservation, server.py /v1/images/edits):
chunked bodies grow ahead of new ones, never past the budget, a hold-and-wait between growing bodies is broken at
once, and every ending gives the whole reservation back."""

import asyncio
import threading
import time

import httpx
import pytest
from test_http_limits import Server, cfg, multipart, png

from orchestrator.uploads import BodyReservation, ByteBudget
from zimage_common.errors import QueueFullError

MiB = 1 << 20


async def _chunks(sizes):
    for n in sizes:
        yield b"x" * n


def test_a_chunked_body_larger_than_the_budget_runs_alone():
    """A declared body larger than max_inflight_upload_bytes is admitted alone (acquire caps a cost at the
    capacity); a chunked one of the same size grows until it holds the whole budget, then reads on alone."""

    async def run():
        budget = ByteBudget(3 * MiB)
        declared = BodyReservation(budget, 5 * MiB, 5 * MiB, wait_s=0.2)
        await declared.open()  # admitted alone
        async for _ in declared.guard(_chunks([MiB] * 5)):
            pass
        declared.release()
        assert budget.used == 0
        chunked = BodyReservation(budget, None, 8 * MiB, wait_s=0.2)
        await chunked.open()
        try:
            async for _ in chunked.guard(_chunks([MiB] * 5)):  # the same 5 MiB, without a length
                pass
        finally:
            chunked.release()

    asyncio.run(run())


def _chunked_head(path, headers):
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {headers['content-type']}\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _read_response(sock, timeout=10.0) -> bytes:
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        got = sock.recv(65536)
        if not got:
            return buf
        buf += got
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = int([ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")][0])
    while len(rest) < length:
        got = sock.recv(65536)
        if not got:
            break
        rest += got
    return head + b"\r\n\r\n" + rest


def test_a_chunked_edit_larger_than_max_inflight_upload_bytes_is_served_on_an_idle_server():
    limits = {"max_inflight_upload_bytes": 2 * MiB, "max_upload_bytes": 8 * MiB, "upload_wait_s": 0.5}
    with Server(cfg(limits=limits)) as s:
        headers, body = multipart([("prompt", b"x", None), ("image", png() + b"\0" * (3 * MiB), "a.png")])
        r = httpx.post(f"{s.url}/v1/images/edits", content=body, headers=headers, timeout=30)
        assert r.status_code == 429 and "refused by the test" in r.text, r.text  # declared: read, decoded, admitted
        r = httpx.post(f"{s.url}/v1/images/edits", content=(body[i:i + 65536] for i in range(0, len(body), 65536)),
                       headers=headers, timeout=30)
        assert s.app.state.upload_budget.used == 0
        assert r.status_code == 429 and "refused by the test" in r.text, r.text


def test_two_growing_chunked_bodies_that_wait_for_each_other_end_at_once():
    """Hold-and-wait: each chunked body holds half the budget and needs room the other holds, so neither could
    finish. The newest is refused at once (its 429 says retry) and gives its room back; the other is served."""

    async def run():
        budget = ByteBudget(4 * MiB)
        gate = asyncio.Event()
        a = BodyReservation(budget, None, 4 * MiB, wait_s=1.0)
        b = BodyReservation(budget, None, 4 * MiB, wait_s=1.0)

        async def body(r):
            async def src():
                yield b"x" * (3 * MiB // 2)  # 1.5 MiB sent: it holds 2 MiB
                await gate.wait()
                yield b"x" * (2 * MiB)  # the rest: it needs the whole 4 MiB
            await r.open()
            try:
                async for _ in r.guard(src()):
                    await asyncio.sleep(0.05)  # the body takes a moment to read and parse
                return "ok"
            except QueueFullError:
                return "429"
            finally:
                r.release()

        ta, tb = asyncio.create_task(body(a)), asyncio.create_task(body(b))
        while budget.used < 4 * MiB:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        gate.set()
        results = await asyncio.gather(ta, tb)
        return results, time.monotonic() - t0

    results, took = asyncio.run(run())
    assert sorted(results) == ["429", "ok"] and took < 0.9, (results, took)  # not after wait_s (1 s)


def test_a_growing_body_goes_ahead_of_a_newcomer_that_waits_for_it():
    """A chunked body's growth is not queued behind a declared-length request that cannot start until that body
    ends: the room it asks for is free, and it gets it at once."""

    async def run():
        budget = ByteBudget(4 * MiB)
        a = BodyReservation(budget, None, 4 * MiB, wait_s=5.0)
        await a.open()
        stream = a.guard(_chunks([MiB + 1, MiB]))
        await stream.__anext__()  # holds 2 MiB (1 + 1)
        assert budget.used == 2 * MiB
        newcomer = asyncio.create_task(budget.acquire(3 * MiB, 1.0))  # 2 + 3 > 4: it waits for a to end
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await stream.__anext__()  # a asks for 2 MiB more: 2 + 2 <= 4, the room is free
        stalled = time.monotonic() - t0
        granted = await newcomer
        a.release()
        return stalled, granted

    stalled, granted = asyncio.run(run())
    assert stalled < 0.2, (stalled, granted)


def test_a_mid_body_429_leaves_the_keep_alive_connection_usable():
    """A chunked edit refused mid-body (429): the client gets the 429, finishes sending its body, and its next
    request on the same connection is answered."""
    limits = {"max_inflight_upload_bytes": 8 * MiB, "max_upload_bytes": 4 * MiB, "upload_wait_s": 0.3}
    with Server(cfg(limits=limits, server={"keep_alive_s": 30, "header_timeout_s": 30})) as s:
        budget = s.app.state.upload_budget
        other = 6 * MiB  # another upload's bytes (set directly: only this body's growth is under test)
        budget.used += other
        headers, body = multipart([("prompt", b"x", None), ("image", png() + b"\0" * (3 * MiB), "a.png")])
        c = s.sock()
        c.sendall(_chunked_head("/v1/images/edits", headers))
        for i in range(0, 5 * MiB // 2, 65536):
            c.sendall(_chunk(body[i:i + 65536]))
        answer = _read_response(c)  # the 429 arrives while the body is unfinished
        assert answer.startswith(b"HTTP/1.1 429"), answer[:300]
        assert b"max_inflight_upload_bytes" in answer
        budget.used -= other
        deadline = time.time() + 5
        while budget.used or budget.running:
            assert time.time() < deadline, (budget.used, budget.running)
            time.sleep(0.02)
        for i in range(5 * MiB // 2, len(body), 65536):
            c.sendall(_chunk(body[i:i + 65536]))
        c.sendall(b"0\r\n\r\n")
        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        again = _read_response(c)
        assert again.startswith(b"HTTP/1.1 200"), again[:300]
        c.close()


@pytest.mark.parametrize("ending", ["400", "413", "disconnect", "408", "decode429", "ok", "json413", "json400"])
def test_every_ending_gives_the_whole_reservation_back(ending):
    limits = {"max_inflight_upload_bytes": 16 * MiB, "max_upload_bytes": 4 * MiB, "upload_wait_s": 1,
              "decode_wait_s": 0.3, "max_concurrent_image_decodes": 1}
    server = {"body_idle_timeout_s": 0.5, "keep_alive_s": 30}
    with Server(cfg(limits=limits, server=server)) as s:
        budget = s.app.state.upload_budget
        headers, body = multipart([("prompt", b"x", None), ("image", png() + b"\0" * (2 * MiB), "a.png")])
        c = s.sock()
        if ending.startswith("json"):
            headers = {"content-type": "application/json"}
            body = b'{"prompt": "x", "images": [' + (b" " * (5 * MiB if ending == "json413" else 3 * MiB)) + b"}"
        if ending == "decode429":
            s.app.state.decoder.used = s.app.state.decoder.capacity  # a decode that never ends
            s.app.state.decoder.running = 1
        if ending == "400":
            body = body[: len(body) - 40]  # cut before its closing boundary
        if ending == "413":
            body = body[:-20] + b"\0" * (3 * MiB) + body[-20:]
        c.sendall(_chunked_head("/v1/images/edits", headers))
        stop = len(body) // 2 if ending in ("disconnect", "408") else len(body)
        for i in range(0, stop, 65536):
            c.sendall(_chunk(body[i:i + 65536]))
        if ending == "disconnect":
            time.sleep(0.2)
            c.close()
        elif ending != "408":
            c.sendall(b"0\r\n\r\n")
        if ending != "disconnect":
            try:
                answer = _read_response(c)
            except (ConnectionResetError, BrokenPipeError) as e:
                answer = repr(e).encode()
            expected = {"400": b"400", "413": b"413", "408": b"408", "decode429": b"429", "ok": b"429",
                        "json413": b"413", "json400": b"400"}[ending]
            assert answer.startswith(b"HTTP/1.1 " + expected), answer[:400]
        deadline = time.time() + 5
        while budget.used or budget.running:
            assert time.time() < deadline, (ending, budget.used, budget.running)
            time.sleep(0.02)
        c.close()


def test_two_chunked_edits_that_need_each_others_room_one_is_refused_at_once():
    """Two chunked edits of 3 MiB, max_inflight_upload_bytes 4 MiB: each grows to 2 MiB, then each needs the
    other's bytes. The newest is a 429 at once (not after upload_wait_s), the other is read and admitted."""
    limits = {"max_inflight_upload_bytes": 4 * MiB, "max_upload_bytes": 4 * MiB, "upload_wait_s": 1}
    with Server(cfg(limits=limits, server={"keep_alive_s": 30})) as s:
        budget = s.app.state.upload_budget
        headers, body = multipart([("prompt", b"x", None), ("image", png() + b"\0" * (3 * MiB), "a.png")])
        socks = [s.sock() for _ in range(2)]
        half = 3 * MiB // 2
        for c in socks:
            c.sendall(_chunked_head("/v1/images/edits", headers))
            for i in range(0, half, 65536):
                c.sendall(_chunk(body[i:i + 65536]))
        deadline = time.time() + 5
        while budget.used < 4 * MiB:
            assert time.time() < deadline, budget.used
            time.sleep(0.02)
        answers = [None, None]

        def rest(k):
            try:
                for i in range(half, len(body), 65536):
                    socks[k].sendall(_chunk(body[i:i + 65536]))
                socks[k].sendall(b"0\r\n\r\n")
            except OSError:
                pass
            answers[k] = _read_response(socks[k], timeout=20)

        threads = [threading.Thread(target=rest, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        shown = [_read_body(a)[:120] for a in answers]
        deadline = time.time() + 5
        while budget.used or budget.running or budget.holders:
            assert time.time() < deadline, (budget.used, budget.running, budget.holders)
            time.sleep(0.02)
    admitted = [a for a in answers if b"refused by the test" in _read_body(a)]
    refused = [a for a in answers if b"max_inflight_upload_bytes" in _read_body(a)]
    assert len(admitted) == len(refused) == 1 and refused[0].startswith(b"HTTP/1.1 429"), shown


def _read_body(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[2]


def test_a_body_counts_as_a_holder_from_the_moment_it_is_granted():
    """A body let in by another's release holds its room before its own task runs again; were it counted only
    then, a grower checking for a hold-and-wait in between would see no other holder and be refused for nothing."""

    async def run():
        budget = ByteBudget(4 * MiB)
        a = BodyReservation(budget, None, 4 * MiB, wait_s=1.0)
        c = BodyReservation(budget, 2 * MiB, 2 * MiB, wait_s=1.0)
        await a.open()
        await c.open()
        assert (budget.used, budget.holders) == (3 * MiB, 2)
        b = BodyReservation(budget, 2 * MiB, 2 * MiB, wait_s=1.0)
        opening = asyncio.ensure_future(b.open())
        await asyncio.sleep(0.01)
        assert budget.waiting == 1
        c.release()  # grants b's room in this call
        assert (budget.used, budget.holders) == (3 * MiB, 2)  # a and b, before b's task has run
        t0 = time.monotonic()
        grower = asyncio.ensure_future(budget.grow(2 * MiB, 0.2))  # a needs more than is free: it waits
        await opening
        assert await grower is False and time.monotonic() - t0 >= 0.15  # out of time, not refused at once
        b.release()
        a.release()
        assert (budget.used, budget.running, budget.holders) == (0, 0, 0)

    asyncio.run(run())
