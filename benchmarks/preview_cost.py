"""What partial_images costs: one batch streamed with and without previews, on the CPU tiny model (or a config).

    python benchmarks/preview_cost.py [--size 256] [--steps 9] [--repeat 3]

Each preview is one VAE decode of the current clean-latent estimate for the requests that asked for it, run on
the denoising thread between two steps; the script reports the batch time without previews, with 3 previews per
image, and the decode time per preview that the worker measured.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from actors.worker import PipelineWorker
from orchestrator.config import ModelConfig
from orchestrator.messages import Batch, ImageRequest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    w = PipelineWorker("r0", ModelConfig(source="tiny", dtype="float32", cache_dir=tempfile.mkdtemp()),
                       torch_threads=args.threads)
    w.start()

    def run(partials: int) -> float:
        reqs = tuple(ImageRequest(f"q{i}", f"prompt {i}", i, args.size, args.size, args.steps, 0.0,
                                  partial_images=partials) for i in range(args.batch))
        t0 = time.perf_counter()
        items = list(w.run_batch_stream(Batch(0, reqs)))
        assert all(r.ok for r in items[-1].results)
        n = sum(len(p.previews) for p in items[:-1])
        assert n == partials * args.batch, n
        return time.perf_counter() - t0

    run(0)  # warm
    base = statistics.median(run(0) for _ in range(args.repeat))
    with_previews = statistics.median(run(3) for _ in range(args.repeat))
    per_preview = (with_previews - base) / (3 * args.batch)
    print(f"{args.batch} x {args.size}^2, {args.steps} steps: {base:.3f}s without previews, {with_previews:.3f}s with "
          f"3 per image (+{100 * (with_previews / base - 1):.0f}%), {per_preview * 1000:.1f} ms per preview image")


if __name__ == "__main__":
    main()
