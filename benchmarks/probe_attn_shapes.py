"""What a new sequence length costs the first time attention sees it (cuDNN builds an execution plan per shape).

For each backend (cuDNN, flash, efficient), at 30 heads x 128 in bf16: the first call at a length never seen before,
then the steady-state call, for batch 1 and batch 4 (the packed transformer runs one dense call per run of
equal-length samples, so each new (samples, length) pair is a new shape).

Usage: python3 benchmarks/probe_attn_shapes.py OUT.json
"""

import json
import sys

import torch
import torch.nn.functional as F
from gpu_timing import first_call_s
from torch.nn.attention import SDPBackend, sdpa_kernel


def call_s(fn) -> float:
    """One synchronized call, after what was queued before it (the inputs) has finished."""
    torch.cuda.synchronize()
    return first_call_s(fn)


def main() -> None:
    out = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version()}
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    base = 4096
    for bi, (name, backend) in enumerate(backends.items()):
        for batch in (1, 4):
            firsts, steadies = [], []
            for k in range(6):  # six lengths this process has not seen for this backend and batch
                n = base + 32 * (1 + k + 8 * bi) + (batch - 1) * 1000
                q, kk, v = (torch.randn(batch, 30, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                with sdpa_kernel([backend]):
                    f = lambda: F.scaled_dot_product_attention(q, kk, v)  # noqa: E731
                    try:
                        firsts.append(call_s(f))
                        steadies.append(sorted(call_s(f) for _ in range(5))[2])
                    except RuntimeError as e:
                        out[f"{name}_b{batch}_error"] = str(e)[:200]
                        break
            if firsts:
                out[f"{name}_b{batch}_first_ms"] = [round(x * 1e3, 2) for x in firsts]
                out[f"{name}_b{batch}_steady_ms"] = [round(x * 1e3, 3) for x in steadies]
                print(name, batch, out[f"{name}_b{batch}_first_ms"], out[f"{name}_b{batch}_steady_ms"], flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
