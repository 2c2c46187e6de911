"""The replica class without Ray: start, run batches, failures as data."""

import io
import time

import numpy as np
import pytest
from PIL import Image

from actors.worker import PipelineWorker, WarmupSpec
from zimage_common.config import ModelConfig
from zimage_common.messages import Batch, ImageRequest


def req(i, prompt="a cat", seed=None, size=64):
    return ImageRequest(f"q{i}", prompt, seed if seed is not None else i, size, size, 2, 0.0)


@pytest.fixture(scope="module")
def worker(tiny_cache):
    w = PipelineWorker("r0", ModelConfig(source="tiny", dtype="float32", cache_dir=tiny_cache),
                       warmup=WarmupSpec(((32, 32),), 1), torch_threads=1)
    health = w.start()
    assert health.ready and health.device_map["transformer"] == "cpu" and health.dtype == "float32"
    return w


def test_run_batch_returns_pngs(worker):
    out = worker.run_batch(Batch(7, (req(1), req(2, "a dog"))))
    assert [r.request_id for r in out.results] == ["q1", "q2"]
    for r in out.results:
        assert r.ok and r.batch_id == 7 and r.batch_size == 2 and r.replica_id == "r0"
        assert r.image.shape == (64, 64, 3) and r.image.dtype == np.uint8
        assert Image.open(io.BytesIO(r.png)).size == (64, 64)
    assert out.stage_times.denoise_s > 0


def test_same_seed_same_image_in_any_batch(worker):
    alone = worker.run_batch(Batch(1, (req(5, "a fox", seed=42),))).results[0]
    mixed = worker.run_batch(Batch(2, (req(6, "other", seed=1), req(7, "a fox", seed=42)))).results[1]
    a, b = alone.image.astype(int), mixed.image.astype(int)
    assert np.abs(a - b).max() <= 1  # fp32 batched vs single differ below 1e-5 before quantisation


def test_mixed_sizes_share_a_batch_and_equal_solo_runs(worker):
    """One batch, three sizes and prompt lengths: each image has its request's size and equals its solo run."""
    reqs = (ImageRequest("m1", "a fox", 3, 64, 32, 2, 0.0), ImageRequest("m2", "a much longer prompt " * 5, 4, 32, 96,
                                                                          2, 0.0),
            ImageRequest("m3", "x", 5, 48, 48, 2, 2.5, "blurry"))
    out = worker.run_batch(Batch(9, reqs))
    for r, q in zip(out.results, reqs):
        assert r.ok and r.image.shape == (q.height, q.width, 3) and r.batch_size == 3
        solo = worker.run_batch(Batch(10, (q,))).results[0]
        assert np.abs(r.image.astype(int) - solo.image.astype(int)).max() <= 1


def test_warmup_plan_covers_one_several_and_mixed_within_limits():
    spec = WarmupSpec(((1024, 1024), (512, 512), (2048, 2048), (768, 1344)), 2, max_pixels=1536 * 1536,
                      max_batch_tokens=10_000)
    batches = spec.batches()
    assert batches[0] == [(1024, 1024, batches[0][0][2])]  # one image alone
    assert len(batches[1]) == 2 and batches[1][0] == batches[1][1]  # two of one size, one prompt
    mixed = [b for b in batches[2:]]
    sizes = {(w, h) for b in mixed for w, h, _ in b}
    assert sizes == {(1024, 1024), (512, 512), (768, 1344)}  # 2048^2 is past this replica's plan
    assert len({p for b in mixed for _, _, p in b}) > 1  # different prompt lengths
    assert all(sum(ImageRequest("w", p, 0, w, h, 2, 0.0).tokens for w, h, p in b) <= 10_000 for b in mixed)


def test_encoder_warmup_shapes_span_lengths_and_batches_within_the_budget():
    spec = WarmupSpec(((1024, 1024), (512, 512), (2048, 2048)), 2, max_pixels=1536 * 1536, max_batch_tokens=18_432,
                      max_batch_size=16)
    shapes = spec.encoder_shapes()
    assert {n for _, n in shapes} == {64, 128, 256, 512}  # short to the longest caption kept (512 tokens)
    assert {b for b, _ in shapes} == {1, 4, 16}  # 32 prompts (16 with guidance) never fit this budget
    assert (1, 512) in shapes and (4, 512) in shapes
    # a batch of that many prompts at the smallest size within the plan (512^2: 1024 image tokens) fits the budget
    assert all(b == 1 or b * (1024 + n) <= 18_432 for b, n in shapes)
    assert (16, 256) not in shapes
    assert {b for b, _ in WarmupSpec(((32, 32),), 1, max_batch_size=3).encoder_shapes()} == {1, 3, 4, 6}


def test_encoder_prewarm_runs_each_shape_with_right_padding(worker):
    engine = worker.engine
    seen = []
    real = engine.encoder.forward

    def spy(input_ids=None, attention_mask=None, **kw):
        seen.append((tuple(input_ids.shape), attention_mask.sum(1).tolist()))
        return real(input_ids=input_ids, attention_mask=attention_mask, **kw)

    engine.encoder.forward = spy
    try:
        out = engine.prewarm_encoder([(1, 16), (4, 8)])
    finally:
        del engine.encoder.forward
    assert [(b, n) for b, n, _ in out] == [(1, 16), (4, 8)] and all(t >= 0 for *_, t in out)
    assert seen == [((1, 16), [16]), ((4, 8), [8, 7, 6, 5])]  # one prompt unpadded; the first row full, as in serving


def test_encoder_warmup_runs_on_the_encode_stage_thread_and_graphs_fall_back_to_it(worker, monkeypatch, caplog):
    import threading

    import torch

    assert worker._start_encoder_warmup().result(timeout=5) == "text encoder: nothing to warm up"  # CPU
    ran = []

    def capture():
        ran.append(("capture", threading.current_thread().name))
        return 48, 1.25, 300 * 2**20

    def prewarm(shapes):
        ran.append(("prewarm", threading.current_thread().name))
        return [(b, n, 0.01) for b, n in shapes]

    monkeypatch.setattr(worker.engine, "capture_encoder_graphs", capture)
    monkeypatch.setattr(worker.engine, "prewarm_encoder", prewarm)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    where = f"encode-{worker.replica_id}"  # where serving encodes
    shapes = len(worker.warmup_spec.encoder_shapes())
    assert worker._start_encoder_warmup().result(timeout=60).startswith(f"text encoder run at {shapes} (prompts, ")
    assert ran == [("prewarm", where)]

    ran.clear()
    line = worker._stages.run("encode", worker._capture_encoder)
    assert line == "text encoder: 48 CUDA graphs captured in 1.2s (300 MiB of memory)" and ran == [("capture", where)]

    def fails():  # a forward that cannot be captured: warned about, and the encoder is warmed up eager instead
        raise RuntimeError("operation not permitted when stream is capturing")

    ran.clear()
    monkeypatch.setattr(worker.engine, "capture_encoder_graphs", fails)
    line = worker._stages.run("encode", worker._capture_encoder)
    assert ran == [("prewarm", where)] and line.startswith(f"text encoder run at {shapes} (prompts, length) shapes")
    assert "could not be captured (RuntimeError: operation not permitted" in caplog.text


def test_encoder_graphs_only_where_asked_with_a_warmup_on_cuda_and_an_encoder_of_its_own(worker, monkeypatch):
    import torch

    assert worker.model_cfg.text_encoder_graphs is True  # the default
    assert not worker._encoder_graphs_wanted()  # on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(worker, "model_cfg", worker.model_cfg.model_copy(update={"text_encoder_graphs": False}))
    assert not worker._encoder_graphs_wanted()  # turned off
    monkeypatch.undo()
    assert not worker._encoder_graphs_wanted()  # on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert worker._encoder_graphs_wanted()
    monkeypatch.setattr(worker, "warmup_spec", None)
    assert not worker._encoder_graphs_wanted()  # no warm-up: nothing captured either
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(worker, "model_cfg", worker.model_cfg.model_copy(update={"text_encoder_graphs": True}))
    monkeypatch.setattr(worker.engine, "text_encoder", None)
    assert not worker._encoder_graphs_wanted()  # a remote encoder (shared-encoder mode)


def test_failure_comes_back_as_data(worker):
    worker.inject_fault("raise", message="boom")
    try:
        out = worker.run_batch(Batch(3, (req(1), req(2))))
    finally:
        worker.inject_fault(None)
    assert all(not r.ok and r.error_type == "replica_error" and "boom" in r.error for r in out.results)
    assert worker.run_batch(Batch(4, (req(1),))).results[0].ok  # still serving


def test_oom_is_classified(worker):
    worker.inject_fault("oom_above", max_batch=1)
    try:
        out = worker.run_batch(Batch(5, (req(1), req(2))))
        single = worker.run_batch(Batch(6, (req(1),)))
    finally:
        worker.inject_fault(None)
    assert {r.error_type for r in out.results} == {"out_of_memory"}
    assert single.results[0].ok


def test_concurrent_calls_give_their_solo_images(worker):
    from concurrent.futures import ThreadPoolExecutor

    batches = [Batch(i, (req(2 * i, f"prompt {i}"), req(2 * i + 1, f"other {i}"))) for i in range(4)]
    with ThreadPoolExecutor(3) as pool:  # three calls in flight, as the router sends them: they share the loop
        concurrent = list(pool.map(worker.run_batch, batches))
    for b, out in zip(batches, concurrent):
        alone = worker.run_batch(b)
        for x, y in zip(out.results, alone.results):
            assert x.ok and np.abs(x.image.astype(int) - y.image.astype(int)).max() <= 1


def test_not_started_worker_fails_requests():
    w = PipelineWorker("rx", ModelConfig(source="tiny"))
    out = w.run_batch(Batch(0, (req(1),)))
    assert out.results[0].error_type == "not_ready"


def test_text_encoder_quantization_is_applied_and_measured_at_start(tiny_cache):
    from actors.quantize import WeightOnlyLinear

    w = PipelineWorker("rq", ModelConfig(source="tiny", dtype="float32", cache_dir=tiny_cache,
                                         text_encoder_quantization="int8"), torch_threads=1)
    h = w.start()
    assert any(isinstance(m, WeightOnlyLinear) for m in w.engine.text_encoder.modules())
    assert 0 < h.numerics["text_encoder_embed_rel_l2"] < 0.01 and h.numerics["text_encoder_image_psnr_db"] > 40
    assert w.run_batch(Batch(1, (req(1),))).results[0].ok


def test_auto_precision_reaches_the_replicas_as_the_plan_chose():
    from orchestrator.deployment import model_for_plan, plan_for
    from placement import Inventory
    from zimage_common.config import load_config

    cfg = load_config(None, ["model.source=modelscope", "model.dtype=bfloat16", "deployment.replicas=1",
                             "model.quantization=auto",
                             "model.text_encoder_quantization=auto", "cluster.num_gpus=1"])
    p = plan_for(cfg, Inventory.from_nodes([("n", 1, 23.5)]))
    m = model_for_plan(cfg.model, p)
    assert (m.quantization, m.text_encoder_quantization) == ("fp8", "none")


def test_lora_replica_without_ray(tiny_cache, tmp_path):
    """Configured adapters load at start; runtime registration answers as data; a request naming an adapter the
    replica lacks fails alone (400 naming loras) while its batch-mates run; the LoRA warm-up (run on GPUs with
    compile) leaves no adapter of its own and the configured ones resident."""
    from dataclasses import replace

    from actors.lora import random_lora_state_dict, save_diffusers_lora
    from actors.models import build_pipeline

    sd, meta = random_lora_state_dict(build_pipeline("tiny").transformer, 4, std=0.1)
    path = save_diffusers_lora(tmp_path / "a", sd, meta)
    cfg = ModelConfig(source="tiny", dtype="float32", cache_dir=tiny_cache, lora_max_resident=1,
                      loras=[{"name": "a", "path": str(path)}], lora_dir=tmp_path)
    w = PipelineWorker("r0", cfg, warmup=WarmupSpec(((32, 32),), 1), torch_threads=1)
    w.start()
    assert [(i["name"], i["resident"]) for i in w.loras()] == [("a", True)]
    assert w.register_lora({"name": "b", "path": str(tmp_path / "missing")})["ok"] is False
    assert "outside the directory" in w.register_lora({"name": "b", "path": "../x.safetensors"})["error"]
    sd, meta = random_lora_state_dict(build_pipeline("tiny").transformer, 4, std=0.1)
    save_diffusers_lora(tmp_path / "bad", sd, {**meta, "alpha_pattern": {"to_q)": 2}})
    refused = w.register_lora({"name": "b", "path": "bad"})  # data, not a raise
    assert "alpha_pattern key that is not a module name" in refused["error"]
    assert w.register_lora({"name": "b", "path": str(path.parent)})["ok"] is True
    out = w.run_batch(Batch(1, (replace(req(1), loras=(("a", 1.0),)), replace(req(2), loras=(("zz", 1.0),)),
                                 replace(req(3), loras=(("b", 0.5), ("a", 0.5))))))
    ok, bad, both = out.results
    assert ok.ok and both.ok and not bad.ok and bad.param == "loras" and bad.error_type == "invalid_request"
    w._warm_up_loras(w.warmup_spec)
    assert [(i["name"], i["resident"]) for i in w.loras()] == [("a", True), ("b", False)]
    assert w.unregister_lora("b") and not w.unregister_lora("b")


def test_each_stage_runs_on_one_thread_from_warm_up_on(tiny_cache, monkeypatch):
    """cuDNN caches its plans per thread (``actors/stages.py``): each stage's serving work runs on one long-lived
    thread per stage, whichever thread a call comes in on (Ray's pool threads, a streamed call's own thread), and the
    step loop runs on the denoise stage's, so no call pays the plans again. The warm-up's encode and decode run on
    their stages' threads; its steps run on the starting thread, while the denoise stage's own thread builds
    attention's plans for every length (``StartupMixin._start_attention_plans``)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from actors.engine import ZImageEngine
    from actors.steploop import StepLoop

    seen: dict[str, list[str]] = {"encode": [], "denoise": [], "decode": []}

    def record(stage, orig):
        def wrapped(*args, **kwargs):
            seen[stage].append(threading.current_thread().name)
            return orig(*args, **kwargs)
        return wrapped

    for stage, cls, name in (("encode", ZImageEngine, "encode"), ("denoise", ZImageEngine, "step"),
                             ("denoise", StepLoop, "_step"), ("decode", ZImageEngine, "decode_one")):
        monkeypatch.setattr(cls, name, record(stage, getattr(cls, name)))
    w = PipelineWorker("rt", ModelConfig(source="tiny", dtype="float32", cache_dir=tiny_cache),
                       warmup=WarmupSpec(((32, 32),), 1), torch_threads=1)
    w.start()
    assert all(seen.values())  # the warm-up ran every stage
    assert set(seen["encode"]) == {"encode-rt"} and set(seen["decode"]) == {"decode-rt"}
    assert set(seen["denoise"]) == {threading.current_thread().name}
    for names in seen.values():
        names.clear()
    with ThreadPoolExecutor(2) as pool:  # Ray's pool: calls come in on several threads
        outs = list(pool.map(w.run_batch, [Batch(i, (req(i, size=32),)) for i in range(3)]))
        outs.append(pool.submit(w.run_batch, Batch(5, (req(5, size=32),))).result())
    outs.append(list(w.run_batch_stream(Batch(6, (req(6, size=32),))))[-1])  # a streamed call: its own thread
    assert all(r.ok for out in outs for r in out.results)
    for stage, names in seen.items():
        assert set(names) == {f"{stage}-rt"}, (stage, set(names))


def test_calls_waiting_for_the_encoder_share_one_encode_and_a_bad_one_fails_alone(worker):
    """Calls that wait for the encode stage while it is busy are encoded in one text-encoder call (the router sends
    calls as requests arrive), each getting its own embeddings back. When a shared encode fails, each call is
    encoded alone, so only the call at fault fails."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    engine, shared = worker.engine, worker._encodes
    inner = engine._encode
    encodes: list[list[str]] = []

    def record(prompts, *a, **k):
        encodes.append(list(prompts))
        if any("poison" in p for p in prompts):
            raise RuntimeError("an input the encoder cannot take")
        return inner(prompts, *a, **k)

    def together(calls):
        release = threading.Event()
        worker._stages.submit("encode", release.wait, 30)  # the encode stage is busy
        with ThreadPoolExecutor(len(calls)) as pool:
            futures = [pool.submit(shared, *call) for call in calls]
            deadline = time.monotonic() + 30
            while len(shared._waiting) < len(calls) and time.monotonic() < deadline:
                time.sleep(0.01)
            release.set()
            return [f.exception() or f.result()[0] for f in futures]

    calls = [(["a fox"], [None], [0.0]), (["a red door", "x"], ["blurry", None], [2.0, 0.0]),
             (["a harbor at dawn"], [None], [0.0])]
    engine._encode = record
    try:
        outs = together(calls)
        assert [sorted(e) for e in encodes] == [sorted(["a fox", "a red door", "x", "a harbor at dawn", "blurry"])]
        encodes.clear()
        bad = together([(["fine"], [None], [0.0]), (["poison"], [None], [0.0]), (["also fine"], [None], [0.0])])
    finally:
        engine._encode = inner
    for (prompts, negatives, guidance), enc in zip(calls, outs):
        alone = engine.encode(prompts, negatives, guidance)
        assert len(enc.positive) == len(prompts) and len(enc.negative) == len(alone.negative)
        for a, b in zip(enc.positive + enc.negative, alone.positive + alone.negative):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    assert len(encodes) == 4  # the shared one, then each call alone
    assert isinstance(bad[1], RuntimeError) and not isinstance(bad[0], Exception) and not isinstance(bad[2], Exception)


def test_bytecode_cache_note_names_the_fix_only_where_every_process_compiles_sources(tmp_path):
    """A replica warns when Python keeps no bytecode for torch (PYTHONDONTWRITEBYTECODE and no .pyc): then every
    replica process compiles the libraries' sources again (7-11 s of a start on the GPU host)."""
    import importlib.util
    import py_compile

    from actors.worker import bytecode_cache_note

    src = tmp_path / "lib.py"
    src.write_text("x = 1\n")
    note = bytecode_cache_note(str(src), dont_write_bytecode=True)
    assert note and "PYTHONDONTWRITEBYTECODE" in note and "PYTHONPYCACHEPREFIX" in note
    assert bytecode_cache_note(str(src), dont_write_bytecode=False) is None  # the first start writes them
    py_compile.compile(str(src), cfile=importlib.util.cache_from_source(str(src)))
    assert bytecode_cache_note(str(src), dont_write_bytecode=True) is None  # installed with bytecode, as pip does


def test_images_encoded_on_the_replica_equal_the_front_doors_encoding_of_its_pixels(worker):
    """The HTTP service asks replicas for encoded bytes (frontdoor.encode_on_replica): the same image, format and
    compression give the very bytes the front door would make from the pixels; previews come encoded too."""
    from dataclasses import replace

    from zimage_common.image_codec import encode_image

    base = ImageRequest("e0", "a lighthouse", 11, 64, 64, 2, 0.0, partial_images=1)
    raw = worker.run_batch(Batch(20, (base,))).results[0]
    for fmt, q in (("png", None), ("jpeg", 85), ("webp", 90)):
        asked = replace(base, request_id=f"e-{fmt}", output_format=fmt, output_compression=q)
        items = list(worker.run_batch_stream(Batch(21, (asked,))))
        out = items[-1].results[0]
        assert out.ok and out.image is None and out.encoded.format == fmt
        assert out.encoded.data == encode_image(raw.image, fmt, q)
        previews = [p for ev in items[:-1] for p in ev.previews]
        assert previews and all(p[2].format == fmt for p in previews)
    assert worker.intake_stats()["encoder"]["images"] == 3


def test_speed_options_compile_the_blocks_with_the_cpp_wrapper_only_when_asked(worker, monkeypatch):
    """``model.compile`` on the transformer's CUDA device compiles the packed blocks (and the VAE decoder);
    ``model.compile_cpp_wrapper`` adds inductor's C++ wrapper to the blocks' compile, nothing else."""
    import torch

    import actors.compile_cache
    import actors.compiled

    calls = []
    monkeypatch.setattr(worker.engine.packed, "compile", lambda **kw: calls.append(kw))
    monkeypatch.setattr(actors.compiled, "compile_vae_decoder", lambda vae, **kw: calls.append("vae"))
    monkeypatch.setattr(actors.compile_cache, "enable_compile_cache", lambda d: None)
    monkeypatch.setattr(worker.engine, "devices", {**worker.engine.devices, "transformer": torch.device("cuda")})
    for cpp, want in ((False, {}), (True, {"options": {"cpp_wrapper": True}})):
        monkeypatch.setattr(worker, "model_cfg", worker.model_cfg.model_copy(
            update={"compile": True, "compile_cpp_wrapper": cpp}))
        calls.clear()
        worker._apply_speed_options()
        assert calls == [want, "vae"]


@pytest.mark.parametrize("steps", [1, 2])
def test_the_warm_up_edit_runs_the_warm_up_steps(worker, steps):
    """The GPU warm-up's img2img call (``_warm_up_edit``): an edit whose schedule runs exactly the warm-up's steps."""
    images, _ = worker._warm_up_edit(32, 32, "a cat", steps)
    assert len(images) == 1 and images[0].shape == (32, 32, 3)
