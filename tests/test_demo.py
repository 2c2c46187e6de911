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


@pytest.mark.slow
@pytest.mark.ray
def test_generate_edits_an_image_with_a_mask(tmp_path, ray_cluster):
    """``zimage-orch generate --image --mask``: inpainting from the command line, at the image's own size (the
    command's entry point in this process, on the session's Ray, as tests/test_ray_integration.py runs it; the demo
    above is the command run in a process and a local Ray of its own)."""
    import numpy as np

    from orchestrator.cli import main

    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), np.uint8)).save(image)
    alpha = np.full((80, 96, 4), 255, np.uint8)
    alpha[20:60, 20:70, 3] = 0
    Image.fromarray(alpha).save(mask)
    out = tmp_path / "edit"
    assert main(["generate", "--prompt", "a red door", "--image", str(image), "--mask", str(mask), "--strength",
                 "0.75", "--n", "2", "--seed", "3", "--out", str(out), "--set", "deployment.replicas=1"]) == 0
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["000-seed3.png", "001-seed4.png"]
    assert {Image.open(p).size for p in pngs} == {(96, 80)}


def test_generate_refuses_unreadable_inputs_before_starting(tmp_path, monkeypatch, capsys):
    """A wrong path or a file that is no image fails at once, naming the option, before any deployment starts
    (minutes of model loading on a GPU)."""
    from orchestrator import cli, deployment

    async def never(*a, **k):
        raise AssertionError("the deployment started")

    monkeypatch.setattr(deployment.Deployment, "start", never)
    text, good = tmp_path / "notes.png", tmp_path / "good.png"
    text.write_text("not an image")
    Image.new("RGB", (64, 64)).save(good)
    for args, want in ((["--image", str(tmp_path / "missing.png")], "--image: cannot read"),
                       (["--image", str(text)], "--image is not an image"),
                       (["--image", str(text), "--image", str(tmp_path / "gone.png")], "gone.png"),
                       (["--image", str(good), "--mask", str(tmp_path / "missing.png")], "--mask: cannot read"),
                       (["--control-image", str(tmp_path / "missing.png")], "--control-image: cannot read")):
        assert cli.main(["generate", "--prompt", "x", "--out", str(tmp_path / "out"), *args]) == 2
        assert want in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_generate_with_a_control_image(tmp_path, ray_cluster):
    """``zimage-orch generate --control-image`` with the tiny ControlNet (in this process, on the session's Ray)."""
    import numpy as np

    from orchestrator.cli import main

    control = tmp_path / "edges.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(control)
    out = tmp_path / "cn"
    assert main(["generate", "--prompt", "a house", "--control-image", str(control), "--control-scale", "0.9",
                 "--size", "64x64", "--seed", "1", "--out", str(out), "--set", "deployment.replicas=1",
                 "--set", "model.controlnet.source=tiny"]) == 0
    assert [Image.open(p).size for p in sorted(out.glob("*.png"))] == [(64, 64)]
