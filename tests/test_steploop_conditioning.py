"""The step loop (actors/steploop.py) with image conditioning: img2img, inpainting and ControlNet requests (and
ControlNet with a per-request LoRA) join a loop that is already running and give the image of their solo run.
Toy-size real pipeline on the CPU, fp32; no wall-clock assertions."""

import time
from dataclasses import replace

import numpy as np
import pytest

from actors.worker import PipelineWorker, WarmupSpec
from tests.test_steploop import Streamed, same_image
from zimage_common.config import ModelConfig
from zimage_common.messages import Batch, ImageRequest


def _picture(h, w, seed=0):
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    return np.clip(np.stack([x * 5, y * 6, (x * y) % 255], -1) + rng.integers(0, 40, (h, w, 3)), 0,
                   255).astype(np.uint8)


@pytest.fixture(scope="module")
def worker(tiny_cache, tmp_path_factory):
    """A replica with a tiny ControlNet and one LoRA adapter; its loop steps take at least 20 ms, so a long request
    is still running while the others join."""
    from actors.lora import random_lora_state_dict, save_diffusers_lora
    from actors.models import build_pipeline

    sd, meta = random_lora_state_dict(build_pipeline("tiny").transformer, 4, std=0.1)
    path = save_diffusers_lora(tmp_path_factory.mktemp("lora") / "a", sd, meta)
    cfg = ModelConfig(source="tiny", dtype="float32", cache_dir=tiny_cache, controlnet={"source": "tiny"},
                      lora_max_resident=2, loras=[{"name": "a", "path": str(path)}])
    w = PipelineWorker("rc", cfg, warmup=WarmupSpec(((32, 32),), 1), torch_threads=1)
    w.start()
    w._step_loop().fault = lambda names: time.sleep(0.02)
    return w


def _joined_and_solo(w, batches):
    """Each batch of ``batches`` as a call while a 30-step request runs in the loop, then the same requests one by
    one, each alone in the loop. Returns {request_id: (joined image, solo image)}."""
    long = ImageRequest("long", "a slow detailed landscape", 1, 32, 32, 30, 0.0)
    run = Streamed(w, Batch(100, (long,)))
    run.wait_steps(2)
    joined = {}
    for k, requests in enumerate(batches):
        out = w.run_batch(Batch(101 + k, tuple(requests)))
        assert all(r.ok for r in out.results), [r.error for r in out.results]
        joined.update({r.request_id: r.image for r in out.results})
    assert run.result is None  # they joined and left while the long one was still denoising
    assert run.join().results[0].ok
    solo = {}
    for k, r in enumerate(r for requests in batches for r in requests):
        (res,) = w.run_batch(Batch(200 + k, (r,))).results
        assert res.ok, res.error
        solo[r.request_id] = res.image
    return {i: (joined[i], solo[i]) for i in joined}


def test_edits_join_a_running_loop_and_equal_their_solo_run(worker):
    """img2img (a start step from strength, the noised image as its starting point) and inpainting (the blend after
    each step, with guidance): each joined image equals its solo image, and the edit took effect (it differs from
    the same request without its image)."""
    image = _picture(48, 32, 1)
    mask = np.zeros((48, 32), np.uint8)
    mask[8:32, 8:24] = 255
    img2img = ImageRequest("i2i", "a watercolour", 3, 32, 48, 6, 0.0, image=image, strength=0.5)  # runs 3 of 6
    plain3 = ImageRequest("t2i", "a quick sketch", 4, 32, 32, 3, 0.0)  # shares the call: 3 steps too
    inpaint = ImageRequest("inp", "a red door", 5, 32, 48, 5, 2.0, "blurry", image=image, mask=mask,
                           strength=0.8)  # runs 4 of 5
    assert img2img.key == plain3.key and inpaint.steps_run == 4
    images = _joined_and_solo(worker, [[img2img, plain3], [inpaint]])
    for rid, (joined, solo) in images.items():
        assert same_image(joined, solo), rid
    for r in (img2img, inpaint):
        (bare,) = worker.run_batch(Batch(300, (replace(r, image=None, mask=None, num_inference_steps=r.steps_run),)
                                         )).results
        assert not same_image(images[r.request_id][0], bare.image), r.request_id
    (unmasked,) = worker.run_batch(Batch(301, (replace(inpaint, mask=None),))).results
    assert not same_image(images["inp"][0], unmasked.image)  # the mask's blend took effect


def test_controlnet_and_lora_join_a_running_loop_and_equal_their_solo_run(worker):
    """ControlNet (hints per sample, zero hints at scale 0 for the others in the running set), alone, with a LoRA
    adapter, and with an img2img edit: each joined image equals its solo image; the control image and the adapter
    both change the image."""
    control = _picture(32, 32, 2)
    ctl = ImageRequest("ctl", "a house", 6, 32, 32, 3, 0.0, control_image=control, control_scale=0.9)
    ctl_lora = replace(ctl, request_id="ctl-lora", loras=(("a", 0.8),))
    ctl_edit = ImageRequest("ctl-edit", "a boat", 7, 32, 32, 6, 1.5, "blurry", image=_picture(32, 32, 3),
                            strength=0.5, control_image=control, control_scale=0.6)
    images = _joined_and_solo(worker, [[ctl, ctl_lora, ctl_edit]])
    for rid, (joined, solo) in images.items():
        assert same_image(joined, solo), rid
    (bare,) = worker.run_batch(Batch(400, (replace(ctl, control_image=None),))).results
    assert not same_image(images["ctl"][0], bare.image)
    assert not same_image(images["ctl"][0], images["ctl-lora"][0])
