"""The VAE decoder compiled ahead of time (AOTInductor): one package per image size, kept in the compile cache.

Why: with ``torch.compile``, a warm start still traces the decoder with dynamo once per size (static graphs: one
per size decodes 3.7x faster than eager and 1.3x faster than one dynamic graph). That took 8.7-11.7 s of a warm
start for the five warm-up sizes (H100, sessions 9-10), on the main thread, because dynamo's tracing is not
thread-safe and cannot run beside the transformer's. A package from ``torch._inductor.aoti_compile_and_package``
loads without dynamo: a warm start loads the sizes' packages on the decode stage's thread, beside the rest of the
start-up (``load``), and a cold one exports and compiles them first (``compile_missing``, main thread).

- Packages hold no weights (``aot_inductor.package_constants_in_so=False``): each loaded model runs on the live
  decoder's own parameters (``load_constants(..., user_managed=True)``): no second copy in GPU memory, and always
  the weights loaded now (a changed checkpoint of the same architecture needs no new package).
- The package's key: torch, CUDA and triton versions, the GPU (name, compute capability), the decoder's class, and
  every parameter's name, shape, dtype and strides (channels-last included), and the latent's shape.
- ``AotDecoder`` replaces ``vae.decoder``: a latent of a loaded size runs its package; any other shape (a size
  outside the warm-up, extra arguments) runs ``fallback``, which is the eager decoder unless a size failed to
  compile or load, in which case it is ``torch.compile`` of the decoder as before (compiled in the warm-up; after
  ready, a new size runs eager: the worker's ``eager_on_recompile`` stance).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what a package holds changes


class AotDecoder(torch.nn.Module):
    """``vae.decoder`` with one AOTInductor model per latent shape ``(1, C, h, w)``; see the module docstring."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.eager = decoder
        self.fallback: torch.nn.Module = decoder
        self.models: dict[tuple[int, ...], object] = {}  # latent shape -> loaded AOTICompiledModel

    def forward(self, z: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        model = self.models.get(tuple(z.shape)) if not args and not kwargs else None
        if model is None:
            return self.fallback(z, *args, **kwargs)
        return model(z.contiguous())

    # ---- the packages ----------------------------------------------------------------------------------------
    def package_path(self, root: Path, shape: tuple[int, ...]) -> Path:
        return Path(root) / f"vae-decoder-{'x'.join(map(str, shape))}-{package_key(self.eager, shape)}.pt2"

    def compile_missing(self, root: Path, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> dict[str, float]:
        """Export and compile a package for each shape that has none in ``root`` (dynamo traces: call it on the
        main thread, never beside another compile). Returns ``{size: seconds}`` of those compiled; a shape that
        fails is logged and left to the fallback."""
        done = {}
        for shape in shapes:
            path = self.package_path(root, shape)
            if path.exists():
                continue
            t0 = time.perf_counter()
            try:
                compile_package(self.eager, shape, dtype, path)
            except Exception as e:  # noqa: BLE001 - an unsupported torch or toolchain: torch.compile instead
                log.warning("VAE decoder: could not compile an AOTInductor package for %s (%s: %s); that size "
                            "uses torch.compile", _size(shape), type(e).__name__, _first_line(e))
                continue
            done[_size(shape)] = round(time.perf_counter() - t0, 2)
        return done

    def load(self, root: Path, shapes: list[tuple[int, ...]]) -> dict[str, float]:
        """Load the packages of ``shapes`` that exist (no dynamo: safe on the decode stage's thread beside a
        compile elsewhere). Returns ``{size: seconds}`` of those loaded; the rest stay with the fallback, which
        becomes ``torch.compile`` of the decoder if any shape has no package."""
        from torch._inductor import aoti_load_package

        params = dict(self.eager.named_parameters()) | dict(self.eager.named_buffers())
        device = next(self.eager.parameters()).device
        loaded = {}
        for shape in shapes:
            path = self.package_path(root, shape)
            t0 = time.perf_counter()
            try:
                if not path.exists():
                    raise FileNotFoundError(path)
                model = aoti_load_package(str(path), device_index=-1 if device.index is None else device.index)
                model.load_constants({n: params[n] for n in model.get_constant_fqns()}, check_full_update=True,
                                     user_managed=True)
            except Exception as e:  # noqa: BLE001 - a package from another build, a broken file
                log.warning("VAE decoder: AOTInductor package for %s not loaded (%s: %s); that size uses "
                            "torch.compile", _size(shape), type(e).__name__, _first_line(e))
                continue
            self.models[tuple(shape)] = model
            loaded[_size(shape)] = round(time.perf_counter() - t0, 3)
        if len(self.models) < len(set(map(tuple, shapes))):
            self.fallback = torch.compile(self.eager, dynamic=False)
        return loaded


def package_key(decoder: torch.nn.Module, shape: tuple[int, ...]) -> str:
    """What a package depends on, hashed: the toolchain, the GPU, the decoder's code and parameter layout, the
    input shape."""
    device = next(decoder.parameters()).device
    gpu = (torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)) if device.type == "cuda" \
        else (device.type,)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    layout = [(n, tuple(p.shape), str(p.dtype), tuple(p.stride()))
              for n, p in list(decoder.named_parameters()) + list(decoder.named_buffers())]
    what = {"format": FORMAT, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "gpu": gpu, "class": f"{type(decoder).__module__}.{type(decoder).__qualname__}", "layout": layout,
            "shape": list(shape)}
    return hashlib.sha256(json.dumps(what, default=str).encode()).hexdigest()[:20]


def compile_package(decoder: torch.nn.Module, shape: tuple[int, ...], dtype: torch.dtype, path: Path) -> None:
    """Export ``decoder`` at one latent shape and compile it to an AOTInductor package without weights at
    ``path`` (written under a temporary name, then renamed: a concurrent start never reads half a file)."""
    from torch._inductor import aoti_compile_and_package

    device = next(decoder.parameters()).device
    z = torch.randn(*shape, device=device, dtype=dtype)
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(decoder, (z,), strict=False)
        t1 = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
        os.close(fd)
        try:
            aoti_compile_and_package(
                program, package_path=tmp, inductor_configs={"aot_inductor.package_constants_in_so": False})
            os.replace(tmp, path)
            log.info("VAE decoder: AOTInductor package for %s: export %.1fs, compile %.1fs", _size(shape), t1 - t0,
                     time.perf_counter() - t1)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def latent_shape(vae, width: int, height: int) -> tuple[int, int, int, int]:
    """The decoder's input for one image of ``width`` x ``height`` (the engine decodes one image per call)."""
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    return (1, vae.config.latent_channels, height // f, width // f)


def _size(shape: tuple[int, ...]) -> str:
    return f"latent {shape[-1]}x{shape[-2]}"


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""
