"""ControlNet on packed batches (actors/controlnet.py) against diffusers' ZImageControlNetModel + transformer, and
the engine against ZImageControlNetPipeline."""

import pytest
import torch

from actors.controlnet import PackedControl, build_controlnet, controlled_forward
from actors.models import build_components
from actors.packed import PackedTransformer


@pytest.fixture(scope="module")
def components():
    return build_components("tiny", seed=9)


@pytest.mark.parametrize("variant", [None, "control_layers", "control_noise_refiner"])
def test_packed_controlled_forward_equals_diffusers(components, variant):
    tr = components["transformer"]
    extra = {} if variant is None else {"add_control_noise_refiner": variant, "control_refiner_layers_places": [0]}
    cn = build_controlnet("tiny", tr, seed=3, **extra)
    packed = PackedTransformer(tr)
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 8, 8), (1, 6, 10), (1, 8, 8)]
    lat = [torch.randn(16, *s, generator=g) for s in shapes]
    ctl = [torch.randn(16, *s, generator=g) for s in shapes]
    caps = [torch.randn(n, 32, generator=g) for n in (7, 40, 19)]
    t = torch.tensor([0.3, 0.7, 0.5])
    scale = torch.tensor([0.75, 1.2, 0.0])  # the last sample has no control
    layout = packed.layout(shapes, [len(c) for c in caps])
    ours = controlled_forward(packed, lat, t, caps, layout, PackedControl(cn, ctl, scale))
    with torch.no_grad():
        for i in range(3):
            hints = cn([lat[i]], t[i:i + 1], [caps[i]], [ctl[i]], conditioning_scale=float(scale[i]))
            ref = tr([lat[i]], t[i:i + 1], [caps[i]], controlnet_block_samples=hints, return_dict=False)[0][0]
            assert (ours[i] - ref).abs().max() < 1e-4, i
        plain = tr([lat[2]], t[2:3], [caps[2]], return_dict=False)[0][0]
        assert (ours[2] - plain).abs().max() < 1e-4  # scale 0: exactly a plain sample
        assert (ours[0] - tr([lat[0]], t[:1], [caps[0]], return_dict=False)[0][0]).abs().max() > 1e-3  # hints matter


def _picture(h, w, seed=0):
    import numpy as np

    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    return np.clip(np.stack([x * 3, y * 4, (x * y) % 255], -1) + rng.integers(0, 40, (h, w, 3)), 0,
                   255).astype(np.uint8)


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_engine_equals_zimage_controlnet_pipeline(components, guidance):
    """Output for output against diffusers' ZImageControlNetPipeline (CPU, fp32, within one 8-bit level); a
    controlled sample in a packed batch with plain ones equals its solo run."""
    import numpy as np
    from diffusers import ZImageControlNetPipeline
    from PIL import Image

    from actors.engine import Sample, ZImageEngine

    cn = build_controlnet("tiny", components["transformer"], seed=4)
    eng = ZImageEngine({**components, "controlnet": cn}, dict.fromkeys(("transformer", "text_encoder", "vae"), "cpu"),
                       torch.float32)
    control = _picture(64, 96)
    s = Sample("a house by a lake", 5, 96, 64, guidance, "blurry" if guidance else None, control_image=control,
               control_scale=0.8)
    ours = eng.generate([s], 3)[0][0]
    pipe = ZImageControlNetPipeline(**components, controlnet=cn)
    ref = pipe(s.prompt, control_image=Image.fromarray(control), height=64, width=96, num_inference_steps=3,
               guidance_scale=guidance, negative_prompt="blurry" if guidance else None,
               controlnet_conditioning_scale=0.8, generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    ref = (ref * 255).round().clip(0, 255).astype(np.uint8)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    batch = eng.generate([Sample("a cat", 1, 64, 64), s, Sample("x", 2, 96, 64, image=_picture(64, 96, 1),
                                                               strength=0.6, num_inference_steps=5)], 3)[0]
    assert np.abs(batch[1].astype(int) - ours.astype(int)).max() <= 1
    plain = ZImageEngine(components, dict.fromkeys(("transformer", "text_encoder", "vae"), "cpu"), torch.float32)
    assert np.abs(batch[0].astype(int) - plain.generate([Sample("a cat", 1, 64, 64)], 3)[0][0].astype(int)).max() <= 1
    assert np.abs(ours.astype(int) - plain.generate([Sample(s.prompt, 5, 96, 64, guidance, s.negative_prompt)],
                                                     3)[0][0].astype(int)).mean() > 0.5  # the control matters
