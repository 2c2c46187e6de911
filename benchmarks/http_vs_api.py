"""The same uniform traffic (closed loop, concurrency 8, the config's default size) through the HTTP service and
through the Python API, one deployment each, one after the other on the same GPU; prints the HTTP/API ratio.

Usage: python3 benchmarks/http_vs_api.py OUT_DIR [REQUESTS] [CONFIG] (default 48, benchmarks/configs/gpu-random.yaml)
"""

import json
import signal
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


def main(out_dir: str, n: int = 48, config: str = "benchmarks/configs/gpu-random.yaml") -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    port = 8011
    with open(out / "serve.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", config, *COMPILE,
                                   "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < 300:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        ready_s = time.perf_counter() - t0
        http = bench(["--http", f"http://127.0.0.1:{port}", "--label", "http-uniform", "--requests", str(n)],
                     out / "http")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    api = bench([config, *COMPILE, "--label", "api-uniform", "--requests", str(n)], out / "api")
    h, a = http["runs"][0], api["runs"][0]
    summary = {"card": api.get("card"), "server_ready_s": round(ready_s, 1), "http_img_s": h["throughput_img_s"],
               "api_img_s": a["throughput_img_s"],
               "http_vs_api": round(h["throughput_img_s"] / a["throughput_img_s"], 4),
               "http_p50_s": h["latency_p50_s"], "api_p50_s": a["latency_p50_s"]}
    (out / "http_vs_api.json").write_text(json.dumps(summary, indent=2))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], *(int(a) if i == 0 else a for i, a in enumerate(sys.argv[2:]))))
