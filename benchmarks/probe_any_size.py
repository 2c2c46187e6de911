"""What a size no warm-up named costs, per stage, and the candidate designs that serve any size at compiled speed.

Attention (30 heads x 128, bf16, the packed transformer's per-sample SDPA calls):
- ``plan_first_ms``: the first call at a sequence length this thread has not seen (cuDNN builds a plan per shape)
  against the steady call, for lengths no warm-up named;
- ``masked``: a sample of length L run at a bucket length B >= L (a multiple of ``--bucket`` tokens), the keys past
  L masked out, under the cuDNN backend alone: whether cuDNN takes the mask, its steady time against the exact-length
  call, and the largest difference of the first L rows from the exact call.

VAE decoder (full-size random weights, bf16, channels-last, one image a call as ``ZImageEngine.decode_one``):
eager with and without cuDNN's algorithm search, one graph with dynamic height and width, and GroupNorm+SiLU compiled
with dynamic shapes around eager convolutions (``regional``); first decode and steady decode per size, and each
mode's largest difference from the eager decode in 8-bit levels.

    python3 benchmarks/probe_any_size.py OUT.json [--parts attn,vae] [--modes eager,eager_nobench,dynamic,regional]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = [(1024, 1024), (1280, 720), (1152, 896), (512, 512), (2048, 1024), (640, 1536), (256, 768)]


def _sync():
    import torch

    torch.cuda.synchronize()


def _call_s(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def probe_attention(args) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    h, d = 30, 128
    out: dict = {}
    q = torch.randn(1, h, 17408, d, device="cuda", dtype=torch.bfloat16)
    firsts, steadies = [], []
    for i in range(args.plan_lengths):  # lengths no warm-up built: 32-token steps the engine pads to
        n = 1056 + 32 * 13 * i
        x = q[:, :, :n]
        firsts.append(_call_s(lambda x=x: F.scaled_dot_product_attention(x, x, x)))
        steadies.append(statistics.median(_call_s(lambda x=x: F.scaled_dot_product_attention(x, x, x))
                                          for _ in range(3)))
    out["plan_first_ms"] = [round(f * 1e3, 2) for f in firsts]
    out["plan_first_median_ms"] = round(statistics.median(firsts) * 1e3, 2)
    out["plan_steady_ms"] = [round(s * 1e3, 3) for s in steadies]
    out["plan_overhead_median_ms"] = round(statistics.median(f - s for f, s in zip(firsts, steadies)) * 1e3, 2)
    print("plans:", out["plan_first_median_ms"], "ms first,", out["plan_overhead_median_ms"], "ms over steady",
          flush=True)

    masked = {}
    for L in (4224, 3008, 9024, 16448, 1088):
        B = -(-L // args.bucket) * args.bucket
        base = torch.randn(1, B, h, d, device="cuda", dtype=torch.bfloat16)  # [1, T, H, d] as the packed sequence
        x = base.transpose(1, 2)  # [1, H, B, d] strided view, as _attend_run passes
        xe = x[:, :, :L]
        row: dict = {"bucket": B}
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            ref = F.scaled_dot_product_attention(xe, xe, xe)
            row["exact_first_ms"] = round(_call_s(lambda: F.scaled_dot_product_attention(xe, xe, xe)) * 1e3, 3)
            row["exact_ms"] = round(statistics.median(
                _call_s(lambda: F.scaled_dot_product_attention(xe, xe, xe)) for _ in range(5)) * 1e3, 3)
            for kind in ("bool", "float"):
                keep = torch.zeros(1, 1, 1, B, device="cuda", dtype=torch.bool)
                keep[..., :L] = True
                mask = keep if kind == "bool" else torch.zeros(1, 1, 1, B, device="cuda", dtype=torch.bfloat16
                                                               ).masked_fill(~keep, float("-inf"))
                try:
                    got = F.scaled_dot_product_attention(x, x, x, attn_mask=mask)
                    row[f"{kind}_first_ms"] = round(_call_s(
                        lambda m=mask: F.scaled_dot_product_attention(x, x, x, attn_mask=m)) * 1e3, 3)
                    row[f"{kind}_ms"] = round(statistics.median(_call_s(
                        lambda m=mask: F.scaled_dot_product_attention(x, x, x, attn_mask=m))
                        for _ in range(5)) * 1e3, 3)
                    row[f"{kind}_max_diff"] = float((got[:, :, :L].float() - ref.float()).abs().max())
                    row[f"{kind}_bitwise_equal"] = bool(torch.equal(got[:, :, :L], ref))
                except RuntimeError as e:
                    row[f"{kind}_error"] = str(e).splitlines()[0][:300]
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            row["flash_exact_ms"] = round(statistics.median(
                _call_s(lambda: F.scaled_dot_product_attention(xe, xe, xe)) for _ in range(5)) * 1e3, 3)
        masked[str(L)] = row
        print("attention", L, row, flush=True)
    out["masked"] = masked
    return out


def regionalize(decoder, compile_kw: dict) -> int:
    """Replace each GroupNorm (+ the SiLU after it) in the decoder's resnets and its output norm by one compiled
    function with dynamic shapes; convolutions, upsampling and the mid-block attention stay eager. Returns how many
    norms it replaced."""
    import torch
    import torch.nn.functional as F
    from diffusers.models.resnet import ResnetBlock2D

    def gn_silu(x, weight, bias, groups: int, eps: float):
        return F.silu(F.group_norm(x, groups, weight, bias, eps)).contiguous(memory_format=torch.channels_last)

    fn = torch.compile(gn_silu, dynamic=True, **compile_kw)

    class NormAct(torch.nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.norm = norm

        def forward(self, x):
            n = self.norm
            return fn(x, n.weight, n.bias, n.num_groups, n.eps)

    count = 0
    for m in decoder.modules():
        if isinstance(m, ResnetBlock2D):
            m.norm1, m.norm2, m.nonlinearity = NormAct(m.norm1), NormAct(m.norm2), torch.nn.Identity()
            count += 2
    decoder.conv_norm_out, decoder.conv_act = NormAct(decoder.conv_norm_out), torch.nn.Identity()
    return count + 1


def probe_vae(args) -> dict:
    import copy

    import torch
    import torch._dynamo
    from diffusers import AutoencoderKL
    from torch._dynamo.utils import counters

    from actors.compile_cache import enable_compile_cache
    from actors.models import FULL_VAE_CONFIG

    enable_compile_cache(Path(args.cache))
    with torch.device("cuda"):
        vae = AutoencoderKL(**FULL_VAE_CONFIG).to(torch.bfloat16).eval().requires_grad_(False)
    vae.to(memory_format=torch.channels_last)
    eager = vae.decoder
    sizes = SIZES
    lats = {s: torch.randn(1, 16, s[1] // 8, s[0] // 8, device="cuda", dtype=torch.bfloat16,
                           generator=torch.Generator("cuda").manual_seed(s[0] * 7 + s[1]))
            .contiguous(memory_format=torch.channels_last) for s in sizes}

    def decode(s):
        with torch.no_grad():
            img = vae.decode(lats[s], return_dict=False)[0]
        return ((img.float().clamp(-1, 1) + 1) * 127.5).round()

    refs = {}
    report: dict = {}
    for mode in args.modes.split(","):
        torch._dynamo.reset()
        torch.backends.cudnn.benchmark = mode != "eager_nobench"
        g0 = counters["stats"]["unique_graphs"]
        if mode in ("eager", "eager_nobench"):
            vae.decoder = eager
        elif mode == "dynamic":
            vae.decoder = torch.compile(eager, dynamic=True)
        elif mode == "regional":
            dec = copy.deepcopy(eager)
            regionalize(dec, {})
            vae.decoder = dec
        elif mode == "static":
            vae.decoder = torch.compile(eager, dynamic=False)
        first, steady, diff = {}, {}, {}
        t_mode = time.perf_counter()
        for s in sizes if mode != "static" else sizes[:2]:
            key = f"{s[0]}x{s[1]}"
            first[key] = round(_call_s(lambda s=s: decode(s)), 3)
            steady[key] = round(statistics.median(_call_s(lambda s=s: decode(s)) for _ in range(args.repeats)), 4)
            img = decode(s)
            if mode == "eager":
                refs[key] = img
            elif key in refs:
                diff[key] = float((img - refs[key]).abs().max())
        report[mode] = {"first_s": first, "decode_s": steady, "max_diff_levels": diff,
                        "graphs": counters["stats"]["unique_graphs"] - g0,
                        "mode_total_s": round(time.perf_counter() - t_mode, 1)}
        print("vae", mode, report[mode], flush=True)
    vae.decoder = eager
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--parts", default="attn,vae")
    p.add_argument("--modes", default="eager,eager_nobench,regional,dynamic,static")
    p.add_argument("--bucket", type=int, default=256)
    p.add_argument("--plan-lengths", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cache", default="/tmp/zc-any-size")
    args = p.parse_args()

    import torch

    report: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "cudnn": torch.backends.cudnn.version()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for part in args.parts.split(","):
        try:
            report[part] = probe_attention(args) if part == "attn" else probe_vae(args)
        except Exception as e:  # one part's failure still leaves the other's numbers
            report[f"{part}_error"] = repr(e)[:2000]
            print(part, "failed:", repr(e)[:2000], flush=True)
        out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
