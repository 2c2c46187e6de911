"""Per-request LoRA on the engine: against diffusers with the adapter loaded and fused, per sample in a mixed
batch, scale 0, a community (kohya) layout, residency, and no recompile per adapter set; then the edges:
non-finite and rank-0 adapter files, a replacement some replica refuses, an adapter replaced while a request
naming it runs, a batch of more adapters than lora_max_resident."""

import asyncio
import copy
import time

import numpy as np
import pytest
import torch

from actors.compiled import counted
from actors.engine import Sample, ZImageEngine
from actors.lora import (
    LoraError,
    LoraStore,
    adapter_nbytes,
    factors_from_state_dict,
    random_lora_state_dict,
    read_state_dict,
    save_diffusers_lora,
    save_kohya_lora,
)
from actors.models import build_pipeline
from actors.steploop import generate

CPU = dict.fromkeys(("transformer", "text_encoder", "vae"), "cpu")


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline("tiny", seed=3)


@pytest.fixture(scope="module")
def adapters(pipe, tmp_path_factory):
    """Three adapters in diffusers' own layout (PEFT keys + metadata; different ranks, alphas and targets) and
    one in kohya's community layout."""
    root = tmp_path_factory.mktemp("loras")
    tr = pipe.transformer
    out = {}
    for name, rank, alpha, mods, seed in (
            ("style-a", 4, 8.0, None, 1),
            ("style-b", 8, 4.0, ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"), 2),
            ("style-c", 3, 3.0, ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0"), 3)):
        kw = {} if mods is None else {"modules": mods}
        sd, meta = random_lora_state_dict(tr, rank, seed=seed, alpha=alpha, std=0.15, **kw)
        out[name] = save_diffusers_lora(root / name, sd, meta).parent
    # kohya: lora_unet_<module with underscores>.lora_down/up.weight + .alpha
    sd, _ = random_lora_state_dict(tr, 4, seed=4, std=0.15,
                                   modules=("attention.to_q", "attention.to_out.0", "feed_forward.w2"))
    save_kohya_lora(root / "kohya.safetensors", sd)
    out["kohya"] = root / "kohya.safetensors"
    return out


@pytest.fixture(scope="module")
def engine(pipe, adapters):
    eng = ZImageEngine(dict(pipe.components), CPU, torch.float32)
    eng.loras = LoraStore(eng.transformer, max_resident=2)
    for name, path in adapters.items():
        eng.loras.add(name, path)
    return eng


def _fused_images(pipe, path, scale, prompts, seeds, h, w, steps):
    """diffusers itself: load_lora_weights + fuse_lora(lora_scale) into a copy of the pipeline."""
    pytest.importorskip("peft")
    ref = copy.deepcopy(pipe)
    path = str(path)
    if path.endswith(".safetensors"):
        ref.load_lora_weights(path.rsplit("/", 1)[0], weight_name=path.rsplit("/", 1)[1], adapter_name="x")
    else:
        ref.load_lora_weights(path, adapter_name="x")
    ref.fuse_lora(lora_scale=scale, adapter_names=["x"])
    imgs = ref(prompts, height=h, width=w, num_inference_steps=steps, guidance_scale=0.0,
               generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np").images
    return (imgs * 255).round().clip(0, 255).astype(np.uint8)


def _close(a, b, levels=1):
    return np.abs(a.astype(int) - b.astype(int)).max() <= levels


@pytest.mark.parametrize("name,scale", [("style-a", 1.0), ("style-b", 0.7), ("style-c", 1.3), ("kohya", 1.0)])
def test_adapter_equals_diffusers_fused(pipe, engine, adapters, name, scale):
    prompts, seeds = ["a red fox in snow"], [11]
    ours, _ = generate(engine, [Sample(prompts[0], seeds[0], 64, 64, loras=((name, scale),))], 3)
    ref = _fused_images(pipe, adapters[name], scale, prompts, seeds, 64, 64, 3)
    plain = _fused_images(pipe, adapters[name], 0.0, prompts, seeds, 64, 64, 3)
    assert not _close(ref[0], plain[0], 4), "the adapter must change the image for this test to mean anything"
    assert _close(ours[0], ref[0]), np.abs(ours[0].astype(int) - ref[0].astype(int)).max()


def test_mixed_adapters_in_one_batch_equal_solo_runs(engine):
    """Different adapters, stacked adapters, none and guidance in one packed batch: each image equals its solo
    run (and so does not depend on its batch-mates)."""
    samples = [
        Sample("a cat", 1, 64, 64, loras=(("style-a", 1.0),)),
        Sample("a much longer prompt about a dog on a hill at sunset", 2, 96, 32, 2.0, "blurry",
               loras=(("style-b", 0.8),)),
        Sample("x", 3, 32, 64),
        Sample("a lighthouse", 4, 48, 80, loras=(("style-a", 0.5), ("style-c", 1.0))),
        Sample("a boat", 5, 64, 64, loras=(("kohya", 1.0),)),
    ]
    batch, _ = generate(engine, samples, 3)
    for s, img in zip(samples, batch):
        solo, _ = generate(engine, [s], 3)
        assert _close(img, solo[0]), s


def test_scale_zero_equals_no_adapter(engine):
    plain, _ = generate(engine, [Sample("a cat", 7, 64, 64)], 3)
    zero, _ = generate(engine, [Sample("a cat", 7, 64, 64, loras=(("style-a", 0.0),))], 3)
    beside, _ = generate(engine, [Sample("a cat", 7, 64, 64), Sample("a dog", 8, 64, 64, loras=(("style-a", 1.0),))],
                                3)
    assert np.array_equal(plain[0], zero[0])
    assert _close(plain[0], beside[0])


def test_residency_is_lru_and_unknown_names_fail(engine):
    store = engine.loras
    assert sum(i["resident"] for i in store.info()) <= 2
    generate(engine, [Sample("a", 1, 32, 32, loras=(("style-b", 1.0),))], 1)
    generate(engine, [Sample("a", 1, 32, 32, loras=(("kohya", 1.0),))], 1)
    resident = {i["name"] for i in store.info() if i["resident"]}
    assert resident == {"style-b", "kohya"}
    with pytest.raises(LoraError, match="not registered.*nope"):
        generate(engine, [Sample("a", 1, 32, 32, loras=(("nope", 1.0),))], 1)
    info = {i["name"]: i for i in store.info()}
    assert info["style-b"]["rank"] == 8 and info["style-b"]["modules"] == [
        "attention.to_k", "attention.to_out.0", "attention.to_q", "attention.to_v"]


def test_bad_adapters_are_clear_errors(pipe, tmp_path):
    store = LoraStore(pipe.transformer)
    with pytest.raises(LoraError, match="no adapter at"):
        store.add("x", tmp_path / "missing.safetensors")
    sd, meta = random_lora_state_dict(pipe.transformer, 4)
    sd = {k.replace("layers.0.attention.to_q", "layers.0.attention.to_zz"): v for k, v in sd.items()}
    save_diffusers_lora(tmp_path / "bad", sd, meta)
    with pytest.raises(LoraError, match="to_zz.*not in this model"):
        store.add("x", tmp_path / "bad")
    sd = {"transformer.cap_embedder.1.lora_A.weight": torch.zeros(2, 32),
          "transformer.cap_embedder.1.lora_B.weight": torch.zeros(64, 2)}
    save_diffusers_lora(tmp_path / "outside", sd, {"r": 2, "lora_alpha": 2})
    with pytest.raises(LoraError, match="outside the transformer blocks"):
        store.add("x", tmp_path / "outside")
    assert store.names() == []


def test_peft_scale_rules(pipe, adapters):
    sd, meta = read_state_dict(adapters["style-a"])
    meta = {k.removeprefix("transformer."): v for k, v in meta.items()}  # diffusers prefixes the component
    assert meta["r"] == 4 and meta["lora_alpha"] == 8.0
    f = factors_from_state_dict(sd, meta)
    key = "layers.0.attention.to_q"
    assert torch.allclose(f[key][1], sd[f"transformer.{key}.lora_B.weight"] * 2.0)
    f = factors_from_state_dict(sd, {**meta, "rank_pattern": {"to_q": 2}, "alpha_pattern": {"to_k": 1}})
    assert torch.allclose(f[key][1], sd[f"transformer.{key}.lora_B.weight"] * 4.0)
    k2 = "layers.0.attention.to_k"
    assert torch.allclose(f[k2][1], sd[f"transformer.{k2}.lora_B.weight"] * 0.25)
    assert torch.allclose(factors_from_state_dict(sd, None)[key][1], sd[f"transformer.{key}.lora_B.weight"])


def test_adapter_bytes_match_the_planner(pipe):
    """placement/ is pure: its adapter-size formula against a real adapter of the tiny model on every module, and
    its full-size shapes against the full model's config."""
    import inspect

    from diffusers import ZImageTransformer2DModel

    from actors.lora import build_adapter
    from placement.memory import LORA_SHAPES, lora_adapter_gib

    sd, meta = random_lora_state_dict(pipe.transformer, 8)
    adapter = build_adapter("x", factors_from_state_dict(sd, meta), pipe.transformer)
    assert adapter.nbytes == round(lora_adapter_gib(8, "tiny-z-image", 4) * 2**30)
    c = {k: p.default for k, p in inspect.signature(ZImageTransformer2DModel.__init__).parameters.items()}
    dim, ffn, adaln, modulated, plain = LORA_SHAPES["Z-Image-Turbo"]
    assert (dim, ffn) == (c["dim"], int(c["dim"] / 3 * 8))
    assert (modulated, plain) == (c["n_layers"] + c["n_refiner_layers"], c["n_refiner_layers"])
    assert adapter_nbytes(dim, ffn, adaln, modulated, plain, 32) == round(lora_adapter_gib(32) * 2**30)


def test_no_recompile_per_adapter_set(pipe, adapters):
    """Compiled blocks (dynamic shapes, as a replica compiles them): after a warm-up with and without adapters,
    other adapter sets, ranks and batch mixes compile nothing."""
    eng = ZImageEngine(dict(pipe.components), CPU, torch.float32)
    eng.loras = LoraStore(eng.transformer, max_resident=4)
    for name, path in adapters.items():
        eng.loras.add(name, path)
    eng.packed.compile(backend="eager")
    generate(eng, [Sample("a cat", 1, 32, 32), Sample("a dog in the rain", 2, 48, 32, loras=(("style-a", 1.0),))], 1)
    generate(eng, [Sample("a cat", 1, 32, 32)], 1)
    generate(eng, [Sample("a cat", 1, 32, 32, loras=(("style-b", 1.0),))], 1)
    try:
        with torch.compiler.set_stance("fail_on_recompile"), counted() as missed:
            for batch in (
                    [Sample("x", 3, 64, 32, loras=(("style-c", 0.5),))],
                    [Sample("x", 3, 64, 32, loras=(("style-a", 0.5), ("kohya", 1.0))),
                     Sample("a long prompt about boats", 4, 32, 32, 2.0, loras=(("style-b", 1.0),)),
                     Sample("y", 5, 32, 48)],
                    [Sample("z", 6, 32, 32, loras=(("kohya", 1.0),)), Sample("w", 7, 32, 32)]):
                generate(eng, batch, 1)
        assert not missed, missed  # every call had its graph: none fell back to eager
    finally:
        torch._dynamo.reset()


def test_loras_field_parsing():
    from orchestrator.requests import parse_loras
    from zimage_common.errors import InvalidRequestError

    assert parse_loras(None) == ()
    assert parse_loras([{"name": "a"}, {"name": "b", "scale": 0.5}, ("c", 2)], {"a", "b", "c"}) == (
        ("a", 1.0), ("b", 0.5), ("c", 2.0))
    for bad, text in (([{"name": "zz"}], "unknown LoRA adapter 'zz'; registered: a"),
                      ([{"name": "a", "scale": float("nan")}], "scale must be a number"),
                      ([{"name": "a", "scale": 11}], "scale must be a number from -10 to 10"),
                      ([{"name": "a"}] * 9, "at most 8"), ("a", "must be a list"), ([3], "must be an object")):
        with pytest.raises(InvalidRequestError, match=text) as e:
            parse_loras(bad, {"a"})
        assert e.value.param == "loras"


# ---- runtime registration: where files may be read from, and what a client is told ----------------------------
def _bad_metadata_lora(pipe, directory, **meta_override):
    sd, meta = random_lora_state_dict(pipe.transformer, 4)
    return save_diffusers_lora(directory, sd, {**meta, **meta_override})


def test_read_state_dict_stays_inside_its_root(pipe, tmp_path):
    """``root``: relative or absolute paths inside it; '..', absolute paths outside and symlinks that lead out are
    refused alike (whether or not the target exists), and no message names a directory above the root."""
    import os

    from actors.lora import confine

    root, outside = tmp_path / "loras", tmp_path / "private"
    sd, meta = random_lora_state_dict(pipe.transformer, 4)
    good = save_diffusers_lora(root / "good", sd, meta)
    secret = save_diffusers_lora(outside / "secret", sd, meta)
    assert set(read_state_dict("good/pytorch_lora_weights.safetensors", root)[0]) == set(sd)
    assert set(read_state_dict("good", root)[0]) == set(read_state_dict(good, root)[0]) == set(sd)
    (root / "link.safetensors").symlink_to(secret)
    (root / "linkdir").symlink_to(secret.parent, target_is_directory=True)
    (root / "mixed").mkdir()
    (root / "mixed" / "a.safetensors").symlink_to(secret)
    (root / "loop").symlink_to(root / "loop")
    escapes = ["../private/secret/pytorch_lora_weights.safetensors", str(secret), "../private/nothing-here",
               "/nonexistent/x.safetensors", "link.safetensors", "linkdir", "linkdir/pytorch_lora_weights.safetensors",
               "mixed", "good/../../private/secret", "loop"]
    messages = set()
    for path in escapes:
        with pytest.raises(LoraError, match="outside the directory adapters are read from") as e:
            read_state_dict(path, root)
        assert str(tmp_path) not in str(e.value), str(e.value)
        messages.add(str(e.value))
    assert len(messages) == 1  # an existing file outside and a missing one get the same answer
    (root / "empty").mkdir()
    for path, text in (("missing.safetensors", "no adapter at 'missing.safetensors'"),
                       ("good/pytorch_lora_weights.bin", "no adapter at"),
                       ("empty", "'empty' holds no .safetensors file")):
        with pytest.raises(LoraError, match=text) as e:
            read_state_dict(path, root)
        assert str(tmp_path) not in str(e.value)
    (root / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(LoraError, match="not a .safetensors file"):
        read_state_dict("weights.bin", root)
    (root / "junk.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{garbage")
    with pytest.raises(LoraError, match="'junk.safetensors' is not a Z-Image LoRA diffusers can read") as e:
        read_state_dict("junk.safetensors", root)
    assert str(tmp_path) not in str(e.value)
    assert confine(os.path.join(root, "good"), root)[1] == "good"
    assert read_state_dict(secret)[0].keys() == sd.keys()  # no root (model.loras): the operator's path, as given


def test_hub_snapshot_layout_links_into_blobs(pipe, tmp_path):
    """A Hugging Face cache: the snapshot's file is a link into the repository's blobs/ (no .safetensors name);
    it is read through its link, and a link that leaves the repository folder is refused."""
    import os

    repo = tmp_path / "models--someone--lora"
    sd, meta = random_lora_state_dict(pipe.transformer, 4)
    saved = save_diffusers_lora(tmp_path / "src", sd, meta)
    (repo / "blobs").mkdir(parents=True)
    os.replace(saved, repo / "blobs" / "3f2a9c")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "lora.safetensors").symlink_to("../../blobs/3f2a9c")
    assert set(read_state_dict(snap / "lora.safetensors", repo)[0]) == set(sd)
    assert set(read_state_dict(snap, repo)[0]) == set(sd)
    (snap / "evil.safetensors").symlink_to(tmp_path / "src" / "elsewhere.safetensors")
    with pytest.raises(LoraError, match="outside the directory"):
        read_state_dict(snap / "evil.safetensors", repo)
    with pytest.raises(LoraError, match="NUL"):
        read_state_dict("a\0b.safetensors", repo)


@pytest.mark.parametrize("override,text", [
    ({"rank_pattern": {"(": 2}}, "rank_pattern key that is not a module name: '\\('"),
    ({"alpha_pattern": {"to_q[": 2}}, "alpha_pattern key that is not a module name"),
    ({"rank_pattern": {"(a|aa)+$": 2}}, "not trusted to carry regular expressions"),
    ({"rank_pattern": {"to_q": 0}}, "a finite positive number expected"),
    ({"rank_pattern": ["to_q"]}, "rank_pattern of type list"),
    ({"r": "four"}, "has r = 'four'"),
    ({"lora_alpha": -1}, "non-negative number expected"),
])
def test_bad_peft_metadata_is_a_lora_error(pipe, tmp_path, override, text):
    store = LoraStore(pipe.transformer)
    path = _bad_metadata_lora(pipe, tmp_path / "bad", **override)
    with pytest.raises(LoraError, match=text):
        store.add("x", path, root=tmp_path)
    assert store.names() == []


def test_hub_paths_stay_inside_the_snapshot():
    from zimage_common.config import LoraSpec

    for bad in ("../x.safetensors", "/etc/x.safetensors", "a/../../x", "~/x.safetensors"):
        with pytest.raises(ValueError, match="inside the hub snapshot"):
            LoraSpec(name="x", source="huggingface", model_id="a/b", path=bad)
    assert LoraSpec(name="x", source="huggingface", model_id="a/b", path="sub/x.safetensors").path


def test_lora_registration_body_is_strict():
    from orchestrator.requests import parse_lora_registration
    from zimage_common.errors import InvalidRequestError

    assert parse_lora_registration({"name": "a", "path": "a.safetensors", "revision": None}) == {
        "name": "a", "path": "a.safetensors", "revision": None}
    for body, param in (({"name": "x", "self": 1}, "self"), ({"name": "x", "path": "p", "weight": 1}, "weight"),
                        ({"name": "x", "path": 3}, "path"), ({"name": None}, "name"), ({"path": "p"}, "name"),
                        (["x"], "name"), ({"name": "x", "source": {"a": 1}}, "source")):
        with pytest.raises(InvalidRequestError) as e:
            parse_lora_registration(body)
        assert e.value.param == param, (body, e.value)


# ---- the registry over HTTP, on replicas that are the real worker methods without Ray ---------------------------
@pytest.fixture
def registry(pipe, tmp_path):
    """The HTTP server with a Deployment on a fake backend whose replicas answer register_lora / unregister_lora /
    loras with ``PipelineWorker``'s own methods over a LoraStore of the tiny transformer; model.lora_dir set."""
    from types import SimpleNamespace

    from conftest import ServerThread, tiny_config
    from test_replicas import FakeBackend, FakeNode

    from actors.worker import PipelineWorker
    from orchestrator.deployment import Deployment
    from orchestrator.server import create_app

    root, outside = tmp_path / "loras", tmp_path / "private"
    sd, meta = random_lora_state_dict(pipe.transformer, 4)
    save_diffusers_lora(root / "good", sd, meta)
    save_diffusers_lora(outside / "secret", sd, meta)
    (root / "link.safetensors").symlink_to(outside / "secret" / "pytorch_lora_weights.safetensors")
    _bad_metadata_lora(pipe, root / "bad-meta", rank_pattern={"(": 2})
    _bad_metadata_lora(pipe, root / "hostile", rank_pattern={"(a|aa)+$" + "|x" * 100: 2})  # backtracks forever
    cfg = tiny_config(tmp_path / "cache", model={"lora_max_resident": 2, "lora_dir": str(root),
                                                 "loras": [{"name": "configured", "path": str(root / "good")}]},
                      deployment={"replicas": 2, "health_interval_s": 3600})

    class Backend(FakeBackend):
        def make_replica(self, spec, encoder_host=None):
            r = super().make_replica(spec, encoder_host)
            worker = SimpleNamespace(engine=SimpleNamespace(loras=LoraStore(pipe.transformer, 2)), model_cfg=cfg.model,
                                     replica_id=spec.replica_id)

            async def call(method, *args, **kwargs):
                return getattr(PipelineWorker, method)(worker, *args, **kwargs)

            r.call = call
            return r

    backend = Backend(FakeNode("n0", "id0"), FakeNode("n1", "id1"))

    async def factory(config, observer=None):
        return await Deployment.start(config, observer=observer, backend=backend)

    with ServerThread(create_app(cfg, deployment_factory=factory)) as s:
        yield s.wait_ready(), tmp_path


def test_runtime_registry_over_http(registry):
    import httpx

    server, tmp = registry
    url = f"{server.url}/v1/loras"

    def post(body):
        return httpx.post(url, json=body, timeout=60)

    r = post({"name": "rel", "path": "good"})
    assert r.status_code == 201 and r.json()["replicas"] == {"r0": "gpu", "r1": "gpu"}, r.text
    assert post({"name": "abs", "path": str(tmp / "loras" / "good" / "pytorch_lora_weights.safetensors")}) \
        .status_code == 201
    for body, status, param, text in (
            ({"name": "x", "path": "../private/secret"}, 400, "path", "outside the directory"),
            ({"name": "x", "path": str(tmp / "private" / "secret")}, 400, "path", "outside the directory"),
            ({"name": "x", "path": "/nonexistent/a.safetensors"}, 400, "path", "outside the directory"),
            ({"name": "x", "path": "link.safetensors"}, 400, "path", "outside the directory"),
            ({"name": "x", "path": "missing.safetensors"}, 400, "path", "no adapter at 'missing.safetensors'"),
            ({"name": "x", "path": "bad-meta"}, 400, "path", "rank_pattern key that is not a module name"),
            ({"name": "x", "path": "hostile"}, 400, "path", "not trusted to carry regular expressions"),
            ({"name": "x", "source": "huggingface", "model_id": "someone/lora"}, 403, "source",
             "model.lora_runtime_hub"),
            ({"name": "x", "source": "huggingface", "model_id": "a/b", "path": "../../x"}, 400, "path",
             "inside the hub snapshot"),
            ({"name": "configured", "path": "good"}, 409, "name", "configured (model.loras)"),
            ({"name": "x", "path": "good", "self": 1}, 400, "self", "unknown field"),
            ({"name": "x", "path": 7}, 400, "path", "must be a string")):
        t0 = time.perf_counter()
        r = post(body)
        assert time.perf_counter() - t0 < 1.0, body
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and text in err["message"], (body, err)
        assert str(tmp) not in err["message"], err  # nothing of the host's directories above model.lora_dir
    listed = httpx.get(url)
    names = [(x["name"], x["runtime"]) for x in listed.json()["data"]]
    assert names == [("abs", True), ("configured", False), ("rel", True)]  # every refusal left nothing behind
    assert str(tmp) not in listed.text  # paths relative to model.lora_dir, never the host's
    assert [x["path"] for x in listed.json()["data"]] == ["good/pytorch_lora_weights.safetensors", "good", "good"]

    r = httpx.delete(f"{url}/configured")
    assert r.status_code == 409 and r.json()["error"]["param"] == "name" and "restart" in r.json()["error"]["message"]
    assert httpx.delete(f"{url}/rel").json() == {"name": "rel", "deleted": True}
    assert httpx.delete(f"{url}/rel").status_code == 404
    assert [x["name"] for x in httpx.get(url).json()["data"]] == ["abs", "configured"]


def test_runtime_registration_is_refused_without_lora_dir(tmp_path):
    import asyncio

    from conftest import tiny_config

    from orchestrator.deployment import Deployment
    from zimage_common.errors import ForbiddenError

    cfg = tiny_config(tmp_path, model={"lora_max_resident": 1})
    dep = Deployment(cfg, backend=object())
    with pytest.raises(ForbiddenError, match="sets model.lora_dir") as e:
        asyncio.run(dep.register_lora("x", "/etc/passwd"))
    assert e.value.param == "path" and e.value.http_status == 403
    from zimage_common.errors import InvalidRequestError

    for kwargs, field in (({}, "path"), ({"source": "huggingface"}, "model_id")):  # the field that is missing
        with pytest.raises(InvalidRequestError) as e:
            asyncio.run(dep.register_lora("x", **kwargs))
        assert e.value.param == field, (kwargs, e.value.param, e.value.message)


def test_runtime_adapters_stop_at_their_cap(tmp_path):
    """300 registrations with distinct names: model.lora_max_runtime of them are kept, the rest are refused with a
    409 naming the setting; model.lora_max_runtime_bytes refuses an adapter that does not fit beside the others,
    and a removal makes room again."""
    import asyncio

    from conftest import tiny_config
    from test_replicas import FakeBackend, FakeNode

    from orchestrator.deployment import Deployment
    from zimage_common.errors import ConflictError

    sizes = {}

    class Backend(FakeBackend):
        def make_replica(self, spec, encoder_host=None):
            r = super().make_replica(spec, encoder_host)
            held = {}

            async def call(method, *args, **kwargs):
                if method == "register_lora":
                    held[args[0]["name"]] = sizes.get(args[0]["path"], 1000)
                    return {"ok": True, "info": {"bytes": held[args[0]["name"]]}}
                if method == "unregister_lora":
                    return held.pop(args[0], None) is not None
                return [{"name": n, "rank": 4, "modules": [], "bytes": b, "resident": True} for n, b in held.items()]

            r.call = call
            return r

    cfg = tiny_config(tmp_path, model={"lora_max_resident": 2, "lora_dir": str(tmp_path), "lora_max_runtime": 16,
                                       "lora_max_runtime_bytes": 20_000},
                      deployment={"replicas": 2, "health_interval_s": 3600})

    async def run():
        dep = await Deployment.start(cfg, backend=Backend(FakeNode("n0", "id0"), FakeNode("n1", "id1")))
        try:
            outcomes = []
            for i in range(300):
                try:
                    await dep.register_lora(f"a{i}", "x.safetensors")
                    outcomes.append(201)
                except ConflictError as e:
                    assert e.param == "name" and "model.lora_max_runtime = 16" in e.message
                    outcomes.append(e.http_status)
            assert outcomes == [201] * 16 + [409] * 284
            await dep.register_lora("a3", "x.safetensors")  # replacing one is not one more
            sizes["big.safetensors"] = 6000
            await dep.unregister_lora("a0")
            with pytest.raises(ConflictError, match="model.lora_max_runtime_bytes = 20000") as e:
                await dep.register_lora("big", "big.safetensors")  # 15 x 1000 + 6000 is over 20000
            assert e.value.param == "path"
            await dep.unregister_lora("a1")
            await dep.unregister_lora("a2")
            await dep.register_lora("big", "big.safetensors")
            assert len([x for x in await dep.loras() if x["runtime"]]) == 14
            # a DELETE of a name right behind its registration: the registration still answers with its entry
            # (it listed the adapters after releasing the lock, and found none: StopIteration, a 500)
            for _ in range(20):
                entry, _removed = await asyncio.gather(dep.register_lora("race", "x.safetensors"),
                                                       dep.unregister_lora("race"))
                assert entry["name"] == "race"
        finally:
            await dep.shutdown()

    asyncio.run(run())


# ---- edges ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good(pipe, tmp_path_factory):
    sd, meta = random_lora_state_dict(pipe.transformer, 4, seed=1, alpha=8.0, std=0.15)
    return save_diffusers_lora(tmp_path_factory.mktemp("good") / "good", sd, meta).parent


def _engine(pipe, max_resident=4):
    eng = ZImageEngine(dict(pipe.components), CPU, torch.float32)
    eng.loras = LoraStore(eng.transformer, max_resident=max_resident)
    return eng


def _nan_adapter(pipe, directory):
    sd, meta = random_lora_state_dict(pipe.transformer, 4, seed=9, std=0.15)
    key = next(k for k in sd if k.endswith("layers.0.attention.to_q.lora_A.weight"))
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("nan")
    return save_diffusers_lora(directory, sd, meta).parent


def _inf_alpha_adapter(pipe, directory):
    sd, meta = random_lora_state_dict(pipe.transformer, 4, seed=9, std=0.15)
    return save_diffusers_lora(directory, sd, {**meta, "lora_alpha": float("inf")}).parent


@pytest.mark.parametrize("make", [_nan_adapter, _inf_alpha_adapter], ids=["nan-weight", "inf-alpha-metadata"])
def test_non_finite_adapter_does_not_poison_batch_mates(pipe, good, tmp_path, make):
    """An adapter whose factors are not finite (a NaN weight, or lora_alpha = Infinity in its PEFT header, which
    ``_check_metadata`` must not let through) must be refused at registration, or at least leave the other samples
    of its batch alone: the stacked ``(x @ A_cat^T) * S`` multiplies its NaN columns by the batch-mates' scale 0
    (NaN * 0 = NaN), so every sample of the batch, with another adapter or none, would be ruined."""
    eng = _engine(pipe)
    eng.loras.add("good", good)
    try:
        eng.loras.add("bad", make(pipe, tmp_path / "bad"))
    except LoraError:
        return  # refused with a clear per-adapter error: fine
    mates = [Sample("a cat", 1, 32, 32, loras=(("good", 1.0),)), Sample("a dog", 2, 32, 32)]
    solo = [generate(eng, [s], 2)[0][0] for s in mates]
    batch, _ = generate(eng, mates + [Sample("a boat", 3, 32, 32, loras=(("bad", 1.0),))], 2)
    for s, alone, img in zip(mates, solo, batch):
        assert _close(alone, img), (s.prompt, "changed by a batch-mate's non-finite adapter",
                                    int(np.abs(alone.astype(int) - img.astype(int)).max()))


# ---- the deployment's registry: replicas that are PipelineWorker's own methods over a real LoraStore ------------
def _deployment(pipe, tmp_path, dirs):
    """A Deployment on a fake backend of two replicas, r0 and r1, each running ``PipelineWorker``'s own
    register_lora / unregister_lora / loras over a LoraStore of the tiny transformer, r_i reading runtime adapters
    from ``dirs[i]`` (model.lora_dir is a path on each replica's machine: their files may differ)."""
    from types import SimpleNamespace

    from conftest import tiny_config
    from test_replicas import FakeBackend, FakeNode

    from actors.worker import PipelineWorker
    from orchestrator.deployment import Deployment

    cfg = tiny_config(tmp_path / "cache", model={"lora_max_resident": 2, "lora_dir": str(dirs[0])},
                      deployment={"replicas": 2, "health_interval_s": 3600})
    stores = {}

    class Backend(FakeBackend):
        def make_replica(self, spec, encoder_host=None):
            r = super().make_replica(spec, encoder_host)
            i = int(spec.replica_id[1:])
            model_cfg = cfg.model.model_copy(update={"lora_dir": dirs[i]})
            store = stores[spec.replica_id] = LoraStore(pipe.transformer, 2)
            worker = SimpleNamespace(engine=SimpleNamespace(loras=store), model_cfg=model_cfg,
                                     replica_id=spec.replica_id)

            async def call(method, *args, **kwargs):
                return getattr(PipelineWorker, method)(worker, *args, **kwargs)

            r.call = call
            return r

    async def start():
        return await Deployment.start(cfg, backend=Backend(FakeNode("n0", "id0"), FakeNode("n1", "id1")))

    return start, stores


def test_failed_replacement_leaves_replicas_consistent(pipe, tmp_path):
    """``POST /v1/loras`` with the name of a runtime adapter replaces it, all or none. Here the new file loads on
    r0 and is refused on r1 (model.lora_dir is read on each replica's machine). r0 has already replaced the old
    adapter, so the front door and every replica must end up agreeing (here: the name is gone everywhere), never
    the front door accepting a name that one replica lacks."""
    from zimage_common.errors import InvalidRequestError

    d0, d1 = tmp_path / "m0", tmp_path / "m1"
    sd, meta = random_lora_state_dict(pipe.transformer, 4, seed=1)
    for d in (d0, d1):
        save_diffusers_lora(d / "v1", sd, meta)
    sd2, meta2 = random_lora_state_dict(pipe.transformer, 4, seed=2)
    save_diffusers_lora(d0 / "v2", sd2, meta2)  # only on r0's machine
    start, stores = _deployment(pipe, tmp_path, (d0, d1))

    async def run():
        dep = await start()
        try:
            await dep.register_lora("x", "v1")
            assert all("x" in s for s in stores.values())
            with pytest.raises(InvalidRequestError):
                await dep.register_lora("x", "v2")
            listed = "x" in dep.lora_names
            held = {rid: "x" in s for rid, s in stores.items()}
            # whatever the outcome, every replica must agree with the front door
            assert all(v == listed for v in held.values()), (
                f"front door accepts 'x': {listed}; replicas holding it: {held}")
        finally:
            await dep.shutdown()

    asyncio.run(run())


def test_rank_zero_adapter_is_refused_or_runs(pipe, tmp_path):
    """An adapter file whose lora_A/lora_B are rank 0 (``[0, in]`` / ``[out, 0]``: well-formed tensors, consistent
    shapes) must be refused at registration (a 400 naming ``path``) or run as no adapter; accepted, every request
    naming it alone would fail inside the step (``packed._lora_h`` on R = 0), a replica error for the router."""
    sd, meta = random_lora_state_dict(pipe.transformer, 4)
    sd = {k: (v[:0] if ".lora_A." in k else v[:, :0]) for k, v in sd.items()}
    eng = _engine(pipe)
    try:
        eng.loras.add("zero", save_diffusers_lora(tmp_path / "zero", sd, meta).parent, max_rank=64)
    except LoraError:
        return  # refused with the reason: fine
    plain, _ = generate(eng, [Sample("a cat", 1, 32, 32)], 2)
    zero, _ = generate(eng, [Sample("a cat", 1, 32, 32, loras=(("zero", 1.0),))], 2)
    assert np.array_equal(plain[0], zero[0])


def test_running_request_keeps_its_adapter_whatever_joins(pipe, tmp_path):
    """A runtime adapter replaced (POST /v1/loras with its name) while a request naming it runs. The step loop
    reuses the running set's packed call, stacked adapters included, until the set changes
    (actors/steploop.py ``_step``); a re-stack must use the adapters the sample pinned when it was made
    (``LoraStore.pin``), or its remaining steps would switch to the new weights if and only if another request
    joined its set: its image would depend on its batch-mates."""
    from actors.steploop import StepLoop, finish, prepare

    sd1, meta1 = random_lora_state_dict(pipe.transformer, 4, seed=1, std=0.3)
    sd2, meta2 = random_lora_state_dict(pipe.transformer, 4, seed=2, std=0.3)
    v1 = save_diffusers_lora(tmp_path / "v1", sd1, meta1).parent
    v2 = save_diffusers_lora(tmp_path / "v2", sd2, meta2).parent

    def run(with_mate: bool, replace: bool = True):
        eng = _engine(pipe)
        eng.loras.add("x", v1)
        loop = StepLoop(eng)
        ga, ta = prepare(eng, [Sample("a cat", 1, 32, 32, loras=(("x", 1.0),))], 4)
        loop.submit(ga, start=False)
        loop._guarded(wait=False)  # step 1 of 4 with x = v1
        if replace:
            eng.loras.add("x", v2)  # replaced while it runs
        if with_mate:  # an unrelated request (no adapter) joins the running set
            gb, _ = prepare(eng, [Sample("a dog", 2, 32, 32)], 4)
            loop.submit(gb, start=False)
        while not ga.done.is_set():
            loop._guarded(wait=False)
            if with_mate:
                assert loop.running in (0, 2) or ga.done.is_set()
        return finish(eng, ga, ta)[0][0]

    assert _close(run(False, replace=False), run(True, replace=False))  # joining alone changes nothing
    alone, beside = run(False), run(True)
    assert _close(alone, beside), int(np.abs(alone.astype(int) - beside.astype(int)).max())


def test_oversized_batch_holds_its_adapters_for_that_batch_only(pipe, tmp_path):
    """docs/lora.md: a batch with more distinct adapters than lora_max_resident runs on its stacked copy (the
    planner counts 2 x lora_max_resident adapters on the GPU): after the batch, at most lora_max_resident stay on
    the device (and ``GET /v1/loras`` reports no more as "gpu")."""
    eng = _engine(pipe, max_resident=2)
    for i in range(3):
        sd, meta = random_lora_state_dict(pipe.transformer, 4, seed=10 + i)
        eng.loras.add(f"a{i}", save_diffusers_lora(tmp_path / f"a{i}", sd, meta).parent)
    generate(eng, [Sample("a cat", 1, 32, 32, loras=(("a0", 1.0), ("a1", 1.0), ("a2", 1.0)))], 1)
    resident = [i["name"] for i in eng.loras.info() if i["resident"]]
    assert len(resident) <= 2, f"after the batch, resident: {resident} (lora_max_resident = 2)"
