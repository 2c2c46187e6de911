"""Compiled code with a counted eager fallback: after ready a call whose shapes no compiled graph covers runs eager,
never compiles, and is counted per stage (``zimage_eager_fallbacks_total{replica, stage}``), so an operator sees a
miss instead of a silently slower replica. Under torch.compile's ``fail_on_recompile`` stance dynamo raises before
the frame runs a single op; ``guarded`` catches exactly that, counts it and calls the uncompiled function (the
compiled functions mutate nothing before the guard check, so that is the same call)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_RECOMPILE = "Detected recompile when torch.compile stance is 'fail_on_recompile'"


class Fallbacks:
    """Calls per stage that ran without compiled code after ready (thread-safe: the stages run on their own
    threads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, stage: str) -> None:
        with self._lock:
            self._counts[stage] = self._counts.get(stage, 0) + 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


FALLBACKS = Fallbacks()


def guarded(stage: str, compiled: Callable, eager: Callable, fallbacks: Fallbacks = FALLBACKS) -> Callable:
    """``compiled``, or ``eager`` (counted under ``stage``) where the serving stance refuses to compile."""

    def call(*args: Any, **kwargs: Any):
        try:
            return compiled(*args, **kwargs)
        except RuntimeError as e:
            if _RECOMPILE not in str(e):
                raise
        fallbacks.add(stage)
        return eager(*args, **kwargs)

    call.compiled = compiled  # type: ignore[attr-defined]
    call.eager = eager  # type: ignore[attr-defined]
    return call


def guarded_module(stage: str, module, fallbacks: Fallbacks = FALLBACKS, **compile_kw):
    """``module`` compiled (``torch.compile(module, **compile_kw)``) behind a module whose calls fall back to
    ``module`` itself, counted, where no graph covers the input."""
    import torch

    class Guarded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.compiled = torch.compile(module, **compile_kw)
            self._call = guarded(stage, self.compiled, module, fallbacks)

        def forward(self, *args, **kwargs):
            return self._call(*args, **kwargs)

    return Guarded()


def serve_stance() -> None:
    """After ready: nothing compiles; a call no graph covers raises inside dynamo and ``guarded`` runs it eager."""
    import torch

    torch.compiler.set_stance("fail_on_recompile")


def compile_vae_decoder(vae, **compile_kw) -> None:
    """The VAE decoder, channels-last, as one graph with dynamic height and width that serves every size.

    On an H100 (benchmarks/probe_any_size.py, docs/benchmarks.md) one graph per size decoded 1024x1024 in 0.039 s
    and 1280x720 in 0.036 s, but a size no warm-up named ran eager (0.143 s and 0.122 s, and cuDNN's algorithm
    search made its first decode 0.5-3.9 s); the dynamic graph decodes every size: 0.048 s and 0.037 s, 512x512
    in 0.014 s, 2048x1024 in 0.092 s. GroupNorm+SiLU compiled around eager convolutions was slower (0.054 s at
    1024x1024). Sizes that happen to be equal stay separate symbols (``use_duck_shape``): a square first size
    would otherwise give a graph for squares only."""
    import torch
    import torch.fx.experimental._config

    torch.fx.experimental._config.use_duck_shape = False
    compile_kw.setdefault("dynamic", True)
    vae.to(memory_format=torch.channels_last)
    vae.decoder = guarded_module("decode", vae.decoder, **compile_kw)


class counted:
    """``with counted() as missed:`` -> ``missed``, after the block: the calls per stage that fell back to eager
    inside it (empty where every call had its graph)."""

    def __init__(self, fallbacks: Fallbacks = FALLBACKS):
        self.fallbacks = fallbacks
        self.missed: dict[str, int] = {}

    def __enter__(self) -> dict[str, int]:
        self._before = self.fallbacks.counts()
        return self.missed

    def __exit__(self, *exc) -> None:
        after = self.fallbacks.counts()
        self.missed.update({k: n - self._before.get(k, 0) for k, n in after.items() if n != self._before.get(k, 0)})
