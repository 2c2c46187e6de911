"""The container image definition: hadolint on the Dockerfile, shellcheck on the KubeRay node script, the project's own
rules for the image (entrypoint, user, health check, cache volume, build context), and the head script run for real
against a Ray head on this machine (the image itself cannot be built here: no container engine runs on these
machines)."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
HEAD_SCRIPT = ROOT / "docker" / "zimage-ray-node"


def _tool(name: str) -> str:
    """A linter installed with the test extras (a PyPI wheel that ships the binary next to the interpreter)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; it comes with `pip install -e .[test]`")
        pytest.skip(f"{name} is not installed (pip install -e .[test])")
    return found


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in DOCKERFILE.read_text().splitlines()
                                         if not ln.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def test_hadolint_passes():
    out = subprocess.run([_tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    """The linter run above is a real check: the usual mistakes fail it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install python3\nUSER root\n")
    out = subprocess.run([_tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3006" in out.stdout and "DL3002" in out.stdout, out.stdout


def test_shellcheck_passes_on_the_head_script():
    out = subprocess.run([_tool("shellcheck"), str(HEAD_SCRIPT)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert os.access(HEAD_SCRIPT, os.X_OK)


def test_image_rules():
    ins = _instructions()
    last_stage = ins[max(i for i, (k, _) in enumerate(ins) if k == "FROM"):]
    get = lambda kind: [a for k, a in last_stage if k == kind]  # noqa: E731
    # `zimage-orch serve` bound to 0.0.0.0 inside the container, port 8000, which the health check probes.
    assert get("ENTRYPOINT") == ['["zimage-orch", "serve", "--host", "0.0.0.0", "--port", "8000"]']
    assert get("EXPOSE") == ["8000"]
    (health,) = get("HEALTHCHECK")
    assert "http://127.0.0.1:8000/healthz" in health
    # A numeric non-root user (Kubernetes can only verify runAsNonRoot for a numeric one).
    (user,) = get("USER")
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user) and not user.startswith("0")
    # Every model cache on the /models volume.
    assert get("VOLUME") == ['["/models"]']
    env = " ".join(get("ENV"))
    for var in ("ZIMAGE_CACHE", "HF_HOME", "MODELSCOPE_CACHE"):
        assert re.search(rf"\b{var}=/models/", env), var
    # The torch pin is the one tasks.py installs, and the default base image is CUDA 13 (the torch wheel's CUDA).
    tasks_torch = re.search(r'ZIMAGE_TORCH", "([^"]+)"', (ROOT / "tasks.py").read_text()).group(1)
    assert f"ARG TORCH_SPEC={tasks_torch}" in DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:13\.0\.\d+-base-ubuntu24\.04$", DOCKERFILE.read_text(), re.M)


def test_build_context_holds_what_the_dockerfile_copies():
    """Every COPY source exists and is not excluded by .dockerignore (an allow-list)."""
    allowed = [ln[1:].rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.startswith("!")]
    for kind, args in _instructions():
        if kind != "COPY" or args.startswith("--from"):
            continue
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for src in sources:
            assert (ROOT / src).exists(), src
            assert any(src == a or src.startswith(a + "/") for a in allowed), f"{src} is excluded by .dockerignore"
    # And the packages pyproject.toml installs are all copied.
    packages = re.search(r"packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text()).group(1)
    copied = {a.split()[0] for k, a in _instructions() if k == "COPY"}
    for pkg in re.findall(r'"(\w+)"', packages):
        assert pkg in copied, pkg


# ---- the KubeRay head command, for real: a Ray head on this machine plus the server, then SIGTERM -----------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_env(tmp_path, tiny_cache):
    """What KubeRay gives the head container: KUBERAY_GEN_RAY_START_CMD, RAY_ADDRESS (127.0.0.1:<gcs port>), and with
    authOptions.mode=token, RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (from the Secret it creates)."""
    import secrets

    gcs, api = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="zr", dir="/tmp")  # short: Ray's socket paths live under it
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "zimage-orch"  # this checkout's CLI, whatever the virtual environment's script points at
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m orchestrator.cli "$@"\n')
    shim.chmod(0o755)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "cluster: {address: auto, gpu_memory_gib: 24, wait_for_gpus: 1, wait_timeout_s: 120}\n"
        f"model: {{source: tiny, dtype: float32, cache_dir: {tiny_cache}}}\n"
        "deployment: {mode: replicate, replicas: 1, cpu_per_replica: 0, torch_threads: 1}\n"
        "defaults: {width: 64, height: 64, num_inference_steps: 2}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{bindir}:{Path(sys.executable).parent}:{env.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
        RAY_ADDRESS=f"127.0.0.1:{gcs}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="5",  # the head drains on SIGTERM (30 s by default)
        ZIMAGE_PORT=str(api),
        KUBERAY_GEN_RAY_START_CMD=(f"ray start --head --port={gcs} --num-cpus=2 --num-gpus=1 --temp-dir={temp} "
                                   "--include-dashboard=false --disable-usage-stats --block"),
    )
    yield env, cfg, f"http://127.0.0.1:{api}"
    shutil.rmtree(temp, ignore_errors=True)


def _wait_ready(url: str, proc, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"zimage-ray-node exited early ({proc.returncode})"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("not ready in time")


@pytest.mark.ray
@pytest.mark.slow
def test_head_script_serves_then_stops_on_sigterm(head_env):
    env, cfg, url = head_env
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([str(HEAD_SCRIPT), str(cfg), "--set", "server.drain_timeout_s=20"], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(url, proc)
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a fox", "seed": 1}, timeout=60,
                       headers={"X-Request-ID": "head-script-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "head-script-1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        output = log.read().decode(errors="replace")
    # Both the server and the Ray head it started are gone: nothing listens on the GCS port any more.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(env["RAY_ADDRESS"].rsplit(":", 1)[1]))) != 0, output[-3000:]
    assert "waiting for GPUs" in output or "placing 1 replica" in output, output[-3000:]


def _children(pid: int) -> list[tuple[int, str]]:
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append((int(d.name), (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except (OSError, ValueError, IndexError):
            pass
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_head_script_exits_when_the_server_dies(head_env):
    """A head whose server died is not a working head: the script stops Ray and exits non-zero (the container
    restarts)."""
    env, cfg, url = head_env
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([str(HEAD_SCRIPT), str(cfg)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_ready(url, proc)
        (serve_pid,) = [p for p, cmd in _children(proc.pid) if "orchestrator.cli serve" in cmd]
        os.kill(serve_pid, signal.SIGKILL)
        assert proc.wait(timeout=90) != 0
        log.seek(0)
        assert b"the server exited" in log.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(env["RAY_ADDRESS"].rsplit(":", 1)[1]))) != 0


def test_head_script_refuses_to_run_outside_kuberay():
    env = {k: v for k, v in os.environ.items() if k != "KUBERAY_GEN_RAY_START_CMD"}
    out = subprocess.run([str(HEAD_SCRIPT), "x.yaml"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "KUBERAY_GEN_RAY_START_CMD" in out.stderr
