"""A replica's start writes no progress bars (diffusers', transformers', huggingface_hub's or tqdm's) and logs its
load once, with the time it took: in a fresh process as Ray runs it, and in a real Ray actor's log file."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BAR = re.compile(r"\d+%\||it/s\]|s/it\]|\r")  # tqdm's "45%|####  | 9/20 [00:01<00:01, 8.1it/s]", redrawn with \r

LOAD_ONLY = """
import sys, torch
from actors.loading import load_components
from zimage_common.config import ModelConfig
load_components(ModelConfig(source="tiny", dtype="float32", cache_dir=sys.argv[1]), torch.float32,
                dict.fromkeys(("text_encoder", "transformer", "vae"), "cpu"))
"""

WORKER_START = """
import sys
from actors.worker import PipelineWorker, WarmupSpec
from zimage_common.config import ModelConfig
w = PipelineWorker("r7", ModelConfig(source="tiny", dtype="float32", cache_dir=sys.argv[1]),
                   warmup=WarmupSpec(((32, 32),), 1), torch_threads=1)
assert w.start().ready
"""


TQDM_FIRST = """
import sys, tqdm  # a Ray worker has imported tqdm before the replica's constructor runs
from actors.worker import PipelineWorker
from zimage_common.config import ModelConfig
from zimage_common.logging_setup import replica_env
PipelineWorker("r7", ModelConfig(source="tiny", dtype="float32", cache_dir=sys.argv[1]), env=replica_env("text"))
for _ in tqdm.tqdm(range(3)):  # ModelScope's download bars are plain tqdm bars
    pass
from tqdm.auto import tqdm as auto_tqdm
for _ in auto_tqdm(range(3)):
    pass
print("replica log env:", __import__("os").environ["ZIMAGE_REPLICA_LOG"])
"""


def _run(code: str, cache: Path, **env) -> str:
    full_env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    full_env.update(PYTHONPATH=str(ROOT), **env)
    out = subprocess.run([sys.executable, "-c", code, str(cache)], env=full_env, capture_output=True, text=True,
                         timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def test_plain_loading_draws_progress_bars(tmp_path):
    """The control: building and loading the model the plain way does draw bars, so the test below can see them."""
    text = _run(LOAD_ONLY, tmp_path / "cache")
    assert BAR.search(text) and "Loading" in text, text[-2000:]


def test_replica_start_writes_no_progress_bar_and_logs_its_load_once(tmp_path):
    # A fresh cache: the replica builds the model (save_pretrained's bars) and then loads it (from_pretrained's).
    # ZIMAGE_REPLICA_LOG is what ray_backend puts in a replica actor's environment.
    text = _run(WORKER_START, tmp_path / "cache", ZIMAGE_REPLICA_LOG="text")
    assert not BAR.search(text), text[-2000:]
    loads = re.findall(r"\[replica=r7\]: replica r7: model from tiny \(built .*\) in \d+\.\ds", text)
    assert len(loads) == 1, text
    assert len(re.findall(r"\[replica=r7\]: replica r7: warmed up in \d+\.\ds", text)) == 1, text


def test_replica_env_quiets_tqdm_imported_before_it(tmp_path):
    """The replica's environment (log format, no bars) is set by its constructor, so Ray may run it in a worker it
    started ahead, which has imported tqdm already: tqdm's bars stay off all the same."""
    text = _run(TQDM_FIRST, tmp_path / "cache")
    assert "replica log env: text" in text, text[-2000:]
    assert not BAR.search(text), text[-2000:]


@pytest.mark.ray
def test_ray_replica_log_has_no_progress_bar(ray_cluster, tiny_cache):
    import asyncio

    import ray
    from conftest import tiny_config

    from orchestrator.deployment import Deployment

    async def start_and_stop():
        dep = await Deployment.start(tiny_config(tiny_cache, deployment={"replicas": 1}))
        try:
            (replica,) = dep.replicas.values()
            return await replica.call("pid")
        finally:
            await dep.shutdown()

    pid = asyncio.run(start_and_stop())
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    files = sorted(logs.glob(f"worker-*-{pid}.err")) + sorted(logs.glob(f"worker-*-{pid}.out"))
    assert files, f"no log files for pid {pid} in {logs}"
    deadline = time.time() + 20
    while True:
        text = "".join(f.read_text(errors="replace") for f in files)
        if "warmed up" in text or time.time() > deadline:
            break
        time.sleep(0.2)
    assert not BAR.search(text), text[-2000:]
    assert len(re.findall(r"replica r0: model from tiny .* in \d+\.\ds", text)) == 1, text
    assert len(re.findall(r"replica r0: warmed up in \d+\.\ds", text)) == 1, text
