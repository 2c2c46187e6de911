"""Injected faults for reliability tests and chaos drills. Off unless a test turns them on."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from orchestrator.messages import Batch


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
