"""benchmarks/roofline.py on the CPU with the tiny model: its FLOP accounting against a hand count for the tiny
config (every transformer state, the caption path, the text encoder, the VAE's attention), the accuracy table, and
the trace summary its GPU runs rely on, on a synthetic profiler trace."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CPU_FP8, NO_CPU_FP8

from actors.models import TINY_TEXT_ENCODER_CONFIG, TINY_TRANSFORMER_CONFIG

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not CPU_FP8:  # the tiny run measures the fp8 states too
        pytest.skip(NO_CPU_FP8)
    out = tmp_path_factory.mktemp("roofline")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "benchmarks/roofline.py", "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "roofline.json").read_text()), (out / "roofline.md").read_text()


def _pad(n: int) -> int:
    return -(-n // 32) * 32


def hand_step(caption_lens: list[int], image_tokens: int, fp8_layers: set[int] | None):
    """(non-float8 GEMM, float8 GEMM, attention) FLOPs of one packed transformer call of the tiny config, by hand:
    per sample the timestep MLP, the patch embedder, the noise refiner over its image tokens, the main blocks over
    image + caption, the final layer; the linears float8 takes (q, k, v, out: multiples of 16) in the refiner and in
    the main blocks of ``fp8_layers``."""
    cfg = TINY_TRANSFORMER_CONFIG
    d, ffn, ada = cfg["dim"], int(cfg["dim"] / 3 * 8), min(cfg["dim"], 256)
    per_token = 2 * (4 * d * d + 3 * d * ffn)  # q, k, v, out; w1, w2, w3
    qkvo = 2 * 4 * d * d
    gemm = fp8 = attn = 0
    n = _pad(image_tokens)
    for c in caption_lens:
        length = n + _pad(c)
        gemm += 2 * 256 * 1024 + 2 * 1024 * ada  # timestep embedder
        gemm += 2 * (2 * 2 * 16) * d * n  # 2x2 patches of 16 channels -> dim
        gemm += cfg["n_refiner_layers"] * (per_token * n + 2 * ada * 4 * d)  # noise refiner + its adaLN
        attn += cfg["n_refiner_layers"] * 4 * n * n * d
        gemm += cfg["n_layers"] * (per_token * length + 2 * ada * 4 * d)
        attn += cfg["n_layers"] * 4 * length * length * d
        gemm += 2 * ada * d + 2 * d * (2 * 2 * 16) * length  # final adaLN, final linear over the unified tokens
        if fp8_layers is not None:
            fp8 += qkvo * (cfg["n_refiner_layers"] * n + len(fp8_layers) * length)
    return gemm - fp8, fp8, attn


def hand_captions(caption_lens: list[int], fp8: bool):
    cfg = TINY_TRANSFORMER_CONFIG
    d, ffn, r = cfg["dim"], int(cfg["dim"] / 3 * 8), cfg["n_refiner_layers"]
    tokens = sum(_pad(c) for c in caption_lens)
    gemm = 2 * cfg["cap_feat_dim"] * d * tokens + r * 2 * (4 * d * d + 3 * d * ffn) * tokens
    q = r * 2 * 4 * d * d * tokens if fp8 else 0
    return gemm - q, q, sum(r * 4 * _pad(c) ** 2 * d for c in caption_lens)


def test_flops_match_a_hand_count_for_every_state(report):
    res, _ = report
    assert set(res["states"]) == {"bf16", "fp8", "fp8-bf16-last1"}
    n_layers = TINY_TRANSFORMER_CONFIG["n_layers"]
    for name, rows in res["states"].items():
        fp8_layers = None if name.startswith("bf16") else set(range(n_layers - 1 if "last1" in name else n_layers))
        for b in ("1", "2"):
            r = rows[b]
            assert len(r["caption_tokens"]) == int(b)
            gemm, fp8, attn = hand_step(r["caption_tokens"], (64 // 16) ** 2, fp8_layers)
            assert r["flops"].get("gemm_bf16", 0) == gemm, (name, b)
            assert r["flops"].get("gemm_fp8", 0) == fp8, (name, b)
            assert r["flops"]["attention"] == attn, (name, b)
            assert r["tokens"] == sum(_pad(16) + _pad(c) for c in r["caption_tokens"])
            cg, cq, ca = hand_captions(r["caption_tokens"], fp8_layers is not None)
            cap = r["caption_path"]["flops"]
            assert (cap.get("gemm_bf16", 0), cap.get("gemm_fp8", 0), cap["attention"]) == (cg, cq, ca), (name, b)


def test_text_encoder_and_vae_flops(report):
    res, _ = report
    te = TINY_TEXT_ENCODER_CONFIG
    h, heads, kv, hd, inter = (te[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                               "head_dim", "intermediate_size"))
    per_token = 2 * (h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inter)
    for b, r in res["text_encoder"].items():
        rows, length = r["tokens"]
        assert rows == int(b)
        layers = te["num_hidden_layers"] - 1  # encodes stop before the last layer (actors/encoder_graphs.py)
        assert r["flops"]["gemm_bf16"] == layers * rows * length * per_token
        assert r["flops"]["attention"] == layers * rows * heads * 4 * length * length * hd
    vae = res["vae"]["flops"]
    latent = 64 // 8
    assert vae["attention"] == 4 * latent**4 * 16  # the mid-block's one head over the 8x8 latent, 16 channels
    assert vae["conv"] > 100 * vae["attention"]


def test_accuracy_table_and_report(report):
    res, md = report
    acc = res["accuracy"]
    assert acc["bf16"]["forward_rel_l2"] == 0 and acc["bf16"]["image_psnr_db"] == float("inf")
    for name in ("fp8", "fp8-bf16-last1"):
        assert 0 < acc[name]["forward_rel_l2"] < 0.1 and acc[name]["nonfinite_fraction"] == 0
    assert "main block 1 in bf16" in acc["fp8-bf16-last1"]["option"]
    for title in ("## Steps", "## Per op class", "## Components", "## Per image", "## Accuracy against eager bf16"):
        assert title in md


def test_trace_summary_and_kernel_classes(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import roofline

    def x(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    trace = {"traceEvents": [
        x("user_annotation", "roofline.call", 0, 100),
        x("cuda_runtime", "cudaLaunchKernel", 1, 2), x("cuda_driver", "cuLaunchKernel", 5, 2),
        x("cuda_runtime", "cudaStreamSynchronize", 50, 30), x("cuda_runtime", "cudaMemcpyAsync", 48, 1),
        x("cuda_runtime", "cudaDeviceSynchronize", 150, 5),  # after the call: the script's own
        x("kernel", "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", 10, 40),
        x("kernel", "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", 45, 10),  # overlaps the GEMM by 5
        x("kernel", "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", 60, 20),
        x("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 82, 1),
    ]}
    s = roofline.summarize_trace(trace, wall=100e-6)
    assert s["kernels"] == 3 and s["launches"] == 2 and s["host_syncs"] == 1 and s["d2h_copies"] == 1
    assert s["kernel_busy_s"] == pytest.approx(66e-6) and s["idle_s"] == pytest.approx(34e-6)
    assert s["time_s"]["gemm"] == pytest.approx(40e-6) and s["time_s"]["attention"] == pytest.approx(20e-6)
    assert s["time_s"]["elementwise"] == pytest.approx(10e-6) and s["time_s"]["memcpy"] == pytest.approx(1e-6)
    kc = roofline.kernel_class
    assert kc("triton_red_fused__to_copy_abs_amax_clamp_div_mean_mul_pow_rsqrt_3") == "quantize"
    assert kc("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128_warpgroupsize1x1x1") == "gemm"
    assert kc("void cutlass::device_kernel<flash::FlashAttnFwdSm90<...>>") == "attention"
    assert kc("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>") == "other"
