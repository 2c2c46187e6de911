"""Seconds to import what a replica imports (torch, diffusers, transformers, the engine), in a fresh interpreter:
``python3 benchmarks/import_time.py`` prints one line. Run it twice with and without a bytecode cache
(``PYTHONPYCACHEPREFIX``) to see what compiling the libraries' sources costs each process."""

import sys
import time

t0 = time.perf_counter()
import diffusers.utils.logging  # noqa: E402,F401
import transformers  # noqa: E402,F401

import actors.engine  # noqa: E402,F401

print(f"imports {time.perf_counter() - t0:.2f}s dont_write_bytecode={sys.flags.dont_write_bytecode} "
      f"pycache_prefix={sys.pycache_prefix}")
