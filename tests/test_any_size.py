"""Any size at compiled speed: the VAE decoder's one dynamic graph serves sizes no list names, a call no graph covers
falls back to eager and is counted, and the random-size workload draws over the allowed range."""

import random
import shutil

import pytest
import torch

from actors.compiled import Fallbacks, compile_vae_decoder, counted, guarded_module
from orchestrator.benchmark.sizes import MENU_MP, bucket_stats, draw_size, request_tflop, size_bucket


def _tiny_vae():
    from diffusers import AutoencoderKL

    from actors.models import TINY_VAE_CONFIG

    torch.manual_seed(0)
    return AutoencoderKL(**TINY_VAE_CONFIG).eval().requires_grad_(False)


def _decode(vae, h: int, w: int, seed: int):
    lat = torch.randn(1, vae.config.latent_channels, h, w, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return vae.decode(lat, return_dict=False)[0]


@pytest.mark.slow
def test_a_size_in_no_list_takes_the_compiled_decoder_and_compiles_nothing():
    """Inductor on the CPU (tests/test_gpu.py's benchmark does it on a GPU): the decoder compiled once at one size
    decodes two sizes of other aspect ratios under the serving stance with no fallback and no new graph, and the
    same pixels as the eager decoder up to float32 rounding. (On the CPU the convolution backend changes with the
    input's size, a guard CUDA's has not: the sizes stay on the warm-up's side of it, 256*h*w <= 20480 for the tiny
    VAE; on an H100 sizes from 256 to 2048 px a side fell back zero times, docs/benchmarks.md.)"""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor on the CPU needs a C++ compiler")
    from torch._dynamo.utils import counters

    vae = _tiny_vae()
    eager = _tiny_vae()
    torch._dynamo.reset()
    try:
        compile_vae_decoder(vae)
        _decode(vae, 8, 8, 0)  # the warm-up's one size
        graphs = counters["stats"]["unique_graphs"]
        with torch.compiler.set_stance("fail_on_recompile"), counted() as missed:
            outs = [(_decode(vae, h, w, s), _decode(eager, h, w, s)) for h, w, s in ((4, 16, 1), (10, 6, 2))]
        assert not missed, missed
        assert counters["stats"]["unique_graphs"] == graphs
        for got, want in outs:
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    finally:
        torch._dynamo.reset()


def test_a_call_no_graph_covers_runs_eager_and_is_counted():
    """One static graph (dynamo alone, no code generation): a second size under the serving stance neither compiles
    nor fails; it runs the eager decoder, gives its pixels, and counts one decode fallback."""
    vae, eager, fb = _tiny_vae(), _tiny_vae(), Fallbacks()
    torch._dynamo.reset()
    try:
        vae.decoder = guarded_module("decode", vae.decoder, fb, dynamic=False, backend="eager")
        _decode(vae, 8, 8, 0)
        with torch.compiler.set_stance("fail_on_recompile"):
            same = _decode(vae, 8, 8, 3)
            assert fb.counts() == {}
            other = _decode(vae, 6, 10, 4)
        assert fb.counts() == {"decode": 1}
        torch.testing.assert_close(same, _decode(eager, 8, 8, 3))
        torch.testing.assert_close(other, _decode(eager, 6, 10, 4))
    finally:
        torch._dynamo.reset()


def test_random_sizes_cover_the_allowed_range_and_nothing_else():
    rng = random.Random(11)
    sizes = [draw_size(rng, 2048 * 2048) for _ in range(3000)]
    assert all(w % 16 == 0 and h % 16 == 0 and 256 <= min(w, h) and max(w, h) <= 2048 for w, h in sizes)
    assert all(max(w, h) <= 3 * min(w, h) and w * h <= 2048 * 2048 for w, h in sizes)
    assert len(set(sizes)) > 2000  # a new size nearly every request: no list can hold them
    assert {size_bucket(w, h) for w, h in sizes} == {"<0.5MP", "0.5-1MP", "1-2MP", ">=2MP"}
    assert all(w * h <= 1536 * 1536 for w, h in (draw_size(rng, 1536 * 1536) for _ in range(500)))
    menu = [draw_size(rng, 2048 * 2048, MENU_MP) for _ in range(500)]
    assert all(MENU_MP[0] * 1e6 <= w * h <= MENU_MP[1] * 1e6 for w, h in menu)
    assert max(w / h for w, h in menu) > 2 and min(w / h for w, h in menu) < 0.5  # wide and tall aspects
    with pytest.raises(ValueError):
        draw_size(rng, 200 * 200)
    assert [draw_size(random.Random(5), 2048 * 2048) for _ in range(3)] == \
        [draw_size(random.Random(5), 2048 * 2048) for _ in range(3)]


def test_request_arithmetic_matches_the_reference_and_grows_faster_than_pixels():
    """About 56.6 TFLOP a forward at 1024x1024 (REFERENCE.md): 9 steps, the VAE and the encoder about 520."""
    one = request_tflop(1024, 1024, 100, 9)
    assert 500 < one < 540
    assert request_tflop(2048, 2048, 100, 9) > 4.5 * one  # attention's quadratic term
    assert request_tflop(256, 256, 500, 9) > 1.5 * request_tflop(256, 256, 20, 9)  # a caption weighs on small images


def test_bucket_stats_per_size_bucket():
    from orchestrator.benchmark.report import percentile
    from zimage_common.messages import ImageResult

    rs = [ImageResult(f"r{i}", True, width=w, height=h, latency_s=t, prompt_tokens=60)
          for i, (w, h, t) in enumerate([(512, 512, 1.0), (1024, 1024, 2.0), (1024, 1024, 3.0), (2048, 1536, 9.0)])]
    rs.append(ImageResult("bad", False, width=512, height=512))
    b = bucket_stats(rs, 9, percentile)
    assert set(b) == {"<0.5MP", "1-2MP", ">=2MP"} and b["1-2MP"]["requests"] == 2
    assert b["<0.5MP"]["s_per_pflop_p50"] == pytest.approx(1.0 / (request_tflop(512, 512, 60, 9) / 1e3), rel=1e-3)


def test_eager_fallbacks_show_on_metrics_per_replica_and_stage():
    from prometheus_client import generate_latest

    from orchestrator.metrics import PrometheusObserver as Metrics
    from zimage_common.messages import ReplicaHealth

    m = Metrics()
    m.replica_state("r0", True, ReplicaHealth(replica_id="r0", ready=True, device_map={}, dtype="bfloat16"))
    text = generate_latest(m.registry).decode()
    assert 'zimage_eager_fallbacks_total{replica="r0",stage="decode"} 0.0' in text
    assert 'zimage_eager_fallbacks_total{replica="r0",stage="denoise"} 0.0' in text
    for n in (2, 3):  # cumulative counts from the replica: the counter adds what is new
        m.replica_state("r0", True, ReplicaHealth(replica_id="r0", ready=True, device_map={}, dtype="bfloat16",
                                                  eager_fallbacks={"decode": n}))
    assert 'zimage_eager_fallbacks_total{replica="r0",stage="decode"} 3.0' in generate_latest(m.registry).decode()
