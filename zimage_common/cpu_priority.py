"""Batch-job work at a lower CPU priority than interactive work: the OS niceness of the thread doing it (Linux).

A batch job shares the host's cores with interactive requests: on a CPU deployment its denoising steps, decodes and
image encodes are the CPU load itself, and on a GPU host its CPU-side work (encoding images, writing results) runs
beside the threads that feed the GPUs. Queue order keeps a job's work from running ahead of interactive work; the
OS scheduler decides who gets a core when both are runnable at once, and without this it shares them evenly. A
thread doing batch-job work runs ``JOB_NICE`` steps nicer than the process, so an interactive thread that wakes up
takes the core (CFS weights: nice 10 gets about a tenth of what nice 0 gets when both want the core); while no
interactive thread wants it, the job runs at full speed.

Two kinds of thread:

- ``lower_this_thread()``: a thread that only ever does batch-job work (a job's image encoder, its output writer)
  is lowered once, for good. Lowering needs no privilege.
- ``run_as(priority)``: a shared thread (a replica's stage threads and step loop) takes the niceness of the work it
  runs now, lowered for batch-job work and back for interactive work. Raising a thread's priority back needs
  ``CAP_SYS_NICE`` or an ``RLIMIT_NICE`` allowance, which a container often lacks: where it cannot be undone
  (``can_restore``), a shared thread is never lowered, so interactive work never runs at a job's priority.

A thread started by a lowered thread inherits its niceness: shared pools are started from threads at the process's
niceness.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import threading

from .messages import INTERACTIVE

log = logging.getLogger(__name__)

JOB_NICE = 10  # added to the process's niceness for batch-job work (Linux caps the sum at 19)

# The priority of the work the current context does (a replica's call sets it to its requests' most urgent): the
# stage threads, which run each call in its caller's context, order their queues and set their niceness by it.
WORK_PRIORITY: contextvars.ContextVar[int] = contextvars.ContextVar("work_priority", default=INTERACTIVE)

_local = threading.local()  # .nice: what this module last set on the calling thread
_restore: bool | None = None  # whether a lowered thread can be raised back here (probed once)
_base_nice: int | None = None
_lock = threading.Lock()


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "setpriority")


def _base() -> int:
    """The process's niceness, what interactive work runs at: its main thread's when first asked (a thread id of 0
    would name the calling thread, which may be lowered)."""
    global _base_nice
    if _base_nice is None:
        _base_nice = os.getpriority(os.PRIO_PROCESS, os.getpid())
    return _base_nice


def _set(nice: int) -> bool:
    """Set the calling thread's niceness (on Linux, PRIO_PROCESS with a thread id names that thread alone)."""
    if getattr(_local, "nice", None) == nice:
        return True
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError:
        return False
    _local.nice = nice
    return True


def job_nice() -> int:
    return min(19, _base() + JOB_NICE)


def lower_this_thread() -> bool:
    """Lower the calling thread, for good, to batch-job priority (a thread that runs nothing else)."""
    return supported() and _set(job_nice())


def can_restore() -> bool:
    """Whether a thread lowered here can be raised back to the process's niceness (probed once, on a thread of its
    own, so a probe that cannot undo itself leaves no thread lowered)."""
    global _restore
    if _restore is not None:
        return _restore
    with _lock:
        if _restore is None:
            _restore = False
            if supported():
                out: list[bool] = []

                def probe() -> None:
                    base = _base()
                    out.append(_set(min(19, base + 1)) and _set(base))

                t = threading.Thread(target=probe, name="nice-probe", daemon=True)
                t.start()
                t.join()
                _restore = bool(out and out[0])
                if not _restore:
                    log.info("batch-job work runs at the process's CPU priority here: a lowered thread could not "
                             "be raised back (no CAP_SYS_NICE or RLIMIT_NICE allowance)")
        return _restore


def run_as(priority: int) -> None:
    """Give the calling (shared) thread the CPU priority of the work it runs now: ``INTERACTIVE`` at the process's
    niceness, anything less urgent at ``job_nice()``; nothing where a lowered thread could not be raised back."""
    if not supported() or not can_restore():
        return
    _set(_base() if priority <= INTERACTIVE else job_nice())
