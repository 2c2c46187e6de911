"""Write a batch job's input (OpenAI batch JSONL) with the benchmark's traffic, to compare `zimage-orch batch`
against the closed-loop benchmark on the same mix.

    python benchmarks/batch_job_input.py --lines 2000 --workload mixed --out job-2000.jsonl

``mixed``: prompts of 3 to 160 words at five common sizes (512x512 to 1344x768), as ``bench --workload mixed``;
``uniform``: short prompts at one size (``--size``, default 1024x1024). Seeds are the line numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.benchmark.loadgen import RequestMaker  # noqa: E402


def write_job(path, lines: int, workload: str = "mixed", size: tuple[int, int] = (1024, 1024), seed: int = 0) -> None:
    maker = RequestMaker.for_workload(workload, None, None if workload == "mixed" else [size], None, seed)
    with open(path, "w") as f:
        for i in range(lines):
            p = maker.params()
            body = {"prompt": p["prompt"], "size": f"{p['width']}x{p['height']}", "seed": p["seed"]}
            f.write(json.dumps({"custom_id": f"{workload}-{i:07d}", "method": "POST",
                                "url": "/v1/images/generations", "body": body}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=2000)
    ap.add_argument("--workload", choices=("mixed", "varied", "uniform"), default="mixed")
    ap.add_argument("--size", default="1024x1024", help="uniform and varied: WxH")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    w, h = (int(x) for x in args.size.lower().split("x"))
    write_job(args.out, args.lines, args.workload, (w, h), args.seed)
    print(f"{args.lines} requests ({args.workload}) in {args.out}")


if __name__ == "__main__":
    main()
