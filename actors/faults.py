"""Injected faults for reliability tests and chaos drills. Off unless a test turns them on."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from zimage_common.messages import Batch


class InjectedOutOfMemory(RuntimeError):
    """Raised as a stand-in for CUDA OOM: the worker classifies it by its 'out of memory' message."""


def make_fault(kind: str | None, **kw) -> Callable[[Batch], None] | None:
    if kind is None:
        return None
    if kind == "raise":
        message = kw.get("message", "injected failure")

        def fault(batch: Batch) -> None:
            raise RuntimeError(message)

    elif kind == "oom_above":
        max_batch = int(kw["max_batch"])

        def fault(batch: Batch) -> None:
            if len(batch) > max_batch:
                raise InjectedOutOfMemory(f"CUDA out of memory (injected: batch {len(batch)} > {max_batch})")

    elif kind == "poison":
        marker = kw["marker"]

        def fault(batch: Batch) -> None:
            # A failure only one request's content causes, and that no per-request check catches: the whole batch
            # raises, as a model bug triggered by one input would.
            if any(marker in r.prompt for r in batch.requests):
                raise RuntimeError(f"injected failure caused by a prompt containing {marker!r}")

    elif kind == "stall":
        seconds, fired = float(kw["seconds"]), []

        def fault(batch: Batch) -> None:
            if not fired:
                fired.append(True)
                time.sleep(seconds)

    elif kind == "exit":

        def fault(batch: Batch) -> None:
            os._exit(1)

    else:
        raise ValueError(f"unknown fault kind {kind!r}")
    return fault
