"""Conformance edges against OpenAI's published Images API (tests/data/openai-images-openapi.yaml), on fake replicas
(no model, no Ray): streamed url answers, the edit schemas' quality values, several input images, input_fidelity, n
above 10. Each test names the schema path it checks."""

import base64
import io
import json
from pathlib import Path

import httpx
import pytest
import yaml
from batch_fakes import TimedBackend, factory
from conftest import ServerThread, tiny_config
from openai_spec import _plain, parse_sse
from PIL import Image

from orchestrator.server import create_app

SPEC = Path(__file__).parent / "data" / "openai-images-openapi.yaml"


def spec_schemas() -> dict:
    return yaml.safe_load(SPEC.read_text())["components"]["schemas"]


def spec_check(name: str, instance) -> None:
    import jsonschema

    schemas = spec_schemas()
    jsonschema.Draft202012Validator(_plain(schemas[name], schemas)).validate(instance)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("review")
    backend = TimedBackend(1)
    cfg = tiny_config(tmp, deployment={"replicas": 1}, limits={"max_n": 16})
    with ServerThread(create_app(cfg, deployment_factory=factory(backend))) as s:
        s.wait_ready(30)
        s.backend = backend
        yield s


def png(w=64, h=64, mode="RGB", color=0) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def data_url(b: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(b).decode()


def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def gen(server, body):
    return httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=60)


def edit(server, data=None, files=None, json_body=None):
    if json_body is not None:
        return httpx.post(f"{server.url}/v1/images/edits", json=json_body, timeout=60)
    return httpx.post(f"{server.url}/v1/images/edits", data=data, files=files, timeout=60)


# ---- stream + response_format url: the completed event keeps its required b64_json -----------------------------
# components.schemas.ImageGenCompletedEvent.required (and ImageEditCompletedEvent.required) lists b64_json.
def test_streamed_url_completed_event_keeps_the_spec_shape(server):
    r = gen(server, {"prompt": "a fox", "stream": True, "response_format": "url", "seed": 1})
    assert r.status_code == 200, r.text[:300]
    events = [(e, json.loads(d)) for e, d in parse_sse(r.text) if d != "[DONE]"]
    completed = [b for e, b in events if b.get("type") == "image_generation.completed"]
    assert len(completed) == 1, r.text[:500]
    spec_check("ImageGenCompletedEvent", completed[0])  # fails: 'b64_json' is a required property


def test_official_client_reads_b64_json_of_a_streamed_url_edit(server):
    stream = client(server).images.edit(image=("a.png", png(), "image/png"), prompt="a fox", stream=True,
                                        response_format="url")
    completed = [ev for ev in stream if ev.type == "image_edit.completed"]
    assert len(completed) == 1
    assert isinstance(completed[0].b64_json, str)  # None: the event carried `url` in its place


# ---- edits take only the quality values their schemas list -----------------------------------------------------
# components.schemas.CreateImageEditRequest.properties.quality.enum = [standard, low, medium, high, auto] (no hd);
# components.schemas.EditImageBodyJsonParam.properties.quality.anyOf[0].enum = [low, medium, high, auto].
@pytest.mark.parametrize("form,value", [("multipart", "hd"), ("json", "hd"), ("json", "standard")])
def test_edit_quality_outside_the_edit_enum_is_refused(server, form, value):
    if form == "multipart":
        r = edit(server, data={"prompt": "a fox", "quality": value}, files={"image": ("a.png", png(), "image/png")})
    else:
        r = edit(server, json_body={"prompt": "a fox", "quality": value, "images": [{"image_url": data_url(png())}]})
    assert r.status_code == 400, r.text[:300]
    spec_check("ErrorResponse", r.json())
    assert r.json()["error"]["param"] == "quality"


# ---- several edit images: n images, or a refusal naming image (never n per input image) ------------------------
# components.schemas.CreateImageEditRequest.properties.n ("The number of images to generate") and .image (1-16
# images, the mask "applied on the first image"): the inputs make one edit; `data` holds n images.
def test_edit_with_two_images_returns_n_images(server):
    files = [("a.png", png(color=0), "image/png"), ("b.png", png(color=255), "image/png")]
    try:
        resp = client(server).images.edit(image=files, prompt="combine them", n=1)
    except Exception as e:  # a refusal naming `image` would conform too
        from openai import BadRequestError

        assert isinstance(e, BadRequestError) and e.body["param"] == "image", e
        return
    assert len(resp.data) == 1, f"n=1 gave {len(resp.data)} images"


# ---- input_fidelity "high": implemented or refused, never accepted and ignored -----------------------------------
# components.schemas.CreateImageEditRequest.properties.input_fidelity -> InputFidelity (high / low): implemented
# or refused with a 400 naming it (not run exactly as "low").
def test_input_fidelity_high_is_implemented_or_refused(server):
    seen = {}
    for fidelity in ("low", "high"):
        before = len(server.backend.made["r0"].batches)
        r = edit(server, data={"prompt": "a fox", "input_fidelity": fidelity, "seed": "7"},
                 files={"image": ("a.png", png(), "image/png")})
        if fidelity == "high" and r.status_code == 400:
            assert r.json()["error"]["param"] == "input_fidelity"
            return
        assert r.status_code == 200, r.text[:300]
        reqs = [q for b in server.backend.made["r0"].batches[before:] for q in b.requests]
        assert len(reqs) == 1
        q = reqs[0]
        seen[fidelity] = (q.strength, q.num_inference_steps, q.guidance_scale, q.mask is None)
    assert seen["high"] != seen["low"], f"input_fidelity high was accepted and ignored: {seen}"


# ---- n above the spec's maximum ----------------------------------------------------------------------------------
# components.schemas.CreateImageRequest.properties.n: minimum 1, maximum 10 ("Must be between 1 and 10");
# limits.max_n may be set up to 128: the HTTP API still refuses 11.
def test_n_above_ten_is_refused_whatever_limits_max_n_says(server):
    r = gen(server, {"prompt": "a fox", "n": 11, "seed": 3})
    assert r.status_code == 400, f"{r.status_code}: {len(r.json().get('data', []))} images"
    assert r.json()["error"]["param"] == "n"


# ---- a text field sent as a file part ----------------------------------------------------------------------------
# CreateImageEditRequest's text properties (n, prompt, ...) are form fields: sent as a file part, they are refused
# naming the field, never dropped (n would fall back to 1; a prompt "is required").
@pytest.mark.parametrize("name", ["n", "prompt"])
def test_a_text_field_sent_as_a_file_is_refused_naming_it(server, name):
    data = {"prompt": "a fox", "n": "2"}
    data.pop(name)
    r = edit(server, data=data, files=[("image", ("a.png", png(), "image/png")), (name, ("x.txt", b"2", "text/plain"))])
    assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text
    assert "text field" in r.json()["error"]["message"]
