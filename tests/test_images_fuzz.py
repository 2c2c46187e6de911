"""Bugs found by fuzzing the Images endpoints (generations, edits: JSON, multipart and streamed) against OpenAI's
published spec, each with the input that showed it. Fast: no model, no Ray; what needs a server runs on fake
replicas."""

import asyncio
import gc

from zimage_common.messages import ImageRequest


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
