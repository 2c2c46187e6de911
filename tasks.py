#!/usr/bin/env python3
"""Set-up and run, on a machine with nothing but Python:

    python3 tasks.py demo     # create .venv, install, run the demo (tiny model, local Ray, two replicas)
    python3 tasks.py test     # create .venv, install, run the test suite

Extra arguments go to the command (`python3 tasks.py test -k router`, `python3 tasks.py demo --out /tmp/x`).
`ZIMAGE_TORCH` overrides the torch requirement (default `torch==2.13.0`; e.g. set it to a CPU or CUDA wheel
index spec such as "torch --index-url https://download.pytorch.org/whl/cpu").
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("ZIMAGE_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
TORCH = os.environ.get("ZIMAGE_TORCH", "torch==2.13.0")


def run(*cmd: str, **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def ensure_env() -> None:
    stamp = VENV / ".zimage-installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == want and PY.exists():
        return
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    # torch first and pinned, so the project's own `torch>=` requirement is already met and pip does not reach
    # for a newer multi-GB build.
    run(*pip, *TORCH.split())
    run(*pip, "-e", f"{ROOT}[test]")
    stamp.write_text(want)


# pytest-xdist workers for `test`: most of the suite waits on subprocesses, Ray and HTTP rather than computing, so
# two workers take about two thirds of one's time on CI's two cores (pass -n to choose, -p no:xdist for none).
TEST_WORKERS = 2


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "shell-env"):
        print(__doc__)
        return 2
    ensure_env()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        return subprocess.call([str(BIN / "zimage-orch"), "demo", *rest], env=env, cwd=ROOT)
    if cmd == "test":
        args = rest or ["-q"]
        if not any(a.startswith(("-n", "--numprocesses", "--dist")) or a == "no:xdist" for a in args):
            args = ["-n", str(TEST_WORKERS), *args]
        return subprocess.call([str(PY), "-m", "pytest", *args], env=env, cwd=ROOT)
    print(f"source {BIN / 'activate'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
