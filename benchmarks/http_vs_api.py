"""The same traffic (closed loop, concurrency 8; uniform at the config's default size, and any of the varied and
mixed workloads) through the HTTP service and through the Python API, one deployment each, one after the other on
the same GPU; prints the HTTP/API ratio per workload and writes both reports (the HTTP one with the server's batch
sizes, read from its /metrics).

Usage: python3 benchmarks/http_vs_api.py OUT_DIR [--requests 48] [--config benchmarks/configs/gpu-random.yaml]
[--workload uniform] [--set PATH=VALUE ...] [--http-only]
(e.g. --workload uniform,varied,mixed; --set model.quantization=fp8; --http-only skips the Python API run, for
comparing the HTTP path of two trees on one machine)
"""

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

COMPILE = ["--set", "model.compile=true", "--set", "model.compile_cache_dir=/tmp/zc"]


def bench(args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "orchestrator.cli", "bench", *args, "--concurrency", "8", "--warmup", "8",
           "--out", str(out)]
    subprocess.run(cmd, check=False)
    return json.loads((out / "bench.json").read_text())


def main(out_dir: str, n: int = 48, config: str = "benchmarks/configs/gpu-random.yaml",
         workloads: str = "uniform", sets: tuple[str, ...] = (), http_only: bool = False) -> int:
    out = Path(out_dir)
    extra = COMPILE + [a for s in sets for a in ("--set", s)]
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:  # a free port: matrix lanes run several of these on one host
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open(out / "serve.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", config, *extra,
                                   "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    t0 = time.perf_counter()
    http_compiles = None
    try:
        while time.perf_counter() - t0 < 300:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        ready_s = time.perf_counter() - t0
        http = bench(["--http", f"http://127.0.0.1:{port}", "--label", "http", "--requests", str(n),
                      "--workload", workloads], out / "http")
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        http_compiles = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                            if line.startswith("zimage_compilations_total{") and 'phase="serving"' in line)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    if http_only:
        summary = {"card": http.get("card"), "server_ready_s": round(ready_s, 1),
                   "http_compiles_after_ready": http_compiles,
                   "workloads": {h["workload"]: {"http_img_s": h["throughput_img_s"], "http_mp_s": h["megapixels_s"],
                                                 "http_p50_s": h["latency_p50_s"], "http_p99_s": h["latency_p99_s"],
                                                 "http_batches": h["batch_sizes"],
                                                 "http_steady_img_s": h.get("steady_img_s")}
                                 for h in http["runs"]}}
        (out / "http_vs_api.json").write_text(json.dumps(summary, indent=2))
        print(summary)
        return 0
    api = bench([config, *extra, "--label", "api", "--requests", str(n), "--workload", workloads], out / "api")
    summary = {"card": api.get("card"), "server_ready_s": round(ready_s, 1), "api_startup_s": api.get("startup_s"),
               "compiles_after_ready": api.get("compiles_after_ready"), "http_compiles_after_ready": http_compiles,
               "workloads": {}}
    for h, a in zip(http["runs"], api["runs"]):
        summary["workloads"][a["workload"]] = {
            "http_img_s": h["throughput_img_s"], "api_img_s": a["throughput_img_s"],
            "http_vs_api": round(h["throughput_img_s"] / a["throughput_img_s"], 4),
            "http_mp_s": h["megapixels_s"], "api_mp_s": a["megapixels_s"],
            "http_p50_s": h["latency_p50_s"], "api_p50_s": a["latency_p50_s"],
            "http_p99_s": h["latency_p99_s"], "api_p99_s": a["latency_p99_s"],
            "http_batches": h["batch_sizes"], "api_batches": a["batch_sizes"],
            # the rate once every client has had an answer (bench's steady_img_s), beside the whole phase's
            "http_steady_img_s": h.get("steady_img_s"), "api_steady_img_s": a.get("steady_img_s"),
            "http_vs_api_steady": round(h["steady_img_s"] / a["steady_img_s"], 4)
            if h.get("steady_img_s") and a.get("steady_img_s") else None}
    (out / "http_vs_api.json").write_text(json.dumps(summary, indent=2))
    print(summary)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--config", default="benchmarks/configs/gpu-random.yaml")
    ap.add_argument("--workload", default="uniform")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--http-only", action="store_true")
    a = ap.parse_args()
    sys.exit(main(a.out, a.requests, a.config, a.workload, tuple(a.set), a.http_only))
