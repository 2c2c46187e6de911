"""The README's main job, end to end in a subprocess: local Ray, two replicas, batches, PNGs, summary.json."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "demo", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 16 and summary["failed"] == 0
    assert summary["replicas_used"] == ["r0", "r1"]
    assert max(summary["batch_sizes"]) > 1
    assert summary["throughput_img_s"] > 0 and summary["latency_p50_s"] > 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 16 and Image.open(pngs[0]).size == (128, 128)
