"""Bugs found by fuzzing the Images endpoints (generations, edits: JSON, multipart and streamed) against OpenAI's
published spec, each with the input that showed it. Fast: no model, no Ray; what needs a server runs on fake
replicas."""

import asyncio
import gc
import io

import httpx
import pytest
from batch_fakes import TimedBackend, factory
from conftest import ServerThread, tiny_config
from openai_spec import check
from PIL import Image

from orchestrator.server import create_app
from zimage_common.messages import ImageRequest

MAX_PIXELS = 64 * 64


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("images-fuzz"), deployment={"replicas": 1},
                      limits={"max_pixels": MAX_PIXELS})
    with ServerThread(create_app(cfg, deployment_factory=factory(TimedBackend(1)))) as s:
        yield s.wait_ready(30)


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, "PNG")
    return buf.getvalue()


def edit(server, image: bytes, **fields):
    return httpx.post(f"{server.url}/v1/images/edits", data={"prompt": "p", **fields},
                      files={"image": ("a.png", image, "image/png")}, timeout=30)


def _call(n=2, stream=False):
    from orchestrator.images_api import ImageCall

    return ImageCall([ImageRequest(f"gone-{i}", "p", i, 64, 64, 2, 0.0) for i in range(n)], stream=stream)


class _GoneClient:
    """A request whose client has gone: the next ASGI message is the disconnect."""

    async def receive(self):
        return {"type": "http.disconnect"}


def _loop_errors(scenario) -> list[str]:
    """Run ``scenario()`` (a coroutine function) on a fresh loop; the messages the loop's exception handler got,
    which asyncio logs at ERROR with a traceback ("exception was never retrieved", "Task was destroyed but it is
    pending"), collected after the scenario's objects are gone."""
    seen: list[str] = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: seen.append(ctx["message"]))
        await scenario()
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0)

    asyncio.run(main())
    return seen


def test_a_client_gone_while_its_json_answer_waits_leaves_nothing_unretrieved():
    """A client that disconnects while its images wait: the call is a 499 and the waiting images are cancelled,
    and nothing is left for asyncio to report: the cancelled gather's CancelledError used to be logged as
    "_GatheringFuture exception was never retrieved", one ERROR and traceback per disconnect."""
    from orchestrator.answers import answer_json

    waiters = []

    async def scenario():
        loop = asyncio.get_running_loop()
        waiters.extend(loop.create_future() for _ in range(2))
        response = await answer_json(_GoneClient(), _call(), list(waiters))
        assert response.status_code == 499

    assert _loop_errors(scenario) == []
    assert all(w.cancelled() for w in waiters)


def test_a_stream_whose_client_goes_away_cancels_its_work_and_leaves_no_task_behind():
    """Starlette cancels a streaming response's body when its client disconnects. The stream's images are
    cancelled, and nothing is left behind: the gather of the per-image tasks used to end in a CancelledError never
    retrieved, and the pending read of the event queue a task destroyed while pending (two asyncio ERRORs with
    tracebacks per disconnected stream)."""
    from orchestrator.answers import EventStream

    waiters = []

    async def scenario():
        loop = asyncio.get_running_loop()
        waiters.extend(loop.create_future() for _ in range(2))
        stream = EventStream(_call(stream=True), render=None)

        async def consume():
            async for _ in stream.events(list(waiters)):
                pass

        body = asyncio.ensure_future(consume())
        await asyncio.sleep(0.01)  # the stream waits for its first event
        body.cancel()  # the client went away
        await asyncio.gather(body, return_exceptions=True)
        await asyncio.sleep(0)

    assert _loop_errors(scenario) == []
    assert all(w.cancelled() for w in waiters)


def test_an_image_too_narrow_to_scale_down_is_refused_for_what_it_is(server):
    """An edit with ``size: auto`` takes the image's own size, scaled down to the output limits. A 1000x20 image
    (both sides over 16) scaled to limits.max_pixels has a 9-pixel side: it was refused as "each side must be at
    least 16 pixels", which it already is. The message says what happened and the fix."""
    r = edit(server, png(1000, 20))
    assert r.status_code == 400, r.text[:300]
    check("ErrorResponse", r.json())
    err = r.json()["error"]
    assert err["param"] == "image"
    assert f"limits.max_pixels = {MAX_PIXELS}" in err["message"] and "shorter side would be 9 pixels" in err["message"]
    assert "crop it" in err["message"] and "send a size" in err["message"]
    assert edit(server, png(1000, 20), size="64x64").status_code == 200  # the fix it names works
    r = edit(server, png(15, 100))  # a side under 16 as sent keeps its own message
    assert r.status_code == 400 and "each side must be at least 16 pixels" in r.json()["error"]["message"]


def test_a_json_edit_takes_data_urls_as_the_fetch_standard_reads_them(server):
    """``image_url`` is "a fully qualified URL or base64-encoded data URL"; a data URL is read as the Fetch standard
    says: its ``data:`` scheme and ``;base64`` marker in any case, ASCII whitespace in the base64 ignored (the line
    breaks every 76 characters that the base64 tool and Python's ``base64.encodebytes`` write), padding optional,
    percent-escapes decoded. Each of these was a 400 ("the data URL's base64 is invalid")."""
    import base64

    image = png(64, 48)
    plain = base64.b64encode(image).decode()
    for url in ("data:image/png;base64," + base64.encodebytes(image).decode(),
                "DATA:image/PNG;BASE64," + plain,
                "data:image/png;base64," + plain.rstrip("="),
                "data:image/png;base64," + plain.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")):
        r = httpx.post(f"{server.url}/v1/images/edits", json={"prompt": "p", "images": [{"image_url": url}]},
                       timeout=30)
        assert r.status_code == 200, (url[:40], r.text[:300])
        check("ImagesResponse", r.json())
    for bad in ("data:image/png;base64,@@@" + plain, "data:image/png;base64," + plain + "A"):  # not base64
        r = httpx.post(f"{server.url}/v1/images/edits", json={"prompt": "p", "images": [{"image_url": bad}]},
                       timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "images", r.text[:300]


def test_a_trailing_slash_is_a_404_naming_the_path_not_a_redirect_to_an_absolute_url(server):
    """Starlette answered ``POST /v1/images/generations/`` with a 307 to an absolute URL built from the Host it saw
    (behind a TLS proxy, the internal http:// address) and an empty body."""
    r = httpx.post(f"{server.url}/v1/images/generations/", json={"prompt": "x"}, headers={"Host": "internal:8000"})
    err = r.json()["error"]
    assert r.status_code == 404 and "location" not in r.headers and err["code"] == "not_found"
    assert "(without the trailing slash: '/v1/images/generations')" in err["message"]
    r = httpx.get(f"{server.url}/v1/no-such-thing/")
    assert r.status_code == 404 and "trailing slash" not in r.json()["error"]["message"]


def test_a_malformed_multipart_body_is_a_400_and_no_log_line_a_client_can_write_at_will(server, caplog):
    """Each malformed multipart body made python_multipart log a WARNING ("Found invalid character ..."), one line
    per request and not rate-limited; the 400 already tells the client."""
    import logging

    from zimage_common import logging_setup

    logging_setup.configure()  # what a served process runs at start (conftest takes its handler and level back)
    with caplog.at_level(logging.INFO):
        r = httpx.post(f"{server.url}/v1/images/edits", content=b"--b\r\nX\x00: y\r\n\r\nz\r\n--b--\r\n",
                       headers={"Content-Type": "multipart/form-data; boundary=b"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert not [rec for rec in caplog.records if rec.name.startswith("python_multipart")]
