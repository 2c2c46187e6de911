"""How images/s through the HTTP service scale with the number of front doors (issue "Scale out the front door").

Each front door is a real `serve` process (the FastAPI app, its router, answers rendered as the service renders them)
over fake replicas that answer at once with a finished 1024x1024 image. The image is photograph-like, synthesised
deterministically (smooth light, textures at several scales, sensor noise, hard and soft edges), so it compresses like
a photo, not like a gradient; it is encoded for real:

- ``--encode-at replica`` (the default, as served now): the replicas encode on their nodes, so the fakes hand the
  front door the PNG bytes (encoded once, here, with the service's encoder) and the front door forwards them
  (base64, the JSON body, HTTP);
- ``--encode-at frontdoor`` (as before encoding moved): the fakes hand over pixels and each front door encodes every
  image itself.

A multi-process load generator (``--clients`` processes per front door, each ``--threads`` keep-alive connections)
keeps every front door busy; client processes are spread over the front doors. Reported per front-door count:
images/s, per front door, latency percentiles, and the scaling efficiency against linear (images/s with N front doors
over N times the images/s of one); and how many GPUs one front door feeds at 1.5 images/s each (an H100 with fp8).
CPU only; nothing here needs a GPU or Ray.

    python benchmarks/frontdoor_scale.py --frontdoors 1,2,4 --out frontdoor-scale      # 16 cores: about 2 minutes
    python benchmarks/frontdoor_scale.py --frontdoors 1,2 --duration 8                  # a small machine
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPU_IMAGES_PER_S = 1.5  # one H100, fp8, compiled, 1024x1024 (README)
REPLICAS = 16  # fake replicas behind each front door: never the bottleneck


# ---- the test image -----------------------------------------------------------------------------------------
def photo_like(size: int = 1024, seed: int = 7):
    """A deterministic photograph-like RGB image: a lit scene (sky-to-ground light, a few smooth colour fields),
    objects with hard and blurred edges, texture at 256/64/16/4 px and per-pixel sensor noise. At PNG level 1 it
    compresses to about half its raw size, as photographs do (a plain gradient would shrink to a few percent)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size

    def value_noise(cell: int):
        grid = rng.random((size // cell + 2, size // cell + 2, 3)).astype(np.float32)
        gy, gx = y * size / cell, x * size / cell
        y0, x0 = gy.astype(int), gx.astype(int)
        fy, fx = (gy - y0)[..., None], (gx - x0)[..., None]
        fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)  # smoothstep: no grid lines
        top = grid[y0, x0] * (1 - fx) + grid[y0, x0 + 1] * fx
        bottom = grid[y0 + 1, x0] * (1 - fx) + grid[y0 + 1, x0 + 1] * fx
        return top * (1 - fy) + bottom * fy

    sky = np.stack([0.35 + 0.3 * (1 - y), 0.5 + 0.25 * (1 - y), 0.75 + 0.2 * (1 - y)], -1)
    ground = np.stack([0.35 + 0.2 * y, 0.3 + 0.15 * y, 0.18 + 0.1 * y], -1)
    horizon = 0.55 + 0.05 * np.sin(9 * x)
    img = np.where((y < horizon)[..., None], sky, ground)
    for cell, amp in ((256, 0.18), (64, 0.10), (16, 0.06), (4, 0.035)):
        img = img + amp * (value_noise(cell) - 0.5)
    shade = 0.75 + 0.25 * value_noise(32)  # surface texture of the objects
    for _ in range(14):  # objects: discs and boxes, some with soft edges
        cy, cx, r = rng.random(), rng.random(), 0.03 + 0.12 * rng.random()
        colour = rng.random(3).astype(np.float32)
        if rng.random() < 0.5:
            d = np.sqrt((y - cy) ** 2 + (x - cx) ** 2) - r
        else:
            d = np.maximum(np.abs(y - cy), np.abs(x - cx) * (0.5 + rng.random())) - r
        soft = 0.002 if rng.random() < 0.6 else 0.02
        alpha = np.clip(0.5 - d / soft, 0, 1)[..., None]
        img = img * (1 - alpha) + alpha * colour * shade
    img = img + rng.normal(0, 0.012, img.shape).astype(np.float32)  # sensor noise
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


# ---- one front door (a subprocess) -----------------------------------------------------------------------------
def serve(port: int, encode_at: str, image_path: str) -> None:
    """A front door: the real app over fake instant replicas holding the test image."""
    from dataclasses import dataclass, replace

    import numpy as np
    import uvicorn

    from orchestrator.deployment import Deployment
    from orchestrator.http_guard import uvicorn_config
    from orchestrator.server import create_app
    from zimage_common.config import config_from_dict
    from zimage_common.image_codec import EncodedImage, encode_image
    from zimage_common.messages import BatchResult, ImageResult, ReplicaHealth, StageTimes

    pixels = np.load(image_path)
    png = encode_image(pixels, "png")

    @dataclass(frozen=True)
    class Node:
        name: str
        node_id: str
        gpus: int = 1

    class Instant:
        def __init__(self, spec):
            self.replica_id, self.node = spec.replica_id, spec.node
            self.max_pixels, self.max_batch_tokens = spec.max_pixels, spec.max_batch_tokens

        async def run(self, batch, on_progress=None):
            out = []
            for r in batch.requests:
                res = ImageResult(r.request_id, True, self.replica_id, batch.batch_id, len(batch), r.seed, r.width,
                                  r.height, stage_times=StageTimes(total_s=0.001), prompt_tokens=12,
                                  image_tokens=(r.width // 16) * (r.height // 16))
                if r.output_format == "png":  # encoded at the replica: the bytes a replica sends
                    res = replace(res, encoded=EncodedImage("png", r.output_compression, png))
                else:
                    res = replace(res, image=pixels)
                out.append(res)
            return BatchResult(batch.batch_id, self.replica_id, tuple(out), StageTimes(total_s=0.001))

        async def start(self, timeout_s):
            return await self.health()

        async def health(self):
            return ReplicaHealth(self.replica_id, True, {}, "bfloat16", pid=os.getpid(), max_side=8192)

        async def check(self):
            return 0.0

        async def queue_len(self):
            return 0

        async def call(self, method, *args, **kwargs):
            return []

        def kill(self, no_restart=False):
            pass

        def close(self):
            pass

    class Backend:
        def connect(self, cluster):
            pass

        def live_nodes(self):
            return [Node(f"n{i}", f"id{i}") for i in range(REPLICAS)]

        def probe_gpu_memory_gib(self, node):
            return 80.0

        def node_alive(self, node_id):
            return True

        def make_replica(self, spec, encoder_host=None):
            return Instant(spec)

    config = config_from_dict({
        "model": {"source": "random-full", "dtype": "bfloat16"},
        "deployment": {"mode": "replicate", "replicas": REPLICAS, "warmup": False,
                       "health_interval_s": 3600},
        "router": {"max_batch_size": 4, "max_wait_ms": 2, "queue_limit": 100_000, "request_timeout_s": 300},
        "defaults": {"width": 1024, "height": 1024, "num_inference_steps": 9},
        "cluster": {"gpu_memory_gib": 80},
        "frontdoor": {"encode_on_replica": encode_at == "replica", "name": f"bench-{port}"},
    }, "<frontdoor_scale>")

    async def start(cfg, observer=None):
        return await Deployment.start(cfg, observer=observer, backend=Backend())

    app = create_app(config, deployment_factory=start)
    uvicorn.Server(uvicorn_config(app, config.server, "127.0.0.1", port, log_level="warning",
                                  access_log=False)).run()


# ---- the load generator (client processes) -------------------------------------------------------------------
BODY = json.dumps({"model": "z-image-turbo", "prompt": "a red fox in fresh snow, morning light, 85mm photo",
                   "size": "1024x1024", "n": 1}).encode()


def client(port: int, threads: int, start_at: float, stop_at: float, out: mp.Queue) -> None:
    """Keep ``threads`` requests in flight at one front door; report (finish time, latency, status, bytes)."""
    done: list[tuple[float, float, int, int]] = []
    lock = threading.Lock()

    def loop():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while time.time() < stop_at:
            t0 = time.time()
            try:
                conn.request("POST", "/v1/images/generations", body=BODY,
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                status, data = 0, b""
            t1 = time.time()
            if t1 >= start_at:
                with lock:
                    done.append((t1, t1 - t0, status, len(data)))
        conn.close()

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put(done)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-3000:] if proc.stderr else ""
            raise RuntimeError(f"front door on port {port} exited with {proc.returncode}:\n{err}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/readyz")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"front door on port {port} was not ready within {timeout_s}s")


def check_answer(port: int, pixels) -> int:
    """One request, decoded: the answer is the test image, 1024x1024, losslessly. Returns its PNG's bytes."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request("POST", "/v1/images/generations", body=BODY, headers={"Content-Type": "application/json"})
    body = json.loads(c.getresponse().read())
    png = base64.b64decode(body["data"][0]["b64_json"])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), pixels), "the front door changed the image"
    return len(png)


def run_count(n: int, args, image_path: str, pixels) -> dict:
    ports = [free_port() for _ in range(n)]
    # the repository first, and whatever the caller's path holds after it (installed dependencies may live there)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, __file__, "--serve", str(p), "--encode-at", args.encode_at,
                               "--image", image_path], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for p in ports]
    try:
        for p, proc in zip(ports, procs):
            wait_ready(p, proc)
        png_bytes = check_answer(ports[0], pixels)
        start_at = time.time() + args.warmup
        stop_at = start_at + args.duration
        q: mp.Queue = mp.Queue()
        clients = [mp.Process(target=client, args=(ports[i % n], args.threads, start_at, stop_at, q))
                   for i in range(n * args.clients)]
        for c in clients:
            c.start()
        done = [x for _ in clients for x in q.get(timeout=args.warmup + args.duration + 600)]
        for c in clients:
            c.join()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    ok = [d for d in done if d[2] == 200 and d[0] <= stop_at]
    lat = sorted(d[1] for d in ok)
    ips = len(ok) / args.duration
    return {"frontdoors": n, "images": len(ok), "errors": sum(1 for d in done if d[2] != 200),
            "images_per_s": round(ips, 2), "per_frontdoor": round(ips / n, 2),
            "latency_p50_s": round(statistics.median(lat), 4) if lat else None,
            "latency_p95_s": round(lat[int(0.95 * (len(lat) - 1))], 4) if lat else None,
            "mb_per_s": round(sum(d[3] for d in ok) / args.duration / 1e6, 1), "png_bytes": png_bytes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frontdoors", default="1,2,4", help="front-door counts to run, comma-separated")
    ap.add_argument("--encode-at", choices=("replica", "frontdoor"), default="replica",
                    help="where PNG encoding happens (replica: as served now; frontdoor: as before)")
    ap.add_argument("--clients", type=int, default=2, help="load-generator processes per front door")
    ap.add_argument("--threads", type=int, default=6, help="connections (requests in flight) per client process")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds measured per count")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
    ap.add_argument("--out", default=None, help="directory for frontdoor_scale.json")
    ap.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--image", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve is not None:
        serve(args.serve, args.encode_at, args.image)
        return 0

    import tempfile

    import numpy as np

    from zimage_common.image_codec import encode_image

    counts = [int(x) for x in args.frontdoors.split(",") if x.strip()]
    t0 = time.perf_counter()
    pixels = photo_like()
    t1 = time.perf_counter()
    png = encode_image(pixels, "png")
    encode_s = time.perf_counter() - t1
    print(f"test image: 1024x1024, PNG (level 1) {len(png) / 1e6:.2f} MB = {len(png) / pixels.nbytes:.2f} of raw, "
          f"encoded in {encode_s * 1000:.0f} ms (synthesised in {t1 - t0:.1f}s); {os.cpu_count()} CPUs", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        image_path = os.path.join(tmp, "photo.npy")
        np.save(image_path, pixels)
        for n in counts:
            row = run_count(n, args, image_path, pixels)
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = next((r["images_per_s"] for r in rows if r["frontdoors"] == 1), None)
    for r in rows:
        r["efficiency_vs_linear"] = round(r["images_per_s"] / (base * r["frontdoors"]), 3) if base else None
    report = {"encode_at": args.encode_at, "cpus": os.cpu_count(), "duration_s": args.duration,
              "clients_per_frontdoor": args.clients, "threads_per_client": args.threads,
              "image": {"png_bytes": len(png), "ratio_to_raw": round(len(png) / pixels.nbytes, 3),
                        "encode_ms": round(encode_s * 1000, 1)},
              "rows": rows, "gpus_fed_by_one_frontdoor": round(base / GPU_IMAGES_PER_S, 1) if base else None,
              "wall_s": round(time.perf_counter() - t0, 1)}
    print()
    print(f"{'front doors':>11} {'images/s':>9} {'per door':>9} {'vs linear':>9} {'p50 s':>7} {'p95 s':>7} "
          f"{'errors':>6}")
    for r in rows:
        print(f"{r['frontdoors']:>11} {r['images_per_s']:>9} {r['per_frontdoor']:>9} "
              f"{r['efficiency_vs_linear'] if r['efficiency_vs_linear'] is not None else '-':>9} "
              f"{r['latency_p50_s']:>7} {r['latency_p95_s']:>7} {r['errors']:>6}")
    if base:
        print(f"one front door: {base} images/s = the output of {report['gpus_fed_by_one_frontdoor']} GPUs at "
              f"{GPU_IMAGES_PER_S} images/s each (encoding at the {args.encode_at})")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "frontdoor_scale.json").write_text(json.dumps(report, indent=2))
        print(f"wrote {out / 'frontdoor_scale.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
