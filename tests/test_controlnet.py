"""ControlNet on packed batches (actors/controlnet.py) against diffusers' ZImageControlNetModel + transformer, and
the engine against ZImageControlNetPipeline."""

import pytest
import torch

from actors.controlnet import PackedControl, build_controlnet, controlled_forward
from actors.models import build_components
from actors.packed import PackedTransformer
from actors.steploop import generate


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
    ours = generate(eng, [s], 3)[0][0]
    pipe = ZImageControlNetPipeline(**components, controlnet=cn)
    ref = pipe(s.prompt, control_image=Image.fromarray(control), height=64, width=96, num_inference_steps=3,
               guidance_scale=guidance, negative_prompt="blurry" if guidance else None,
               controlnet_conditioning_scale=0.8, generator=torch.Generator().manual_seed(5),
               output_type="np").images[0]
    ref = (ref * 255).round().clip(0, 255).astype(np.uint8)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    batch = generate(eng, [Sample("a cat", 1, 64, 64), s, Sample("x", 2, 96, 64, image=_picture(64, 96, 1),
                                                               strength=0.6, num_inference_steps=5)], 3)[0]
    assert np.abs(batch[1].astype(int) - ours.astype(int)).max() <= 1
    plain = ZImageEngine(components, dict.fromkeys(("transformer", "text_encoder", "vae"), "cpu"), torch.float32)
    assert np.abs(batch[0].astype(int) - generate(plain, [Sample("a cat", 1, 64, 64)], 3)[0][0].astype(int)).max() <= 1
    assert np.abs(ours.astype(int) - generate(plain, [Sample(s.prompt, 5, 96, 64, guidance, s.negative_prompt)],
                                                     3)[0][0].astype(int)).mean() > 0.5  # the control matters


def test_control_fields_are_checked():
    import base64
    import io

    import numpy as np
    from PIL import Image

    from orchestrator.images_api import parse_generation
    from zimage_common.config import config_from_dict
    from zimage_common.errors import InvalidRequestError

    buf = io.BytesIO()
    Image.fromarray(_picture(40, 70)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    base = {"model": {"source": "tiny"}, "defaults": {"width": 64, "height": 48}}
    with_cn = config_from_dict({**base, "model": {"source": "tiny", "controlnet": {"source": "tiny"}}})
    call = parse_generation({"prompt": "x", "control_image": url, "n": 2}, with_cn)
    assert [r.control_image.shape for r in call.requests] == [(48, 64, 3)] * 2  # resized to the output size
    assert [r.control_scale for r in call.requests] == [0.75, 0.75]
    assert call.requests[0].key == parse_generation({"prompt": "x"}, with_cn).requests[0].key  # batches with plain
    for cfg, body, param, fragment in (
        (config_from_dict(base), {"prompt": "x", "control_image": url}, "control_image", "no ControlNet"),
        (with_cn, {"prompt": "x", "control_image": "@@"}, "control_image", "base64"),
        (with_cn, {"prompt": "x", "control_image": "data:image/png;base64,aGVsbG8="}, "control_image",
         "not an image"),
        (with_cn, {"prompt": "x", "controlnet_conditioning_scale": 1.0}, "control_image", "needs a control_image"),
        (with_cn, {"prompt": "x", "control_image": url, "controlnet_conditioning_scale": 9},
         "controlnet_conditioning_scale", "from 0 to 4"),
    ):
        with pytest.raises(InvalidRequestError) as e:
            parse_generation(body, cfg)
        assert e.value.param == param and fragment in e.value.message, e.value.message
    assert np.asarray(call.requests[0].control_image).dtype == np.uint8


def test_planner_counts_the_controlnet_beside_the_transformer():
    from placement.memory import CONTROLNET_PARAMS, model_spec

    plain, with_cn = model_spec("modelscope"), model_spec("modelscope", controlnet=True)
    t0, t1 = plain.components["transformer"], with_cn.components["transformer"]
    assert t1.params - t0.params == CONTROLNET_PARAMS["full"] and t1.act_gib_per_token > t0.act_gib_per_token
    assert with_cn.components["vae"] == plain.components["vae"]


@pytest.mark.ray
@pytest.mark.slow
def test_controlnet_over_http_and_batched_with_plain(ray_cluster, tiny_cache):
    """A deployment with a tiny ControlNet: generations and edits with a control image through HTTP (the official
    client for generations), the same image per seed, and a controlled request sharing a packed batch with plain
    ones through the Python API, equal to its solo run."""
    import asyncio
    import base64
    import io

    import httpx
    from conftest import ServerThread, tiny_config
    from openai import OpenAI
    from PIL import Image

    from orchestrator.server import create_app

    cfg = tiny_config(tiny_cache, model={"controlnet": {"source": "tiny"}}, deployment={"replicas": 1},
                      router={"max_batch_size": 4, "max_wait_ms": 300})
    buf = io.BytesIO()
    Image.fromarray(_picture(64, 64)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with ServerThread(create_app(cfg)) as server:
        server.wait_ready()
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

        def gen(**extra):
            return client.images.generate(prompt="a house", extra_body={"seed": 3, **extra}).data[0].b64_json

        a, b, plain = gen(control_image=url), gen(control_image=url), gen()
        assert a == b and a != plain
        assert gen(control_image=url, controlnet_conditioning_scale=0.0) == plain  # scale 0: no effect
        r = httpx.post(f"{server.url}/v1/images/edits", timeout=60,
                       files={"image": ("in.png", buf.getvalue(), "image/png"),
                              "control_image": ("c.png", buf.getvalue(), "image/png")},
                       data={"prompt": "a house", "seed": "3", "strength": "0.8", "num_inference_steps": "4"})
        assert r.status_code == 200, r.text
        dep = server.service.deployment
        loop = dep.router._task.get_loop()

        async def together():
            reqs = (dep.requests_for("a house", seed=3, control_image=_picture(64, 64))
                    + dep.requests_for("a cat", seed=1) + dep.requests_for("a dog", seed=2))
            return await asyncio.gather(*dep.admit(reqs))

        results = asyncio.run_coroutine_threadsafe(together(), loop).result(60)
        assert all(x.ok for x in results) and {x.batch_id for x in results} == {results[0].batch_id}
        import numpy as np

        solo = np.asarray(Image.open(io.BytesIO(base64.b64decode(a))))  # within one 8-bit level (fp32 sum order)
        assert np.abs(results[0].image.astype(int) - solo.astype(int)).max() <= 1

        from orchestrator.benchmark.loadgen import RequestMaker, http_sender

        async def bench_http():  # `zimage-orch bench --http` sends control requests as generations
            async with httpx.AsyncClient(timeout=60) as h:
                send = http_sender(h, server.url, None)
                maker = RequestMaker.for_workload("control-mix", None, [(64, 64)], 2)
                return [await send(maker.params()) for _ in range(2)]

        assert all(x.ok for x in asyncio.run(bench_http()))


def test_load_controlnet_from_a_local_directory(components, tmp_path):
    from actors.loading import load_controlnet
    from zimage_common.config import config_from_dict

    cn = build_controlnet("tiny", components["transformer"], seed=6)
    cn.save_pretrained(str(tmp_path / "cn"))
    cfg = config_from_dict({"model": {"source": "tiny", "controlnet": {"source": "local",
                                                                       "local_path": str(tmp_path / "cn")}}})
    loaded = load_controlnet(cfg.model, components["transformer"], "cpu", torch.float32)
    own = cn.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, own[k]), k
    assert loaded.noise_refiner is components["transformer"].noise_refiner  # shared, not a copy


def test_plan_for_a_config_with_a_controlnet():
    """The deployment's plan counts the ControlNet beside the transformer: the same GPU, 1.55 B more parameters in
    bf16 (about 2.9 GiB) in its estimated peak."""
    from orchestrator.deployment import plan_for
    from placement import GPU, Inventory
    from zimage_common.config import config_from_dict

    inventory = Inventory((GPU("n", 0, 80.0),))
    base = {"deployment": {"mode": "replicate", "replicas": 1}}
    plain = plan_for(config_from_dict({**base, "model": {"source": "random-full"}}), inventory)
    with_cn = plan_for(config_from_dict({**base, "model": {"source": "random-full",
                                                           "controlnet": {"source": "random-full"}}}), inventory)
    assert "ControlNet" in with_cn.model and with_cn.gpus[0].components == plain.gpus[0].components
    extra = with_cn.gpus[0].estimated_peak_gib - plain.gpus[0].estimated_peak_gib
    assert extra >= 1_550_778_368 * 2 / 2**30 - 0.01, extra


def test_controlled_forward_applies_per_request_lora(components):
    """``controlled_forward`` passes ``layout.lora`` through as ``PackedTransformer.__call__`` does: at control scale
    0 it equals the plain packed call with the same adapters (one sample with an adapter, one without), and the
    adapter changes its sample."""
    from actors.lora import LoraStore, build_adapter, factors_from_state_dict, random_lora_state_dict

    tr = components["transformer"]
    cn = build_controlnet("tiny", tr, seed=3, add_control_noise_refiner="control_noise_refiner",
                          control_refiner_layers_places=[0])
    store = LoraStore(tr, max_resident=2)
    sd, meta = random_lora_state_dict(tr, 4, seed=1, std=0.15)
    store.add_adapter(build_adapter("a", factors_from_state_dict(sd, meta, torch.float32), tr))
    packed = PackedTransformer(tr)
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 8, 8), (1, 6, 10)]
    lat = [torch.randn(16, *s, generator=g) for s in shapes]
    ctl = [torch.randn(16, *s, generator=g) for s in shapes]
    caps = [torch.randn(n, 32, generator=g) for n in (7, 19)]
    t = torch.tensor([0.3, 0.7])

    def layout(loras):
        out = packed.layout(shapes, [len(c) for c in caps])
        out.lora = store.batch(loras)
        return out

    with torch.no_grad():
        ours = controlled_forward(packed, lat, t, caps, layout([[("a", 1.0)], []]),
                                  PackedControl(cn, ctl, torch.zeros(2)))
        ref = packed(lat, t, caps, layout([[("a", 1.0)], []]))
        bare = packed(lat, t, caps, layout([[], []]))
    for i in range(2):
        assert (ours[i] - ref[i]).abs().max() < 1e-5, i
    assert (ours[0] - bare[0]).abs().max() > 1e-3 and (ours[1] - bare[1]).abs().max() < 1e-5
