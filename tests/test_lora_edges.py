"""Per-request LoRA edges: non-finite and rank-0 adapter files, a replacement some replica refuses, an adapter
replaced while a request naming it runs, and a batch of more adapters than lora_max_resident."""

import asyncio

import numpy as np
import pytest
import torch

from actors.engine import Sample, ZImageEngine
from actors.lora import (
    LoraError,
    LoraStore,
    random_lora_state_dict,
    save_diffusers_lora,
)
from actors.models import build_pipeline
from actors.steploop import generate

CPU = dict.fromkeys(("transformer", "text_encoder", "vae"), "cpu")


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline("tiny", seed=3)


@pytest.fixture(scope="module")
def good(pipe, tmp_path_factory):
    sd, meta = random_lora_state_dict(pipe.transformer, 4, seed=1, alpha=8.0, std=0.15)
    return save_diffusers_lora(tmp_path_factory.mktemp("good") / "good", sd, meta).parent


def _engine(pipe, max_resident=4):
    eng = ZImageEngine(dict(pipe.components), CPU, torch.float32)
    eng.loras = LoraStore(eng.transformer, max_resident=max_resident)
    return eng


def _close(a, b, levels=1):
    return np.abs(a.astype(int) - b.astype(int)).max() <= levels


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
