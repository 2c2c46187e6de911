"""POST /v1/images/edits on loopback with the tiny model, through the official openai client's ``images.edit``:
img2img, inpainting with a mask, several images, streaming, bad files, determinism per seed, edits batched with
generations."""

import asyncio
import base64
import io
import re

import httpx
import numpy as np
import pytest
from conftest import ServerThread, tiny_config
from openai_spec import check, check_stream
from PIL import Image

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_cache):
    from orchestrator.server import create_app

    cfg = tiny_config(
        tiny_cache,
        deployment={"replicas": 1},
        router={"max_batch_size": 4, "max_wait_ms": 300, "queue_limit": 16, "request_timeout_s": 60},
        defaults={"width": 64, "height": 64, "num_inference_steps": 4},
        limits={"max_n": 4, "max_pixels": 128 * 128, "max_steps": 10, "max_image_bytes": 100_000},
    )
    app = create_app(cfg)
    with ServerThread(app) as s:
        s.wait_ready()
        s.loop = s.service.deployment.router._task.get_loop()
        yield s


def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def picture(w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 4, y * 5, (x + y) * 2], -1)
    return np.clip(base + rng.integers(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


def mask(w=64, h=48):
    a = np.full((h, w, 4), 255, np.uint8)
    a[8:40, 16:48, 3] = 0  # transparent: repaint
    return png(a)


def decode(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_img2img_with_the_official_client(server):
    resp = client(server).images.edit(image=("in.png", png(picture()), "image/png"), prompt="a watercolour fox",
                                      n=2, extra_body={"seed": 3, "strength": 0.5, "num_inference_steps": 6})
    check("ImagesResponse", resp.model_dump(exclude_none=True))
    assert len(resp.data) == 2 and [d.model_extra["seed"] for d in resp.data] == [3, 4]
    for d in resp.data:
        img = decode(d.b64_json)
        assert img.format == "PNG" and img.size == (64, 48)  # size auto: the image's own
    assert resp.data[0].b64_json != resp.data[1].b64_json
    assert resp.usage.input_tokens_details.image_tokens == 4 * 3  # the input image's tokens
    metrics = httpx.get(f"{server.url}/metrics").text
    assert re.search(r'^zimage_stage_seconds_count\{[^}]*stage="image_encode"', metrics, re.M)


def test_same_seed_same_image_and_strength_changes_it(server):
    def edit(**extra):
        r = client(server).images.edit(image=("in.png", png(picture()), "image/png"), prompt="a fox", size="64x64",
                                       extra_body={"seed": 9, "num_inference_steps": 6, **extra})
        return r.data[0].b64_json

    a, b = edit(strength=0.5), edit(strength=0.5)
    assert a == b and decode(a).size == (64, 64)  # size given: resized to it
    assert edit(strength=0.9) != a


def test_inpaint_with_a_mask(server):
    c = client(server)
    common = dict(image=("in.png", png(picture()), "image/png"), prompt="a red door",
                  extra_body={"seed": 4, "num_inference_steps": 4})
    inpaint = c.images.edit(mask=("mask.png", mask(), "image/png"), **common).data[0].b64_json
    again = c.images.edit(mask=("mask.png", mask(), "image/png"), **common).data[0].b64_json
    plain = c.images.edit(**common).data[0].b64_json
    assert inpaint == again and inpaint != plain
    assert decode(inpaint).size == (64, 48)


def test_several_input_images_are_refused_and_n_makes_several_edits(server):
    """OpenAI's several images are the inputs of one composite edit, which Z-Image does not make: refused, naming the
    field; n edits of one image is how to get several results."""
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as e:
        client(server).images.edit(
            image=[("a.png", png(picture(seed=1)), "image/png"), ("b.png", png(picture(80, 32, seed=2)), "image/png")],
            prompt="snow")
    assert e.value.body["param"] == "image" and "one input image per call" in e.value.body["message"]
    resp = client(server).images.edit(image=("a.png", png(picture(seed=1)), "image/png"),
                                      mask=("mask.png", mask(), "image/png"), prompt="snow", n=2,
                                      extra_body={"seed": 1})
    assert len(resp.data) == 2 and [d.model_extra["seed"] for d in resp.data] == [1, 2]
    assert {decode(d.b64_json).size for d in resp.data} == {(64, 48)} and len({d.b64_json for d in resp.data}) == 2


def test_streaming_edit_events(server):
    stream = client(server).images.edit(image=("in.png", png(picture()), "image/png"), prompt="a fox", stream=True,
                                        partial_images=1, extra_body={"seed": 2, "num_inference_steps": 8,
                                                                      "strength": 0.5})
    events = list(stream)
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert decode(events[-1].b64_json).size == (64, 48)
    assert events[-1].usage.input_tokens_details.image_tokens == 4 * 3  # the input image's, as in the JSON answer
    with httpx.stream("POST", f"{server.url}/v1/images/edits", timeout=60,
                      files={"image": ("in.png", png(picture()), "image/png")},
                      data={"prompt": "a fox", "stream": "true", "partial_images": "1", "num_inference_steps": "4"}
                      ) as r:
        assert r.status_code == 200
        assert [e["type"] for e in check_stream(r.read().decode())] == ["image_edit.partial_image",
                                                                       "image_edit.completed"]


def test_edit_shares_a_batch_with_generations_and_equals_its_solo_run(server):
    """An 8-step img2img at strength 0.5 runs 4 steps: through the Python API it shares one packed batch with two
    4-step generations, and its image is the one it gets alone (over HTTP)."""
    body = {"prompt": "a lighthouse", "seed": 5, "num_inference_steps": "8", "strength": "0.5"}
    alone = httpx.post(f"{server.url}/v1/images/edits", data=body, files={"image": ("in.png", png(picture()),
                                                                                    "image/png")}, timeout=60)
    dep = server.service.deployment

    async def together():
        edit = dep.edit_requests_for("a lighthouse", picture(), seed=5, num_inference_steps=8, strength=0.5)
        gens = [r for i in range(2) for r in dep.requests_for(f"p{i}", seed=i, num_inference_steps=4)]
        return await asyncio.gather(*dep.admit(edit + gens))

    results = asyncio.run_coroutine_threadsafe(together(), server.loop).result(60)
    assert all(r.ok for r in results)
    assert {r.batch_id for r in results} == {results[0].batch_id} and results[0].batch_size == 3
    assert results[0].png == base64.b64decode(alone.json()["data"][0]["b64_json"])


def _big_grey() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (6000, 6000), 7).save(buf, format="PNG", compress_level=9)  # 36 M pixels in ~50 KB
    return buf.getvalue()


BIG = _big_grey()
BAD = [
    (dict(image=("x.png", b"", "image/png")), "image", "empty"),
    (dict(image=("x.txt", b"hello, not an image", "text/plain")), "image", "not an image"),
    (dict(image=("x.gif", b"GIF89a" + bytes(40), "image/gif")), "image", "not an image"),
    (dict(image=("x.png", png(picture()), "image/png"), mask=("m.png", png(picture()), "image/png")), "mask",
     "alpha channel"),
    (dict(image=("x.png", png(picture()), "image/png"), mask=("m.png", mask(32, 32), "image/png")), "mask",
     "same dimensions"),
    (dict(image=("x.png", png(picture()), "image/png"), extra_body={"strength": 2}), "strength", "from 0 to 1"),
    (dict(image=("x.png", png(picture()), "image/png"), background="transparent"), "background", "alpha"),
    (dict(image=[("big.png", BIG, "image/png")] * 3), "image", "one input image per call"),
]


@pytest.mark.parametrize("kw,param,fragment", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_files_are_400_naming_the_field(server, kw, param, fragment):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as e:
        client(server).images.edit(prompt="x", **kw)
    err = e.value.response.json()["error"]
    check("ErrorResponse", e.value.response.json())
    assert err["param"] == param and fragment in err["message"], err


def test_a_file_over_the_limit_is_413_naming_it_while_it_streams(server):
    from openai import APIStatusError

    noise = png(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8))  # ~120 KB, limit 100 KB
    with pytest.raises(APIStatusError) as e:
        client(server).images.edit(prompt="x", image=("x.png", noise, "image/png"))
    err = e.value.response.json()["error"]
    assert e.value.status_code == 413 and err["param"] == "image" and "limits.max_image_bytes" in err["message"]
    check("ErrorResponse", e.value.response.json())


def test_phone_mpo_jpeg_is_edited(server):
    """A multi-picture JPEG (what many phones write: the photo, then a gain map) is taken as its first picture."""
    buf = io.BytesIO()
    Image.fromarray(picture()).save(buf, format="MPO", save_all=True, quality=95,
                                    append_images=[Image.new("RGB", (32, 24), (9, 9, 9))])
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    out = client(server).images.edit(image=("photo.jpg", buf.getvalue(), "image/jpeg"), prompt="a fox",
                                     extra_body={"seed": 3, "num_inference_steps": 4})
    assert decode(out.data[0].b64_json).size == (64, 48)


def test_json_edit_with_data_urls(server):
    """The spec's JSON form: images (and mask) as base64 data: URLs; network URLs and file ids are refused."""
    data = "data:image/png;base64," + base64.b64encode(png(picture())).decode()
    mask_url = "data:image/png;base64," + base64.b64encode(mask()).decode()
    body = {"prompt": "a fox", "images": [{"image_url": data}], "mask": {"image_url": mask_url}, "seed": 4,
            "num_inference_steps": 4, "moderation": "low"}
    r = httpx.post(f"{server.url}/v1/images/edits", json=body, timeout=60)
    assert r.status_code == 200, r.text
    check("ImagesResponse", r.json())
    multipart = client(server).images.edit(image=("in.png", png(picture()), "image/png"), prompt="a fox",
                                           mask=("mask.png", mask(), "image/png"),
                                           extra_body={"seed": 4, "num_inference_steps": 4})
    assert r.json()["data"][0]["b64_json"] == multipart.data[0].b64_json  # the same edit either way
    for images, fragment in (([{"image_url": "https://example.com/a.png"}], "only data: URLs"),
                             ([{"file_id": "file-abc"}], "file_id is not supported"), ([], "images is required")):
        r = httpx.post(f"{server.url}/v1/images/edits", json={"prompt": "x", "images": images}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "images" and fragment in r.text, r.text
    r = httpx.post(f"{server.url}/v1/images/edits", content=b"prompt=x", timeout=60,
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]


def test_bench_http_sender_sends_edits(server):
    """``zimage-orch bench --http`` sends edit workloads as multipart edits."""
    from orchestrator.benchmark.loadgen import RequestMaker, http_sender

    async def run():
        async with httpx.AsyncClient(timeout=60) as h:
            send = http_sender(h, server.url, None)
            maker = RequestMaker.for_workload("edit-mix", None, [(64, 48)], 4, edit_steps=6)
            return [await send(maker.params()) for _ in range(3)]

    results = asyncio.run(run())
    assert all(r.ok for r in results), [r.error for r in results]
    assert {(r.width, r.height) for r in results} == {(64, 48)}
