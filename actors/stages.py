"""One long-lived thread per stage of a replica (encode, denoise, decode): every GPU call of a stage runs on it.

PyTorch caches cuDNN's execution plans per thread (convolutions, SDPA graphs), and a shape's first call on a new
thread builds them again: a VAE decode on a fresh thread took about ten times as long as on the warmed one
(docs/benchmarks-history.md, "cuDNN's plans are cached per thread"). Ray runs an actor's calls on a pool of threads
and a streamed call on a thread of its own, so each stage runs on its own thread, the one the warm-up warmed,
whichever thread the call came in on. That also serializes the stage and enters its CUDA stream, where it has one.
The caller blocks until the stage is done and gets its result or exception; a call from the stage's own thread runs
in place; the caller's context variables (the log lines' request ids) go with the call.

Each call carries its caller's work priority (``zimage_common.cpu_priority.WORK_PRIORITY``): a stage's waiting
calls run most urgent first (first come first served within a priority), so an interactive decode never queues
behind a batch job's, and the stage thread runs each call at that priority's CPU niceness."""

from __future__ import annotations

import contextvars
import itertools
import queue
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from zimage_common.cpu_priority import WORK_PRIORITY, run_as

STAGES = ("encode", "denoise", "decode")

T = TypeVar("T")


class StageThreads:
    """``run(stage, fn, *args)`` runs ``fn`` on the stage's thread (under the stage's CUDA stream, if
    ``streams`` names one) and returns what it returns. The threads are daemons: a stage stuck on a wedged GPU
    does not hold the process's exit."""

    def __init__(self, name: str, streams: dict[str, Any] | None = None):
        self.streams: dict[str, Any] = dict(streams or {})
        # (priority, sequence, call): most urgent first, in submission order within a priority
        self._queues: dict[str, queue.PriorityQueue] = {s: queue.PriorityQueue() for s in STAGES}
        self._seq = itertools.count()
        self._threads = {s: threading.Thread(target=self._serve, args=(s,), name=f"{s}-{name}", daemon=True)
                         for s in STAGES}
        for t in self._threads.values():
            t.start()

    def on(self, stage: str) -> bool:
        """Whether the calling thread is ``stage``'s."""
        return threading.current_thread() is self._threads[stage]

    def submit(self, stage: str, fn: Callable[..., T], *args, **kwargs) -> Future:
        """Queue ``fn`` on the stage's thread and return its future, for work the caller does not wait for at once
        (never from the stage's own thread and then waited on: it would wait for itself)."""
        done: Future = Future()
        self._queues[stage].put((WORK_PRIORITY.get(), next(self._seq),
                                 (contextvars.copy_context(), fn, args, kwargs, done)))
        return done

    def run(self, stage: str, fn: Callable[..., T], *args, **kwargs) -> T:
        if self.on(stage):
            return self._call(stage, fn, args, kwargs)
        done = self.submit(stage, fn, *args, **kwargs)
        try:
            return done.result()
        finally:
            # a failed call's exception holds this frame, and the future holds the exception: without this the
            # cycle keeps the failed call's tensors alive until the garbage collector runs, past the out-of-memory
            # handling that frees the CUDA cache and retries
            del done

    def _serve(self, stage: str) -> None:
        while (entry := self._queues[stage].get())[2] is not None:
            priority, _, (ctx, fn, args, kwargs, done) = entry
            run_as(priority)
            try:
                done.set_result(ctx.run(self._call, stage, fn, args, kwargs))
            except BaseException as e:  # noqa: BLE001 - the caller re-raises it
                done.set_exception(e)
            del entry, ctx, fn, args, kwargs, done  # nothing of a finished call is kept alive while waiting

    def _call(self, stage: str, fn: Callable[..., T], args, kwargs) -> T:
        stream = self.streams.get(stage)
        if stream is None:
            return fn(*args, **kwargs)
        import torch

        with torch.cuda.stream(stream):
            return fn(*args, **kwargs)

    def close(self) -> None:
        for q in self._queues.values():
            q.put((sys.maxsize, next(self._seq), None))  # after every call queued


def run_here(stage: str, fn: Callable[..., T], *args, **kwargs) -> T:
    """A stage runner that runs every stage on the calling thread (the engine used alone: tests, probes)."""
    return fn(*args, **kwargs)
