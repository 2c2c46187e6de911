"""GPU tests: skipped where there is no CUDA. A short benchmark of the full-size random-weight model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from actors.compiled import counted
from actors.steploop import generate

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]


def test_full_size_engine_bf16_on_gpu():
    from actors.engine import Sample, ZImageEngine
    from actors.models import build_components

    comps = build_components("full", device="cuda", dtype=torch.bfloat16)
    eng = ZImageEngine(comps, dict.fromkeys(("transformer", "text_encoder", "vae"), "cuda"), torch.bfloat16)
    images, times = generate(eng, [Sample("a red fox", 1, 512, 512), Sample("a lighthouse at dusk", 2, 768, 512)], 2)
    assert [i.shape for i in images] == [(512, 512, 3), (512, 768, 3)] and times.denoise_s > 0


def test_short_benchmark_on_gpu(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "orchestrator.cli", "bench", "benchmarks/configs/gpu-random.yaml",
           "--set", "deployment.replicas=1",
           "--sizes", "512x512", "--concurrency", "1,2", "--requests", "4",
           "--warmup", "1", "--baseline", "--baseline-requests", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["card"] != "cpu" and report["baseline"]["sizes"]["512x512"]["throughput_img_s"] > 0
    assert all(r["failed"] == 0 and r["throughput_img_s"] > 0 for r in report["runs"])
    assert (out / "bench.png").stat().st_size > 0
    assert all(r["encoder_graphs"] == 48 for r in report["replicas"].values())  # captured at start-up, no fallback


def test_packed_mixed_batch_equals_solo_runs_on_gpu():
    """One packed call over three sizes and caption lengths against diffusers' own forward on each sample alone.
    bf16 differs run to run with the batch around a sample: the bound is diffusers against itself (a sample alone
    and beside a copy of itself), measured in the same test. Then compiled: after the warm-up shapes, new sizes,
    caption lengths and batch sizes compile nothing."""
    from actors.engine import ZImageEngine
    from actors.models import build_components

    comps = build_components("full", device="cuda", dtype=torch.bfloat16)
    eng = ZImageEngine(comps, dict.fromkeys(("transformer", "text_encoder", "vae"), "cuda"), torch.bfloat16)
    g = torch.Generator("cpu").manual_seed(0)

    def batch(sizes, caps):
        lat = [torch.randn(16, 1, h // 8, w // 8, generator=g).to("cuda", torch.bfloat16) for h, w in sizes]
        cap = [torch.randn(n, 2560, generator=g).to("cuda", torch.bfloat16) for n in caps]
        return lat, cap, eng.packed.layout([(1, h // 8, w // 8) for h, w in sizes], caps)

    lat, cap, layout = batch([(1024, 1024), (512, 512), (768, 1344)], [40, 150, 90])
    t = torch.tensor([0.3, 0.6, 0.9], device="cuda")

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    with torch.no_grad():
        out = eng.packed(lat, t, cap, layout)
        errs, floor = [], []
        for i in range(3):
            one = eng.transformer([lat[i]], t[i:i + 1], [cap[i]], return_dict=False)[0][0]
            two = eng.transformer([lat[i], lat[i]], t[i:i + 1].repeat(2), [cap[i], cap[i][:-7]],
                                  return_dict=False)[0][0]
            errs.append(rel(out[i], one))
            floor.append(rel(two, one))
        assert max(errs) <= 1.25 * max(floor) + 2e-3, (errs, floor)
        assert eng.packed.prewarm(64 * 64) == len(eng.packed.sample_lengths(64 * 64))

        eng.packed.compile()
        for sizes, caps in (([(1024, 1024)] * 2, [77, 77]), ([(1024, 1024), (512, 512), (768, 1344)], [40, 150, 90]),
                            ([(1024, 1024)], [12])):
            lat, cap, layout = batch(sizes, caps)
            eng.packed(lat, torch.rand(len(sizes), device="cuda"), cap, layout)
        with torch.compiler.set_stance("fail_on_recompile"), counted() as missed:
            for sizes, caps in (([(512, 512)] * 5, [20, 40, 60, 300, 500]), ([(1344, 768), (256, 256)], [3, 33]),
                                ([(640, 640)], [250])):
                lat, cap, layout = batch(sizes, caps)
                eng.packed(lat, torch.rand(len(sizes), device="cuda"), cap, layout)
        assert not missed, missed  # every call had its graph: none fell back to eager


def test_edits_batched_with_text_to_image_on_gpu():
    """Full size, bf16: a plain sample, an img2img and an inpaint in one packed batch (each runs 2 steps); the VAE
    encode of the input images runs as its own stage."""
    import numpy as np

    from actors.engine import Sample, ZImageEngine
    from actors.models import build_components

    comps = build_components("full", device="cuda", dtype=torch.bfloat16)
    eng = ZImageEngine(comps, dict.fromkeys(("transformer", "text_encoder", "vae"), "cuda"), torch.bfloat16)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (512, 768, 3), dtype=np.uint8)
    mask = np.zeros((512, 768), np.uint8)
    mask[128:384, 192:576] = 255
    samples = [Sample("a red fox", 1, 512, 512),
               Sample("a watercolour", 2, 768, 512, image=image, strength=0.5, num_inference_steps=4),
               Sample("a door", 3, 768, 512, image=image, mask=mask, strength=0.4, num_inference_steps=5)]
    images, times = generate(eng, samples, 2)
    assert [i.shape for i in images] == [(512, 512, 3), (512, 768, 3), (512, 768, 3)]
    assert times.image_encode_s > 0 and all(i.std() > 0 for i in images)


def test_controlnet_batched_with_plain_on_gpu():
    """Full size, bf16, random full-size ControlNet: a controlled and a plain sample in one packed batch."""
    import numpy as np

    from actors.controlnet import build_controlnet
    from actors.engine import Sample, ZImageEngine
    from actors.models import build_components

    comps = build_components("full", device="cuda", dtype=torch.bfloat16)
    comps["controlnet"] = build_controlnet("full", comps["transformer"], device="cuda", dtype=torch.bfloat16)
    eng = ZImageEngine(comps, dict.fromkeys(("transformer", "text_encoder", "vae"), "cuda"), torch.bfloat16)
    control = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    images, times = generate(eng, [Sample("a red fox", 1, 512, 512),
                                  Sample("a house", 2, 512, 512, control_image=control, control_scale=0.75)], 2)
    assert [i.shape for i in images] == [(512, 512, 3)] * 2 and times.image_encode_s > 0


def test_step_loop_joins_and_leaves_compile_nothing_on_gpu():
    """Step-level batching on the compiled full-size transformer: after the worker's warm-up kinds (one sample,
    several, mixed sizes), samples joining and leaving a running loop (each membership change a new packed layout)
    compile no new graph, and a sample that joined beside others matches its solo run to bf16 noise."""
    import threading

    from actors.engine import Sample, ZImageEngine
    from actors.models import build_components
    from actors.steploop import Group, RunningSample, StepLoop

    comps = build_components("full", device="cuda", dtype=torch.bfloat16)
    eng = ZImageEngine(comps, dict.fromkeys(("transformer", "text_encoder", "vae"), "cuda"), torch.bfloat16)
    eng.packed.compile()
    for batch in ([Sample("a red fox", 1, 512, 512)], [Sample("a red fox", 1, 512, 512)] * 2,
                  [Sample("a lighthouse", 2, 1024, 1024), Sample("x", 3, 768, 512)]):
        generate(eng, batch, 2)

    def group(sample: Sample, steps: int) -> Group:
        enc = eng.encode([sample.prompt])
        (lat,) = eng.initial_latents([sample])
        return Group([RunningSample.create(eng, sample.prompt, 1, lat, enc.positive[0], None, 0.0, steps)])

    loop = StepLoop(eng)
    short = Sample("a quick sketch of a cat", 7, 768, 512)
    with torch.compiler.set_stance("fail_on_recompile"), counted() as missed:
        long = loop.submit(group(Sample("a detailed city at night", 5, 1024, 1024), 12))
        while loop.stats.steps < 3:
            threading.Event().wait(0.01)
        joined = loop.submit(group(short, 3))
        joined.done.wait(300)
        long.done.wait(300)
        solo = loop.submit(group(short, 3))
        solo.done.wait(300)
    assert not missed, missed  # every call had its graph: none fell back to eager
    assert long.error is None and joined.error is None and solo.error is None
    a, b = joined.samples[0].latents.float(), solo.samples[0].latents.float()
    assert float((a - b).norm() / b.norm()) < 5e-2  # bf16: the batch around a sample moves it slightly


def test_lora_mixed_adapters_compiled_no_recompile_on_gpu():
    """Full size, compiled: per-request LoRA on the packed blocks (bf16). After a warm-up with and without
    adapters, other adapter sets, ranks, sizes and batch mixes compile nothing; scale 0 equals no adapter."""
    from actors.lora import LoraStore, build_adapter, factors_from_state_dict, random_lora_state_dict
    from actors.models import build_components
    from actors.packed import PackedTransformer

    tr = build_components("full", device="cuda", dtype=torch.bfloat16)["transformer"]
    store = LoraStore(tr, max_resident=4, dtype=torch.bfloat16)
    for i, rank in enumerate((32, 32, 16, 64)):
        sd, meta = random_lora_state_dict(tr, rank, seed=i, std=0.01)
        store.add_adapter(build_adapter(f"a{i}", factors_from_state_dict(sd, meta, torch.bfloat16), tr))
    packed = PackedTransformer(tr)
    g = torch.Generator("cpu").manual_seed(0)

    def call(sizes, caps, loras):
        lat = [torch.randn(16, 1, h // 8, w // 8, generator=g).to("cuda", torch.bfloat16) for h, w in sizes]
        cap = [torch.randn(n, 2560, generator=g).to("cuda", torch.bfloat16) for n in caps]
        layout = packed.layout([(1, h // 8, w // 8) for h, w in sizes], caps)
        layout.lora = store.batch(loras)
        t = torch.full((len(sizes),), 0.5, device="cuda")
        return packed(lat, t, cap, layout)

    with torch.no_grad():
        g.manual_seed(1)
        plain = call([(512, 512)], [40], [[]])[0]
        g.manual_seed(1)
        zero = call([(512, 512)], [40], [[("a0", 0.0)]])[0]
        assert torch.equal(plain, zero)
        packed.compile()
        call([(512, 512)] * 2, [40, 77], [[("a0", 1.0)], []])
        call([(512, 512)], [12], [[("a1", 1.0)]])
        call([(512, 512)], [12], [[]])
        with torch.compiler.set_stance("fail_on_recompile"), counted() as missed:
            call([(1024, 1024)] * 4, [20, 40, 60, 80], [[("a0", 1.0)], [("a1", 0.5)], [("a2", 1.0)], [("a3", 1.0)]])
            call([(768, 1344), (256, 256)], [3, 33], [[("a0", 0.5), ("a3", 1.0)], []])
            call([(640, 640)], [250], [[("a2", 1.0)]])
        assert not missed, missed  # every call had its graph: none fell back to eager


def test_each_fast_path_stays_within_its_stated_bound_on_gpu():
    """The serving paths against the eager bf16 model on the start-up probe (512x512, 9 steps, a fixed prompt and
    seed): compiled bf16, then fp8 (every main block) compiled, each within ``accuracy.BOUNDS``."""
    from actors.accuracy import BOUNDS, within
    from actors.engine import ZImageEngine
    from actors.models import build_components
    from actors.packed import PackedTransformer
    from actors.quantize import compare, quantize_fp8, reference_output

    comps = build_components("full", device="cuda", dtype=torch.bfloat16)
    eng = ZImageEngine(comps, dict.fromkeys(("transformer", "text_encoder", "vae"), "cuda"), torch.bfloat16)
    reference = reference_output(eng)
    eng.packed.compile()
    compiled = compare(reference, reference_output(eng))
    quantize_fp8(eng.transformer)
    eng.packed = PackedTransformer(eng.transformer)
    eng.packed.compile()
    fp8 = compare(reference, reference_output(eng))
    print({"bf16 compiled": compiled, "fp8 compiled": fp8})
    assert within(compiled, BOUNDS["bf16"]), compiled
    assert within(fp8, BOUNDS["fp8"]), fp8
    assert fp8["forward_rel_l2"] > compiled["forward_rel_l2"]  # fp8 did run: its rounding shows


def test_cpp_wrapper_blocks_on_gpu():
    """``model.compile_cpp_wrapper``: the full-size blocks compiled with inductor's C++ wrapper stay within the
    compiled bf16 bound against eager on the start-up probe, and a new mix of sizes after the compiling calls
    compiles nothing."""
    import torch._inductor.config
    from torch._inductor.graph import GraphLowering

    wrapped = []  # graphs whose wrapper inductor generated in C++ (none from a cache: the option reached the compile)
    cpp = GraphLowering.codegen_with_cpp_wrapper
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch._inductor.config, "fx_graph_cache", False)
        mp.setattr(GraphLowering, "codegen_with_cpp_wrapper", lambda self: wrapped.append(1) or cpp(self))
        _cpp_wrapper_checks(wrapped)


def _cpp_wrapper_checks(wrapped: list) -> None:
    from actors.accuracy import BOUNDS, within
    from actors.compiled import counted
    from actors.engine import Sample, ZImageEngine
    from actors.models import build_components
    from actors.quantize import compare, reference_output
    from actors.steploop import generate

    comps = build_components("full", device="cuda", dtype=torch.bfloat16)
    eng = ZImageEngine(comps, dict.fromkeys(("transformer", "text_encoder", "vae"), "cuda"), torch.bfloat16)
    reference = reference_output(eng)
    eng.packed.compile(options={"cpp_wrapper": True})
    err = compare(reference, reference_output(eng))
    print({"bf16 compiled, C++ wrapper": err})
    assert within(err, BOUNDS["bf16"]), err
    generate(eng, [Sample("a", 1, 512, 512), Sample("b " * 40, 2, 768, 512)], 2)
    with torch.compiler.set_stance("fail_on_recompile"), counted() as missed:
        generate(eng, [Sample("c " * 90, 3, 1024, 640), Sample("d", 4, 256, 256), Sample("e", 5, 640, 640)], 2)
    assert not missed, missed
    assert wrapped


def test_text_encoder_graphs_on_gpu():
    """The text encoder's CUDA graphs, captured while another thread allocates and syncs (the capture is
    thread-local: other threads' CUDA calls must neither fail nor break it): a call of one graphed count is the eager
    forward at its padded shape, bit for bit, and each prompt's states, chunked or not, differ from its eager solo
    encode by no more than eager encodes at other shapes do (the same prompt padded further and masked, or batched
    with longer ones): the bf16 rounding of another GEMM shape, which random weights amplify over 35 layers (2.5%
    relative L2 was measured on an H100)."""
    import threading

    from transformers import Qwen3Config, Qwen3Model

    from actors.encoder_graphs import EncoderGraphs, penultimate
    from actors.models import FULL_TEXT_ENCODER_CONFIG, _default_dtype

    dev = torch.device("cuda")
    with _default_dtype(torch.bfloat16), dev:
        te = Qwen3Model(Qwen3Config(**FULL_TEXT_ENCODER_CONFIG)).eval().requires_grad_(False)
    pen = penultimate(te)
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            # (no CUDA RNG here: the default generator is registered with the graph being captured, and another
            # thread's draw from it during a capture raises; the replica draws its noise on the CPU)
            x = torch.full((2048, 2048), 0.5, device=dev, dtype=torch.bfloat16)
            (x @ x).sum().item()

    other = threading.Thread(target=busy)
    other.start()
    try:
        with torch.no_grad(), torch.cuda.stream(torch.cuda.Stream(priority=-1)):
            graphs = EncoderGraphs(pen, dev)
            graphs.capture()
    finally:
        stop.set()
        other.join()
    assert len(graphs.graphs) == 48
    print({"encoder graphs pool MiB": graphs.pool_bytes / 2**20})  # what the replica holds for them (its log says too)
    from placement.memory import ENCODER_GRAPHS_GIB

    assert graphs.pool_bytes <= 1.05 * ENCODER_GRAPHS_GIB["full"] * 2**30  # the plan's figure still holds
    g = torch.Generator("cpu").manual_seed(0)
    with torch.no_grad():
        for b, length in ((1, 108), (3, 40), (8, 300)):
            n = [length - 5 * i for i in range(b)]
            ids = torch.randint(0, te.config.vocab_size, (b, length), generator=g)
            mask = (torch.arange(length)[None] < torch.tensor(n)[:, None]).to(dev)
            got = graphs.run(ids)
            if b in graphs.counts:  # one replay: the eager forward at the padded shape, bit for bit
                padded = torch.full((b, next(x for x in graphs.lengths if x >= length)), graphs.pad_id)
                padded[:, :length] = ids
                same = pen(input_ids=padded.to(dev), use_cache=False).last_hidden_state[:, :length]
                assert torch.equal(got, same)
            batched = pen(input_ids=ids.to(dev), attention_mask=mask, use_cache=False).last_hidden_state
            for i in range(b):
                own = ids[i:i + 1, :n[i]].to(dev)
                solo = pen(input_ids=own, use_cache=False).last_hidden_state[0]
                further = torch.cat([own, torch.full((1, 64), graphs.pad_id, device=dev)], dim=1)
                repadded = pen(input_ids=further, attention_mask=(torch.arange(n[i] + 64, device=dev) < n[i])[None],
                               use_cache=False).last_hidden_state[0, :n[i]]
                spread = max(_rel(batched[i, :n[i]], solo), _rel(repadded, solo))
                err = _rel(got[i, :n[i]], solo)
                print({"prompts": b, "length": n[i], "graph": err, "eager at other shapes": spread})
                assert err <= 1.1 * spread + 1e-3 and err < 0.05, (err, spread)


def _rel(a: torch.Tensor, w: torch.Tensor) -> float:
    a, w = a.float(), w.float()
    return float((a - w).norm() / w.norm())


def test_the_reader_stream_waits_for_the_step_that_made_the_latents_on_gpu():
    """The reader stream reads a finished sample only after the event recorded behind its last step: with that step
    held back on the loop's stream (a ~0.5 s spin queued before it), the decode on the reader equals the decode of
    the same latents after a full device sync, level for level. A reader that did not wait would read the latents
    before the step wrote them."""
    import numpy as np

    from actors.engine import Sample, ZImageEngine
    from actors.models import build_components
    from actors.steploop import StepLoop, finish, prepare

    comps = build_components("full", device="cuda", dtype=torch.bfloat16)
    eng = ZImageEngine(comps, dict.fromkeys(("transformer", "text_encoder", "vae"), "cuda"), torch.bfloat16)
    assert eng.reader is not None
    step = eng.step

    def held_back(samples, packed):
        if any(s.step == s.num_steps - 1 for s in samples):
            torch.cuda._sleep(int(1e9))  # about half a second of an H100's clock, on the loop's stream
        return step(samples, packed)

    eng.step = held_back
    group, times = prepare(eng, [Sample("a lighthouse at dusk", 3, 512, 512)], 2)
    StepLoop(eng).run_alone(group)
    assert group.ready is not None
    (read,), _ = finish(eng, group, times)
    torch.cuda.synchronize()
    reader, eng.reader = eng.reader, None
    try:
        (synced,) = eng.decode([group.samples[0].latents])
    finally:
        eng.reader = reader
    assert np.abs(read.astype(int) - synced.astype(int)).max() <= 1


def test_short_request_beside_a_long_one_read_on_the_reader_stream_on_gpu():
    """The full-size replica (bf16, eager) behind the real router with the default config: a 2-step 512x512 request
    sent while a 50-step 1024x1024 one denoises finishes long before it; its preview, final check and decode are
    read on the reader stream while the loop goes on (``devices.ReadStream``); its image equals its solo run to bf16
    noise (the batch around a sample moves it slightly; a read that did not wait for its last step would be another
    image). Last in this file: the replica's stage threads keep its engine, and its memory, to the end."""
    import asyncio

    import numpy as np

    from actors.worker import PipelineWorker, WarmupSpec
    from zimage_common.config import ModelConfig

    worker = PipelineWorker("g0", ModelConfig(source="random-full", dtype="bfloat16"),
                            warmup=WarmupSpec(((512, 512),), 2, max_pixels=1024 * 1024, max_batch_tokens=1 << 16),
                            max_batch_tokens=1 << 16, max_batch_size=8)
    worker.start()
    assert worker.engine.reader is not None
    short, solo, long_steps_then = asyncio.run(_short_beside_long(worker))
    a, b = short.image.astype(np.float64), solo.image.astype(np.float64)
    psnr = 10 * np.log10(255.0**2 / max(float(((a - b) ** 2).mean()), 1e-12))
    print({"long steps when the short one finished": long_steps_then, "psnr beside vs solo": psnr})
    assert psnr >= 30.0, psnr


async def _short_beside_long(worker):
    """(The GPU machine's pytest has no asyncio plugin: the test runs this with ``asyncio.run``.)"""
    from orchestrator.router import Router
    from tests.test_steploop import InProcessReplica, Pool, short_beside_long
    from zimage_common.config import RouterConfig
    from zimage_common.messages import ImageRequest

    router = Router(Pool(InProcessReplica(worker)), RouterConfig())
    router.start()
    try:
        short, events, long_steps_then, long, long_steps, solo = await short_beside_long(
            router, ImageRequest("L", "a detailed city at night", 1, 1024, 1024, 50, 0.0),
            ImageRequest("S", "a quick sketch of a cat", 2, 512, 512, 2, 0.0, partial_images=1), poll_s=0.01)
    finally:
        await router.stop()
    assert long_steps_then < 50 - 10, long_steps_then
    assert [(p[0], p[1], p[2].shape) for ev in events for p in ev.previews] == [("S", 0, (512, 512, 3))]
    assert long.ok and long_steps == list(range(1, 51)) and solo.ok
    return short, solo, long_steps_then
