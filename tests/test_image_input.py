"""The edit input rules (orchestrator/image_input.py) and the edit request's fields (images_api.parse_edit)."""

import io
import struct
import zlib

import numpy as np
import pytest
from fakes import IdleDeployment
from PIL import Image

from orchestrator.image_input import prepare_edit
from orchestrator.images_api import parse_edit
from zimage_common.config import config_from_dict
from zimage_common.errors import InvalidRequestError

CFG = config_from_dict({"model": {"source": "tiny"}, "defaults": {"width": 64, "height": 64,
                                                                  "num_inference_steps": 8},
                        "limits": {"max_n": 4, "max_pixels": 128 * 128, "max_image_bytes": 200_000,
                                   "max_input_pixels": 512 * 512}})
LIMITS = CFG.limits


def png(arr_or_img, **kw) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def rgb(w=64, h=48, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def mask_png(w=64, h=48):
    a = np.full((h, w, 4), 255, np.uint8)
    a[h // 4: h // 2, w // 4: w // 2, 3] = 0  # transparent = repaint
    return png(a)


def png16(w=16, h=16) -> bytes:
    """A 16-bit RGB PNG, written by hand (Pillow reads it as 8-bit RGB: only the header tells)."""
    raw = b"".join(b"\x00" + b"\x12\x34" * 3 * w for _ in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def animated() -> bytes:
    frames = [Image.fromarray(rgb(seed=i)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    return buf.getvalue()


BAD = [
    (b"", None, "image", "empty"),
    (b"not an image at all", None, "image", "not an image"),
    (png(rgb())[:60], None, "image", "truncated or corrupt"),
    (png(rgb(), format="GIF"), None, "image", "GIF"),
    (png(Image.new("CMYK", (32, 32)), format="JPEG"), None, "image", "CMYK"),
    (png16(), None, "image", "16 bits"),
    (png(Image.new("I;16", (32, 32))), None, "image", "16 bits"),
    (animated(), None, "image", "animated"),
    (png(np.zeros((600, 600, 3), np.uint8)), None, "image", "limits.max_input_pixels"),
    (np.random.default_rng(0).bytes(300_000), None, "image", "limits.max_image_bytes"),
    (png(rgb(8, 8)), None, "image", "at least 16"),
    (png(rgb()), png(rgb()), "mask", "alpha channel"),
    (png(rgb()), mask_png(32, 48), "mask", "same dimensions"),
    (png(rgb()), b"", "mask", "empty"),
    (png(rgb()), b"GIF89a....", "mask", "not an image"),
]


@pytest.mark.parametrize("image,mask,param,fragment", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_files_are_400s_naming_the_field(image, mask, param, fragment):
    with pytest.raises(InvalidRequestError) as e:
        prepare_edit([image], mask, None, LIMITS)
    assert e.value.param == param and fragment in e.value.message, e.value.message


def test_exif_orientation_is_applied():
    arr = rgb(64, 32)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = png(img, format="JPEG", exif=exif.tobytes(), quality=95)
    out = prepare_edit([data], None, None, LIMITS)
    assert (out.width, out.height) == (32, 64)  # shown upright: portrait
    assert out.images[0].shape == (64, 32, 3)


def test_malformed_exif_is_not_a_server_error_and_the_orientation_still_counts():
    """A camera file whose EXIF block holds a malformed tag (here a RATIONAL tag holding text, as fuzzing built):
    rewriting that block raised a TypeError in Pillow's exif_transpose, a 500 for a picture that decodes. Only the
    orientation is read now; and a JPEG whose EXIF cannot be parsed at all is taken as it is."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "cam"  # Make, ASCII; renamed below to 0x013F (WhitePoint, a RATIONAL tag)
    data = png(Image.fromarray(rgb(64, 32)), format="JPEG", exif=exif.tobytes(), quality=95)
    bad = data.replace(b"\x01\x0f\x00\x02", b"\x01\x3f\x00\x02", 1)
    assert bad != data
    out = prepare_edit([bad], None, None, LIMITS)
    assert (out.width, out.height) == (32, 64)  # still turned upright
    broken = data.replace(b"Exif\x00\x00MM", b"Exif\x00\x00XX", 1).replace(b"Exif\x00\x00II", b"Exif\x00\x00XX", 1)
    assert broken != data
    out = prepare_edit([broken], None, None, LIMITS)
    assert (out.width, out.height) == (64, 32)  # unreadable metadata: no orientation


def test_size_rules_auto_and_explicit():
    out = prepare_edit([png(rgb(70, 50))], None, None, LIMITS)  # auto: own size rounded down to 16
    assert (out.width, out.height) == (64, 48) and out.images[0].shape == (48, 64, 3)
    # auto: scaled down to fit max_pixels (128*128)
    out = prepare_edit([png(np.full((200, 400, 3), 90, np.uint8))], None, None, LIMITS)
    assert out.width * out.height <= 128 * 128 and out.width % 16 == 0 and out.height % 16 == 0
    assert abs(out.width / out.height - 2) < 0.3
    out = prepare_edit([png(rgb(70, 50)), png(rgb(20, 90))], mask_png(70, 50), (96, 64), LIMITS)  # explicit
    assert [i.shape for i in out.images] == [(64, 96, 3)] * 2 and out.mask.shape == (64, 96)
    assert set(np.unique(out.mask)) == {0, 255} and out.mask.mean() > 0


def test_mask_transparent_pixels_are_repainted():
    out = prepare_edit([png(rgb())], mask_png(), None, LIMITS)
    expected = np.zeros((48, 64), np.uint8)
    expected[12:24, 16:32] = 255
    assert np.array_equal(out.mask, expected)


def files(*images, mask=None):
    return {"image": list(images), "mask": mask}


def test_parse_edit_makes_n_edits_of_its_image_with_strength_defaults():
    call = parse_edit({"prompt": "a cat", "n": "2", "seed": "5", "stream": "false"},
                      files(png(rgb()), mask=mask_png()), CFG)
    rs = call.requests
    assert len(rs) == 2 and [r.seed for r in rs] == [5, 6] and all(r.mask is not None for r in rs)
    assert [r.strength for r in rs] == [1.0, 1.0] and [r.steps_run for r in rs] == [8, 8]  # inpaint's default
    assert (rs[0].width, rs[0].height) == (64, 48) and call.event_type == "image_edit"
    assert call.input_image_tokens == (64 // 16) * (48 // 16)
    (r,) = parse_edit({"prompt": "a cat", "seed": "5"}, files(png(rgb())), CFG).requests
    assert r.mask is None and r.strength == 0.6 and r.steps_run == 5  # img2img's default


def test_several_input_images_are_refused_before_any_decode(monkeypatch):
    """OpenAI's several images are the inputs of one composite edit, which Z-Image does not make: a 400 naming the
    field, said before a single image is decoded (in both forms)."""
    import base64

    import orchestrator.image_input as image_input
    from orchestrator.images_api import parse_json_edit

    monkeypatch.setattr(image_input, "open_image", lambda *a: pytest.fail("an image was decoded"))
    with pytest.raises(InvalidRequestError) as e:
        parse_edit({"prompt": "x"}, files(png(rgb()), png(rgb())), CFG)
    assert e.value.param == "image" and "one input image per call" in e.value.message, e.value.message
    url = "data:image/png;base64," + base64.b64encode(png(rgb())).decode()
    with pytest.raises(InvalidRequestError) as e:
        parse_json_edit({"prompt": "x", "images": [{"image_url": url}] * 2}, CFG)
    assert e.value.param == "images" and "one input image per call" in e.value.message


BAD_FIELDS = [
    ({"prompt": "x", "strength": "1.5"}, "strength", "from 0 to 1"),
    ({"prompt": "x", "strength": "abc"}, "strength", "a number"),
    ({"prompt": "x", "strength": "0.0"}, "strength", "runs no denoising step"),
    ({"prompt": "x", "n": "5"}, "n", "limits.max_n"),
    ({"prompt": "x", "quality": "hd"}, "quality", "one of"),  # not an edit's value (dall-e-3 generations')
    ({"prompt": "x", "input_fidelity": "high"}, "input_fidelity", "use strength"),
    ({"prompt": "x", "stream": "maybe"}, "stream", "true or false"),
    ({"prompt": "x", "background": "transparent"}, "background", "alpha"),
    ({"prompt": "x", "input_fidelity": "max"}, "input_fidelity", "one of"),
    ({"prompt": "x", "style": "vivid"}, "style", "unknown field"),
    ({"prompt": "x", "size": "100x64"}, "size", "multiple of 16"),
    ({"prompt": "x", "image": "a string"}, "image", "as a file"),
    ({}, "prompt", "required"),
]


@pytest.mark.parametrize("fields,param,fragment", BAD_FIELDS, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD_FIELDS)])
def test_bad_edit_fields(fields, param, fragment):
    with pytest.raises(InvalidRequestError) as e:
        parse_edit(fields, files(png(rgb())), CFG)
    assert e.value.param == param and fragment in e.value.message, e.value.message


def test_no_image_is_refused():
    with pytest.raises(InvalidRequestError) as e:
        parse_edit({"prompt": "x"}, files(), CFG)
    assert e.value.param == "image"


def test_python_objects_are_checked_like_files():
    from orchestrator.image_input import file_bytes

    out = prepare_edit([file_bytes(rgb(), "image")], file_bytes(np.asarray(Image.open(io.BytesIO(mask_png()))),
                                                                  "mask"), None, LIMITS)
    assert out.images[0].shape == (48, 64, 3) and out.mask.max() == 255
    with pytest.raises(InvalidRequestError) as e:
        prepare_edit([file_bytes(Image.new("CMYK", (32, 32)), "image")], None, None, LIMITS)
    assert e.value.param == "image" and "CMYK" in e.value.message
    with pytest.raises(InvalidRequestError) as e:
        file_bytes(np.zeros((4, 4, 3), np.float32), "image")
    assert "uint8" in e.value.message


def test_json_edit_data_urls():
    import base64

    from orchestrator.images_api import parse_json_edit

    url = "data:image/png;base64," + base64.b64encode(png(rgb())).decode()
    call = parse_json_edit({"prompt": "x", "images": [{"image_url": url}], "n": 2, "seed": 2}, CFG)
    assert len(call.requests) == 2 and call.requests[1].image.shape == (48, 64, 3)
    for payload, param, fragment in (
        ({"prompt": "x", "images": [{"image_url": "data:image/png;base64,@@@"}]}, "images", "base64"),
        ({"prompt": "x", "images": [{"image_url": url, "file_id": "f"}]}, "images", "exactly one"),
        ({"prompt": "x", "images": [{"image_url": url}], "n": "2"}, "n", "integer"),  # JSON types are strict
        ({"prompt": "x", "images": [{"image_url": url}], "mask": {"image_url": url}}, "mask", "alpha channel"),
        ({"prompt": "x", "image": url}, "image", "`images`"),
        ({"prompt": "x", "images": [{"image_url": url}], "quality": "standard"}, "quality", "one of"),  # JSON's enum
    ):
        with pytest.raises(InvalidRequestError) as e:
            parse_json_edit(payload, CFG)
        assert e.value.param == param and fragment in e.value.message, e.value.message


def test_every_field_of_the_spec_edit_request_is_handled():
    """Every property of OpenAI's CreateImageEditRequest is accepted or refused by name (never 'unknown field');
    the JSON form's fields (JSON_EDIT_FIELDS, EditImageBodyJsonParam's) are those plus images and moderation."""
    from openai_spec import schema

    from orchestrator.images_api import EDIT_ACCEPTED, JSON_EDIT_FIELDS

    assert set(schema("CreateImageEditRequest")["properties"]) <= EDIT_ACCEPTED
    assert set(JSON_EDIT_FIELDS) - {"images", "mask", "moderation"} <= EDIT_ACCEPTED


def test_parse_edit_takes_loras_as_json_text_and_checks_them():
    """``loras`` on an edit: a JSON text field in multipart (a list in the JSON form), checked against the
    registered adapters like a generation's; bad JSON and unknown names are 400s naming ``loras``."""
    fields = {"prompt": "a cat", "loras": '[{"name": "style-a", "scale": 0.5}]'}
    call = parse_edit(fields, files(png(rgb())), CFG, known_loras={"style-a"})
    assert [r.loras for r in call.requests] == [(("style-a", 0.5),)]
    typed = parse_edit({"prompt": "a cat", "loras": [{"name": "style-a"}]}, files(png(rgb())), CFG, typed=True,
                       known_loras={"style-a"})
    assert typed.requests[0].loras == (("style-a", 1.0),)
    for bad in ('[{"name": "nope"}]', "not json"):
        with pytest.raises(InvalidRequestError) as e:
            parse_edit({"prompt": "a cat", "loras": bad}, files(png(rgb())), CFG, known_loras={"style-a"})
        assert e.value.param == "loras"


# ---- bounded decoding: the request's pixel total, one image at a time, MPO, 16 images + mask + control image -----
def big_grey_png(side=6300) -> bytes:
    """A 40-megapixel PNG of one grey level: ~50 KB on the wire, 40 MB once decoded."""
    return png(Image.new("L", (side, side), 7), compress_level=9)


def test_large_but_tiny_pngs_are_refused_before_any_decode(monkeypatch):
    """A 40 MP file (under every per-file limit, a few KB) and a control image of the same size would decode to 80 M
    pixels: over limits.max_request_input_pixels the request is a 400 naming image, said from the headers, with no
    image decoded."""
    import orchestrator.image_input as image_input

    cfg = config_from_dict({"model": {"source": "tiny", "controlnet": {"source": "tiny"}},
                            "limits": {"max_request_input_pixels": 60_000_000}})
    data = big_grey_png()
    assert 6300 * 6300 <= cfg.limits.max_input_pixels
    decoded = []
    real = image_input._check_decoded
    monkeypatch.setattr(image_input, "_check_decoded", lambda img, *a, **kw: decoded.append(img.size) or real(
        img, *a, **kw))
    with pytest.raises(InvalidRequestError) as e:
        parse_edit({"prompt": "x", "size": "1024x1024"}, {"image": [data], "mask": None, "control_image": data}, cfg)
    assert e.value.param == "image" and "limits.max_request_input_pixels" in e.value.message, e.value.message
    assert str(cfg.limits.max_request_input_pixels) in e.value.message and "downscale" in e.value.message
    assert decoded == []


def test_the_mask_and_control_image_count_in_the_request_total():
    import base64

    from orchestrator.images_api import parse_generation

    side = 250  # each image 62,500 pixels; the request may have 100,000
    cfg = config_from_dict({"model": {"source": "tiny", "controlnet": {"source": "tiny"}},
                            "defaults": {"width": 64, "height": 64, "num_inference_steps": 8},
                            "limits": {"max_pixels": 128 * 128, "max_request_input_pixels": 100_000}})
    image, mask = png(rgb(side, side)), mask_png(side, side)
    assert len(parse_edit({"prompt": "x"}, files(image), cfg).requests) == 1  # 62,500: under
    for extra in ({"mask": mask}, {"control_image": png(rgb(side, side))}):
        with pytest.raises(InvalidRequestError) as e:  # 125,000 with either
            parse_edit({"prompt": "x"}, {"image": [image], "mask": None, **extra}, cfg)
        assert e.value.param == "image" and "2 input image(s)" in e.value.message, e.value.message
    big = "data:image/png;base64," + base64.b64encode(png(np.zeros((400, 400, 3), np.uint8))).decode()
    with pytest.raises(InvalidRequestError) as e:  # a generation's control image alone: 160,000
        parse_generation({"prompt": "x", "control_image": big}, cfg)
    assert e.value.param == "control_image" and "limits.max_request_input_pixels" in e.value.message


def test_images_are_decoded_one_at_a_time_and_dropped(monkeypatch):
    """Under the limit, each input image (``prepare_edit``: images, then the mask) is decoded, resized to the output
    size and released before the next is opened: at most one full-size decode is alive at any time (weak
    references to every decoded image tell)."""
    import gc
    import weakref

    import orchestrator.image_input as image_input

    cfg = config_from_dict({"model": {"source": "tiny"}, "limits": {"max_n": 8}})
    alive, most = [], [0]
    real = image_input.open_image

    def watched(data, param, limits):
        img = real(data, param, limits)
        most[0] = max(most[0], sum(r() is not None for r in alive) + 1)
        alive.append(weakref.ref(img))
        return img

    monkeypatch.setattr(image_input, "open_image", watched)
    gc.disable()  # reference counting alone must free them (no cycle keeps a decode alive)
    try:
        sources = [png(np.full((1500, 2000, 3), 40 * i, np.uint8)) for i in range(4)]
        a = np.full((1500, 2000, 4), 255, np.uint8)
        a[:750, :, 3] = 0
        out = prepare_edit(sources, png(a), (256, 192), cfg.limits)
    finally:
        gc.enable()
    assert len(alive) == 5 and most[0] == 1 and all(r() is None for r in alive)
    assert [int(i.mean()) for i in out.images] == [0, 40, 80, 120]
    assert out.mask.shape == (192, 256) and out.mask[:96].min() == 255


def mpo(arr, second=None, exif: bytes | None = None) -> bytes:
    """A multi-picture JPEG as phones write them (the photo, then a gain map / depth picture)."""
    second = second if second is not None else Image.new("RGB", (arr.shape[1] // 2, arr.shape[0] // 2), (9, 9, 9))
    buf = io.BytesIO()
    kw = {"exif": exif} if exif else {}
    Image.fromarray(arr).save(buf, format="MPO", save_all=True, append_images=[second], quality=95, **kw)
    return buf.getvalue()


def test_mpo_phone_jpeg_is_accepted_as_its_first_picture():
    arr = np.zeros((48, 64, 3), np.uint8)
    arr[:, :32] = 200  # left half bright
    data = mpo(arr)
    opened = Image.open(io.BytesIO(data))
    assert opened.format == "MPO" and opened.n_frames == 2  # what Pillow makes of it: two frames
    out = prepare_edit([data], None, None, LIMITS)
    assert (out.width, out.height) == (64, 48)
    assert out.images[0][:, :28].min() > 180 and out.images[0][:, 36:].max() < 20  # the photo, not the gain map
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise to display
    out = prepare_edit([mpo(arr, exif=exif.tobytes())], None, None, LIMITS)
    assert (out.width, out.height) == (48, 64) and out.images[0][:28].min() > 180  # left half shown on top
    import base64

    from orchestrator.images_api import parse_generation

    cfg = config_from_dict({"model": {"source": "tiny", "controlnet": {"source": "tiny"}},
                            "defaults": {"width": 64, "height": 48}})
    call = parse_generation({"prompt": "x", "control_image": base64.b64encode(data).decode()}, cfg)
    assert call.requests[0].control_image[:, :28].min() > 180


def multipart(n_images: int, mask: bool = True, control: bool = True) -> tuple[dict, bytes]:
    import httpx

    parts = [("image[]", (f"i{i}.png", png(rgb(seed=i)), "image/png")) for i in range(n_images)]
    if mask:
        parts.append(("mask", ("m.png", mask_png(), "image/png")))
    if control:
        parts.append(("control_image", ("c.png", png(rgb(seed=99)), "image/png")))
    from starlette.datastructures import Headers

    req = httpx.Request("POST", "http://x/v1/images/edits", data={"prompt": "in snow", "size": "64x48"},
                        files=parts)
    return Headers(dict(req.headers)), req.read()


def test_sixteen_images_a_mask_and_a_control_image_parse_in_one_multipart_body():
    import asyncio

    from orchestrator.server import parse_multipart

    headers, body = multipart(16)
    fields, got = asyncio.run(parse_multipart(headers, body))
    assert len(got["image"]) == 16 and got["mask"] is not None and got["control_image"] is not None
    assert fields == {"prompt": "in snow", "size": "64x48"}
    cfg = config_from_dict({"model": {"source": "tiny", "controlnet": {"source": "tiny"}},
                            "defaults": {"num_inference_steps": 8}, "limits": {"max_n": 16}})
    with pytest.raises(InvalidRequestError) as e:  # parsed whole, then refused: one input image per edit
        parse_edit(fields, got, cfg)
    assert e.value.param == "image" and "16 images sent" in e.value.message
    call = parse_edit(fields, {**got, "image": got["image"][:1]}, cfg)
    assert len(call.requests) == 1 and call.requests[0].mask is not None
    assert call.requests[0].control_image.shape == (48, 64, 3)
    with pytest.raises(InvalidRequestError) as e:  # one file more than 16 + mask + control image
        asyncio.run(parse_multipart(*multipart(17)))
    assert "Too many files" in e.value.message, e.value.message


def test_server_decodes_images_off_the_loop_a_bounded_number_at_a_time(monkeypatch):
    """A burst of edits (and generations with a control image) decodes at most
    limits.max_concurrent_image_decodes at once, never on the event loop; a generation without a control image
    is parsed on the loop as before."""
    import asyncio
    import threading
    import time

    import httpx
    from conftest import ServerThread

    import orchestrator.server as server
    from zimage_common.logging_setup import current_request_id

    lock, state = threading.Lock(), {"now": 0, "most": 0, "threads": set(), "ids": set()}

    def slow_parse(*args, **kwargs):
        with lock:
            state["ids"].add(current_request_id())  # the request's X-Request-ID reaches the thread (trace_id)
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            state["threads"].add(threading.current_thread().name)
        time.sleep(0.2)  # long enough for the burst to pile up behind the limit
        with lock:
            state["now"] -= 1
        raise InvalidRequestError("stopped here by the test", param="image")

    loop_parses = []

    def parse_generation(payload, *args):
        if payload.get("control_image") is not None:
            return slow_parse()
        loop_parses.append(threading.current_thread().name)
        raise InvalidRequestError("a plain generation", param="prompt")

    monkeypatch.setattr(server, "parse_edit", slow_parse)
    monkeypatch.setattr(server, "parse_generation", parse_generation)

    async def up(config, observer=None):
        return IdleDeployment()

    cfg = config_from_dict({"model": {"source": "tiny", "controlnet": {"source": "tiny"}},
                            "limits": {"max_concurrent_image_decodes": 2}})
    headers, body = multipart(2)
    with ServerThread(server.create_app(cfg, deployment_factory=up)) as s:
        s.wait_ready(timeout_s=10)

        async def burst():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                edits = [c.post("/v1/images/edits", content=body, headers={"content-type": headers["content-type"]})
                         for _ in range(6)]
                gens = [c.post("/v1/images/generations", json={"prompt": "x", "control_image": "aGk="})
                        for _ in range(2)]
                return await asyncio.gather(*edits, *gens)

        answers = asyncio.run(burst())
        loop_thread = s.thread.name
        plain = httpx.post(f"{s.url}/v1/images/generations", json={"prompt": "x"}, timeout=60)
    assert [r.status_code for r in answers] == [400] * 8
    assert all(r.json()["error"]["message"] == "stopped here by the test" for r in answers)
    assert state["most"] == 2  # the burst of 8 was held to 2 at a time
    assert loop_thread not in state["threads"]
    assert state["ids"] == {r.headers["x-request-id"] for r in answers} and None not in state["ids"]
    assert loop_parses == [loop_thread] and plain.json()["error"]["message"] == "a plain generation"  # on the loop
