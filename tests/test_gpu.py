"""GPU tests: skipped where there is no CUDA. A short benchmark of the full-size random-weight model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]


def test_full_size_engine_bf16_on_gpu():
    from actors.engine import ZImageEngine
    from actors.models import build_components

    comps = build_components("full", device="cuda", dtype=torch.bfloat16)
    eng = ZImageEngine(comps, dict.fromkeys(("transformer", "text_encoder", "vae"), "cuda"), torch.bfloat16)
    images, times = eng.generate(["a red fox"], [1], 512, 512, 2)
    assert images.shape == (1, 512, 512, 3) and times.denoise_s > 0


def test_short_benchmark_on_gpu(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "orchestrator.cli", "bench", "benchmarks/configs/gpu-random.yaml",
           "--set", "deployment.replicas=1", "--sizes", "512x512", "--concurrency", "1,2", "--requests", "4",
           "--warmup", "1", "--baseline", "--baseline-requests", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["card"] != "cpu" and report["baseline"]["sizes"]["512x512"]["throughput_img_s"] > 0
    assert all(r["failed"] == 0 and r["throughput_img_s"] > 0 for r in report["runs"])
    assert (out / "bench.png").stat().st_size > 0
