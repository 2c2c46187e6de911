"""Per-request LoRA through the whole service (Ray replicas of the tiny model, HTTP and the Python API): configured
and runtime adapters, the API key on the registry endpoints, 400s naming the field, each image equal to diffusers
with its adapter fused, and the same image whatever its batch-mates."""

import base64
import copy
import io
import threading

import httpx
import numpy as np
import pytest
import torch
from conftest import ServerThread, tiny_config
from PIL import Image

from actors.lora import random_lora_state_dict, save_diffusers_lora, save_kohya_lora
from actors.models import build_pipeline

pytestmark = [pytest.mark.ray, pytest.mark.slow]

KEY = "sk-lora-key"
SEED = 0  # the tiny model's weight seed (model.seed): diffusers' reference pipeline is built from it


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("service-loras")
    tr = build_pipeline("tiny", seed=SEED).transformer
    sd, meta = random_lora_state_dict(tr, 4, seed=1, alpha=8.0, std=0.15)
    a = save_diffusers_lora(root / "style-a", sd, meta).parent
    sd, meta = random_lora_state_dict(tr, 8, seed=2, std=0.15,
                                      modules=("attention.to_q", "attention.to_v", "feed_forward.w1"))
    b = save_diffusers_lora(root / "style-b", sd, meta)
    sd, _ = random_lora_state_dict(tr, 4, seed=3, std=0.15, modules=("attention.to_k", "feed_forward.w3"))
    save_kohya_lora(root / "kohya.safetensors", sd)
    return {"style-a": a, "style-b": b, "kohya": root / "kohya.safetensors", "root": root}


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_cache, adapters):
    from orchestrator.server import create_app

    cfg = tiny_config(tiny_cache, model={"seed": SEED, "loras": [{"name": "style-a", "path": str(adapters["style-a"])}],
                                         "lora_max_resident": 2, "lora_dir": str(adapters["root"])},
                      router={"max_batch_size": 4, "max_wait_ms": 150, "request_timeout_s": 60},
                      server={"api_keys": [KEY]})
    with ServerThread(create_app(cfg)) as s:
        s.wait_ready()
        yield s


def auth():
    return {"Authorization": f"Bearer {KEY}"}


def _gen(server, body):
    return httpx.post(f"{server.url}/v1/images/generations", json=body, headers=auth(), timeout=120)


def _image(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(resp.json()["data"][0]["b64_json"]))))


def _fused(path, scale, prompt, seed, size, steps):
    pytest.importorskip("peft")
    pipe = copy.deepcopy(build_pipeline("tiny", seed=SEED))
    path = str(path)
    folder, name = (path.rsplit("/", 1) if path.endswith(".safetensors")
                    else (path, "pytorch_lora_weights.safetensors"))
    pipe.load_lora_weights(folder, weight_name=name, adapter_name="x")
    pipe.fuse_lora(lora_scale=scale, adapter_names=["x"])
    img = pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=0.0,
               generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    return (img * 255).round().clip(0, 255).astype(np.uint8)


def test_registry_endpoints_and_keys(server, adapters):
    r = httpx.get(f"{server.url}/v1/loras", headers=auth())
    assert r.status_code == 200
    (a,) = r.json()["data"]
    assert a["name"] == "style-a" and a["rank"] == 4 and "attention.to_q" in a["modules"]
    assert set(a["replicas"]) == {"r0", "r1"} and a["runtime"] is False
    body = {"name": "kohya", "path": "kohya.safetensors"}  # relative to model.lora_dir
    assert httpx.post(f"{server.url}/v1/loras", json=body).status_code == 401
    assert httpx.delete(f"{server.url}/v1/loras/style-a").status_code == 401
    r = httpx.post(f"{server.url}/v1/loras", json=body, headers=auth(), timeout=60)
    assert r.status_code == 201, r.text
    assert r.json()["rank"] == 4 and set(r.json()["replicas"]) == {"r0", "r1"}
    assert r.json()["modules"] == ["attention.to_k", "feed_forward.w3"]
    names = [x["name"] for x in httpx.get(f"{server.url}/v1/loras", headers=auth()).json()["data"]]
    assert names == ["kohya", "style-a"]


@pytest.mark.parametrize("body,status,param,text", [
    ({"name": "x", "path": "missing.safetensors"}, 400, "path", "no adapter at 'missing.safetensors'"),
    ({"name": "x", "path": "/nonexistent/a.safetensors"}, 400, "path", "outside the directory"),
    ({"name": "x", "path": "../../../../../../etc/hostname"}, 400, "path", "outside the directory"),
    ({"name": "bad name!", "path": "kohya.safetensors"}, 400, "name", "pattern"),
    ({"name": "x"}, 400, "path", "needs path"),  # the missing field is named
    ({"name": "x", "path": "kohya.safetensors", "weight": 1}, 400, "weight", "unknown field"),
    ({"name": "x", "self": 1}, 400, "self", "unknown field"),
    ({"name": "x", "source": "modelscope", "model_id": "a/b"}, 403, "source", "model.lora_runtime_hub"),
    ({"name": "style-a", "path": "kohya.safetensors"}, 409, "name", "configured"),
])
def test_bad_registrations_are_refused_naming_the_field(server, adapters, body, status, param, text):
    r = httpx.post(f"{server.url}/v1/loras", json=body, headers=auth(), timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and text in err["message"], err
    assert str(adapters["root"]) not in err["message"]


@pytest.mark.parametrize("loras,text", [
    ([{"name": "nope"}], "unknown LoRA adapter 'nope'"),
    ([{"name": "style-a", "scale": "big"}], "scale must be a number"),
    ({"name": "style-a"}, "must be a list"),
    ([{"name": "style-a", "weight": 1}], "unknown field"),
])
def test_bad_loras_field_is_400_naming_loras(server, loras, text):
    r = _gen(server, {"prompt": "a fox", "size": "64x64", "loras": loras})
    assert r.status_code == 400 and r.json()["error"]["param"] == "loras", r.text
    assert text in r.json()["error"]["message"]


def _register(server, name: str, path) -> None:
    """A runtime adapter this test needs, registered by the test itself: under pytest-xdist the tests of this file
    may run on different workers, each with its own server, so none may rely on another having registered it
    (registering a runtime name again replaces it)."""
    httpx.post(f"{server.url}/v1/loras", json={"name": name, "path": str(path)}, headers=auth(),
               timeout=60).raise_for_status()


def test_images_equal_diffusers_fused_and_do_not_depend_on_batch_mates(server, adapters):
    _register(server, "style-b", adapters["style-b"])
    _register(server, "kohya", adapters["kohya"])
    want = {"prompt": "a red fox in snow", "size": "64x64", "seed": 5, "num_inference_steps": 3,
            "loras": [{"name": "style-a", "scale": 0.8}]}
    solo = _image(_gen(server, want))
    ref = _fused(adapters["style-a"], 0.8, want["prompt"], 5, 64, 3)
    plain = _image(_gen(server, {k: v for k, v in want.items() if k != "loras"}))
    assert np.abs(solo.astype(int) - plain.astype(int)).max() > 4  # the adapter matters
    assert np.abs(solo.astype(int) - ref.astype(int)).max() <= 1
    zero = _image(_gen(server, {**want, "loras": [{"name": "style-a", "scale": 0}]}))
    assert np.array_equal(zero, plain)

    # the same request beside others with other adapters (one batch: the router waits 150 ms to fill it)
    others = [{"prompt": "a boat", "size": "64x64", "seed": 6, "num_inference_steps": 3,
               "loras": [{"name": "style-b"}]},
              {"prompt": "a much longer prompt about a dog", "size": "96x64", "seed": 7, "num_inference_steps": 3,
               "loras": [{"name": "kohya", "scale": 1.2}, {"name": "style-a", "scale": 0.3}]},
              {"prompt": "plain", "size": "64x64", "seed": 8, "num_inference_steps": 3}]
    out: dict[int, httpx.Response] = {}
    threads = [threading.Thread(target=lambda i=i, b=b: out.__setitem__(i, _gen(server, b)))
               for i, b in enumerate([want, *others])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.abs(_image(out[0]).astype(int) - solo.astype(int)).max() <= 1
    for i in range(1, 4):
        assert out[i].status_code == 200, out[i].text


def test_delete(server, adapters):
    _register(server, "kohya", adapters["kohya"])
    r = httpx.delete(f"{server.url}/v1/loras/style-a", headers=auth())  # configured: the operator's
    assert r.status_code == 409 and r.json()["error"]["param"] == "name", r.text
    assert httpx.delete(f"{server.url}/v1/loras/kohya", headers=auth()).json() == {"name": "kohya", "deleted": True}
    assert httpx.delete(f"{server.url}/v1/loras/kohya", headers=auth()).status_code == 404
    r = _gen(server, {"prompt": "x", "size": "64x64", "loras": [{"name": "kohya"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "loras"


def test_python_api_and_restart(ray_cluster, tiny_cache, adapters):
    """ZImageClient: register at runtime, generate with the same list as HTTP takes, unknown names refused; a
    replica that restarts gets the runtime adapter back before it serves again."""
    import time

    from orchestrator.deployment import ZImageClient
    from orchestrator.replicas import ReplicaState
    from zimage_common.errors import InvalidRequestError, ReplicaUnavailableError

    cfg = tiny_config(tiny_cache, model={"seed": SEED, "lora_max_resident": 1, "lora_dir": str(adapters["root"])},
                      deployment={"replicas": 1, "health_interval_s": 3600})
    with ZImageClient(cfg) as client:
        assert client.loras() == []
        info = client.register_lora("style-a", str(adapters["style-a"]))
        assert info["rank"] == 4 and info["replicas"] == {"r0": "gpu"} and info["runtime"] is True
        (r,) = client.generate("a red fox in snow", width=64, height=64, seed=5, num_inference_steps=3,
                               loras=[{"name": "style-a", "scale": 0.8}])
        assert r.ok, r.error
        ref = _fused(adapters["style-a"], 0.8, "a red fox in snow", 5, 64, 3)
        assert np.abs(r.image.astype(int) - ref.astype(int)).max() <= 1
        with pytest.raises(InvalidRequestError, match="unknown LoRA adapter 'nope'") as e:
            client.generate("x", loras=[("nope", 1.0)])
        assert e.value.param == "loras"

        dep = client.deployment
        dep.replicas["r0"].kill(no_restart=False)
        client._call(_report(dep, ReplicaUnavailableError("killed by the test")))
        deadline = time.time() + 120
        while dep.replica_set.state("r0") is not ReplicaState.LIVE:
            assert time.time() < deadline, "r0 did not come back"
            time.sleep(0.1)
        assert client.loras()[0]["replicas"] == {"r0": "gpu"}
        (again,) = client.generate("a red fox in snow", width=64, height=64, seed=5, num_inference_steps=3,
                                   loras=[{"name": "style-a", "scale": 0.8}])
        assert again.ok and np.array_equal(again.image, r.image)
        assert client.unregister_lora("style-a") and client.loras() == []


async def _report(dep, error):
    dep.report_failure("r0", error)
