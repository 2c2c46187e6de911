"""Soak and abuse run against the HTTP service: slow clients, big uploads, huge images, adapter churn and hostile
adapter files, disconnects and a schema fuzz of generations and edits, while a canary checks that other requests'
images never change.

The server is this project's own (``create_app`` under ``http_guard.uvicorn_config``, its limits at their defaults)
in a process of its own, so that its memory, descriptors and log are its alone; its replicas are fakes without
Ray or a model (tests/test_replicas.py's ``FakeProcess``: an image that encodes the request's seed and prompt),
except for LoRA registration, which runs ``PipelineWorker``'s own code over a ``LoraStore`` of the tiny
transformer, on a thread as a replica's actor thread would.

    python tests/soak.py --profile short       # what tests/test_abuse.py runs in CI (< 60 s)
    python tests/soak.py --profile long --out soak-out    # the long form (docs/hardening.md has its counts)

Prints and writes ``soak.json``: per phase what was sent, the statuses that came back, and the measures the
checks read.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

KEY = "sk-soak"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROFILES = {
    "short": {"slow": 600, "flood_s": 3, "uploads": 6, "upload_mb": 20, "big_pngs": 3, "registrations": 30,
              "lora_cap": 8, "hostile": 6, "disconnects": 25, "fuzz": 250},
    "long": {"slow": 10_000, "flood_s": 45, "uploads": 30, "upload_mb": 60, "big_pngs": 12, "registrations": 300,
             "lora_cap": 16, "hostile": 40, "disconnects": 1000, "fuzz": 10_000},
}


def server_config(lora_dir: str, lora_cap: int):
    from zimage_common.config import config_from_dict

    return config_from_dict({
        "model": {"source": "tiny", "dtype": "float32", "lora_max_resident": 2, "lora_dir": lora_dir,
                  "lora_max_runtime": lora_cap},
        "deployment": {"mode": "replicate", "replicas": 2, "cpu_per_replica": 0, "health_interval_s": 3600},
        "router": {"max_batch_size": 8, "max_wait_ms": 2, "queue_limit": 4096, "request_timeout_s": 60},
        "defaults": {"width": 64, "height": 64, "num_inference_steps": 2},
        "limits": {"max_n": 4, "max_pixels": 256 * 256},
        "cluster": {"gpu_memory_gib": 24},
        "server": {"api_keys": [KEY]},
    })


# ---- the server process --------------------------------------------------------------------------------------
def serve(port_file: str, lora_dir: str, lora_cap: int) -> None:
    import logging
    from types import SimpleNamespace

    import uvicorn
    from test_replicas import FakeBackend, FakeNode

    from actors.lora import LoraStore, random_lora_state_dict, save_diffusers_lora
    from actors.models import build_pipeline
    from actors.worker import PipelineWorker
    from orchestrator.deployment import Deployment
    from orchestrator.http_guard import uvicorn_config
    from orchestrator.server import create_app

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = server_config(lora_dir, lora_cap)
    transformer = build_pipeline("tiny", seed=3).transformer
    sd, meta = random_lora_state_dict(transformer, 4)
    save_diffusers_lora(Path(lora_dir) / "good", sd, meta)
    # PEFT would run these keys as regular expressions against module names an attacker also chose: a
    # replica's interpreter held for minutes (catastrophic backtracking).
    evil = {f"transformer.{'a' * 40}.{k.split('.', 1)[1]}": v for k, v in list(sd.items())[:2]}
    save_diffusers_lora(Path(lora_dir) / "hostile", evil, {**meta, "rank_pattern": {"(a|aa)+$": 2}})

    class Backend(FakeBackend):
        def make_replica(self, spec, encoder_host=None):
            r = super().make_replica(spec, encoder_host)
            worker = SimpleNamespace(engine=SimpleNamespace(loras=LoraStore(transformer, 2)), model_cfg=cfg.model,
                                     replica_id=spec.replica_id)

            async def call(method, *args, **kwargs):
                return await asyncio.to_thread(getattr(PipelineWorker, method), worker, *args, **kwargs)

            async def run(batch, on_progress=None, run=r.run):  # no previews from the fake: the final images only
                return await run(batch)

            r.call, r.run = call, run
            return r

    async def factory(config, observer=None):
        return await Deployment.start(config, observer=observer,
                                      backend=Backend(FakeNode("n0", "id0"), FakeNode("n1", "id1")))

    app = create_app(cfg, deployment_factory=factory)
    server = uvicorn.Server(uvicorn_config(app, cfg.server, "127.0.0.1", 0, log_level="info", access_log=False,
                                           log_config=None))

    lag = {"max": 0.0, "gc_max": 0.0, "gc_t0": 0.0}

    def gc_timer(phase, info):
        if phase == "start":
            lag["gc_t0"] = time.perf_counter()
        elif info["generation"] == 2:
            lag["gc_max"] = max(lag["gc_max"], time.perf_counter() - lag["gc_t0"])

    import gc

    gc.callbacks.append(gc_timer)

    async def watch_loop():
        """The server loop's longest stall per 0.1 s tick, logged every 5 s (``loop lag`` lines)."""
        last_log = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(0.1)
            lag["max"] = max(lag["max"], time.perf_counter() - t0 - 0.1)
            if time.perf_counter() - last_log > 5:
                logging.getLogger("soak").info("loop lag max %.3f s (longest full garbage collection %.3f s)",
                                               lag["max"], lag["gc_max"])
                lag["max"], lag["gc_max"], last_log = 0.0, 0.0, time.perf_counter()

    async def main():
        asyncio.ensure_future(watch_loop())
        task = asyncio.ensure_future(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        Path(port_file).write_text(str(server.servers[0].sockets[0].getsockname()[1]))
        await task

    asyncio.run(main())


# ---- client helpers ---------------------------------------------------------------------------------------------
def png(w: int, h: int, color=(90, 120, 30), mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (w, h), color if mode == "RGB" else (*color, 0)).save(buf, format="PNG")
    return buf.getvalue()


def multipart(fields: dict, files: list[tuple[str, bytes, str | None]], boundary: str = "soakBoundary7") \
        -> tuple[dict, bytes]:
    out = bytearray()
    for k, v in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode() + v + b"\r\n"
    for name, data, filename in files:
        fn = f'; filename="{filename}"' if filename is not None else ""
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{fn}\r\n' \
               f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return {"content-type": f"multipart/form-data; boundary={boundary}", **AUTH}, bytes(out)


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


class Canary:
    """Fixed requests sent in rounds all through the run; each answer must be the image the first round got."""

    REQUESTS = [{"prompt": "a red fox in snow", "seed": 7}, {"prompt": "lighthouse", "seed": 123, "n": 2},
                {"prompt": "a bowl of ramen on a wooden table", "seed": 99, "size": "128x64"}]

    def __init__(self, url: str):
        self.url = url
        self.baseline: list | None = None
        self.rounds = self.changed = self.refused = self.transport_errors = 0
        self.stop = False

    async def post(self, client, path, **kw):
        """A POST, sent again on a new connection if the server had closed the pooled one (an idle keep-alive
        connection is what the server closes first when it sheds connections)."""
        import httpx

        try:
            return await client.post(f"{self.url}{path}", **kw)
        except httpx.TransportError:
            self.transport_errors += 1
            return await client.post(f"{self.url}{path}", **kw)

    async def one_round(self, client) -> list | None:
        out = []
        for body in self.REQUESTS:
            r = await self.post(client, "/v1/images/generations", json=body, headers=AUTH)
            if r.status_code != 200:
                self.refused += 1
                return None
            out.append([d["b64_json"] for d in r.json()["data"]])
        h, b = multipart({"prompt": b"edit me", "seed": b"5"}, [("image", png(48, 32), "in.png")])
        r = await self.post(client, "/v1/images/edits", content=b, headers=h)
        if r.status_code != 200:
            self.refused += 1
            return None
        out.append([d["b64_json"] for d in r.json()["data"]])
        return out

    async def run(self, client):
        while self.baseline is None:
            self.baseline = await self.one_round(client)
        while not self.stop:
            got = await self.one_round(client)
            if got is not None:
                self.rounds += 1
                self.changed += got != self.baseline
            await asyncio.sleep(0.2)


# ---- phases -----------------------------------------------------------------------------------------------------
def probe(port: int, seconds: float) -> None:
    """``/healthz`` on a fresh connection every 0.2 s for ``seconds``; prints the latencies (None: failed or over
    5 s) as JSON. A process of its own, so that the flooding client's event loop does not delay the measure."""
    import socket

    out = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            out.append(time.perf_counter() - t0 if data.startswith(b"HTTP/1.1 200") else None)
        except OSError:
            out.append(None)
        time.sleep(0.2)
    print(json.dumps(out))


async def slow_clients(port: int, n: int, seconds: float) -> dict:
    """``n`` connections that trickle header lines and never finish them, reconnecting when closed."""
    stop = asyncio.Event()
    stats = Counter()

    async def slow_client(i: int):
        await asyncio.sleep(i * min(5.0, seconds / 3) / n)  # ramp up over a few seconds
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                stats["connect_failed"] += 1
                await asyncio.sleep(0.5)
                continue
            stats["opened"] += 1
            try:
                writer.write(b"POST /v1/images/generations HTTP/1.1\r\nHost: soak\r\n")
                while not stop.is_set():
                    try:
                        if await asyncio.wait_for(reader.read(1024), random.uniform(1, 3)) == b"":
                            stats["closed_by_server"] += 1
                            break
                    except asyncio.TimeoutError:
                        writer.write(b"X-Slow: 1\r\n")
                        await writer.drain()
            except OSError:
                stats["closed_by_server"] += 1
            finally:
                writer.close()

    tasks = [asyncio.ensure_future(slow_client(i)) for i in range(n)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return dict(stats)


async def flood_phase(port: int, n: int, seconds: float, log_path: Path) -> dict:
    """The slow clients (a process of their own, at a lower CPU priority, as they would come from another
    machine rather than take half of this shared box's cores), while a fresh connection asks /healthz every
    0.2 s (a third process, at normal priority, so that neither client's event loop delays the measure)."""
    size0 = log_path.stat().st_size
    flood = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "flood", "--port", str(port), "--n", str(n), "--seconds", str(seconds + 2),
        stdout=subprocess.PIPE, preexec_fn=lambda: os.nice(10))
    await asyncio.sleep(2)
    prober = await asyncio.create_subprocess_exec(sys.executable, __file__, "probe", "--port", str(port),
                                                  "--seconds", str(seconds), stdout=subprocess.PIPE)
    answers = json.loads((await prober.communicate())[0])
    stats = json.loads((await flood.communicate())[0])
    latencies = [a for a in answers if a is not None]
    return {"slow_connections": n, "seconds": seconds, **stats, "healthz_probes": len(answers),
            "healthz_failed": len(answers) - len(latencies), "healthz_p50_s": pct(latencies, 0.5),
            "healthz_p99_s": pct(latencies, 0.99), "healthz_max_s": pct(latencies, 1.0),
            "log_growth_bytes": log_path.stat().st_size - size0}


async def upload_phase(url: str, pid: int, n: int, mb: int, bound: int) -> dict:
    """``n`` concurrent multipart edits of ``mb`` MB each (one image part of that size), the server's RSS
    sampled meanwhile."""
    import httpx
    import psutil

    proc = psutil.Process(pid)
    junk = b"\x89PNG\r\n\x1a\n" + os.urandom(mb * 1_000_000)
    h, body = multipart({"prompt": b"x"}, [("image", junk, "big.png")])
    del junk
    samples = []
    for _ in range(5):
        samples.append(proc.memory_info().rss)
        await asyncio.sleep(0.05)
    base = statistics.median(samples)
    peak, done = base, False

    async def sample():
        nonlocal peak
        while not done:
            peak = max(peak, proc.memory_info().rss)
            await asyncio.sleep(0.02)

    sampler = asyncio.ensure_future(sample())
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n)) as c:
        rs = await asyncio.gather(*(c.post(f"{url}/v1/images/edits", content=body, headers=h) for _ in range(n)),
                                  return_exceptions=True)
    done = True
    await sampler
    statuses = Counter(r.status_code if not isinstance(r, BaseException) else type(r).__name__ for r in rs)
    envelopes = sum(1 for r in rs if not isinstance(r, BaseException) and "request_id" in r.json().get("error", {}))
    return {"uploads": n, "mb_each": mb, "statuses": dict(statuses), "envelopes_with_request_id": envelopes,
            "rss_base_mb": round(base / 2**20, 1), "rss_growth_mb": round((peak - base) / 2**20, 1),
            "allowed_growth_mb": round(bound / 2**20 + 100, 1)}


async def decode_phase(url: str, n_big: int) -> dict:
    """``n_big`` edits of 40-megapixel PNGs at once, and small edits meanwhile: how long the small ones take."""
    import httpx

    big = png(8000, 5000)
    small = png(64, 48)
    async with httpx.AsyncClient(timeout=120) as c:
        def edit(data):
            h, b = multipart({"prompt": b"x", "size": b"64x64"}, [("image", data, "a.png")])
            return c.post(f"{url}/v1/images/edits", content=b, headers=h)

        async def smalls():
            out = []
            for _ in range(10):
                t0 = time.perf_counter()
                r = await edit(small)
                out.append((r.status_code, time.perf_counter() - t0))
                await asyncio.sleep(0.1)
            return out

        t0 = time.perf_counter()
        bigs = [asyncio.ensure_future(edit(big)) for _ in range(n_big)]
        small_out = await smalls()
        big_out = await asyncio.gather(*bigs)
        total = time.perf_counter() - t0
    return {"big_edits": n_big, "big_statuses": dict(Counter(r.status_code for r in big_out)),
            "small_statuses": dict(Counter(s for s, _ in small_out)),
            "small_p50_s": pct([t for _, t in small_out], 0.5), "small_max_s": pct([t for _, t in small_out], 1.0),
            "phase_s": round(total, 2)}


async def adapter_phase(url: str, registrations: int, hostile: int) -> dict:
    import httpx

    out: dict = {}
    async with httpx.AsyncClient(timeout=60) as c:
        async def generation_latencies(k: int) -> list[float]:
            lats = []
            for i in range(k):
                t0 = time.perf_counter()
                r = await c.post(f"{url}/v1/images/generations", json={"prompt": f"p{i}", "seed": i}, headers=AUTH)
                assert r.status_code == 200, r.text
                lats.append(time.perf_counter() - t0)
            return lats

        # A hostile adapter file registered again and again while 200 generations are timed; against the same
        # with a harmless refusal (a missing file) sent as often, and with nothing beside.
        async def while_registering(path: str | None) -> tuple[list[float], list]:
            out_regs, sampled = [], asyncio.Event()

            async def register():
                while len(out_regs) < hostile or not sampled.is_set():
                    t0 = time.perf_counter()
                    r = await c.post(f"{url}/v1/loras", json={"name": "evil", "path": path}, headers=AUTH)
                    out_regs.append((r.status_code, r.json()["error"].get("param"), time.perf_counter() - t0))

            registering = asyncio.ensure_future(register()) if path else None
            lats = await generation_latencies(200)
            sampled.set()
            if registering is not None:
                await registering
            return lats, out_regs

        quiet, _ = await while_registering(None)
        benign, benign_out = await while_registering("missing.safetensors")
        under, hostile_out = await while_registering("hostile")
        out["hostile_attempts"] = len(hostile_out)
        out["hostile_statuses"] = dict(Counter(f"{s} param={p}" for s, p, _ in hostile_out))
        out["hostile_max_s"] = pct([t for _, _, t in hostile_out], 1.0)
        out["benign_refusals"] = len(benign_out)
        out["generation_p99_s_quiet"] = pct(quiet, 0.99)
        out["generation_p99_s_beside_benign_refusals"] = pct(benign, 0.99)
        out["generation_p99_s_during_hostile"] = pct(under, 0.99)
        out["generations_during_hostile"] = len(under)

        # Registrations with distinct names until the cap, and past it.
        statuses = []
        for i in range(registrations):
            r = await c.post(f"{url}/v1/loras", json={"name": f"churn{i}", "path": "good"}, headers=AUTH)
            statuses.append(r.status_code)
        out["registrations"] = registrations
        out["registered"] = statuses.count(201)
        out["first_refusal_at"] = next((i for i, s in enumerate(statuses) if s != 201), None)
        out["refusal_statuses"] = dict(Counter(s for s in statuses if s != 201))
        churn = Counter()
        for i in range(out["registered"]):  # remove one, add one: the cap counts adapters held, not ever added
            churn[(await c.delete(f"{url}/v1/loras/churn{i}", headers=AUTH)).status_code] += 1
            churn[(await c.post(f"{url}/v1/loras", json={"name": f"again{i}", "path": "good"},
                                headers=AUTH)).status_code] += 1
        out["churn_statuses"] = dict(churn)
        listing = (await c.get(f"{url}/v1/loras", headers=AUTH)).text
        out["listing_has_host_paths"] = str(HERE.parent) in listing or "/tmp/" in listing
    return out


async def disconnect_phase(port: int, n: int) -> dict:
    """``n`` clients that send headers and part of a body, then close."""
    for i in range(n):
        if i % 2:  # an edit whose image part is cut off
            path, ctype = "/v1/images/edits", "multipart/form-data; boundary=xx"
            part = b'--xx\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + b"\0" * 500
        else:
            path, ctype, part = "/v1/images/generations", "application/json", b'{"prompt": "' + b"a" * 500
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST {path} HTTP/1.1\r\nHost: soak\r\nAuthorization: Bearer {KEY}\r\nContent-Type: {ctype}"
                     f"\r\nContent-Length: 100000\r\n\r\n".encode() + part)
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.close()
    return {"disconnects": n}


def fuzz_phase(url: str, n: int) -> dict:
    """``n`` requests generated from OpenAI's schemas (CreateImageRequest; CreateImageEditRequest as multipart and
    as JSON with data: URLs): valid ones, ones with a field replaced by any value, an unknown key, files of every
    kind, and raw bytes. Counts statuses, 5xx and error bodies outside the envelope or without a request id."""
    import httpx
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from openai_spec import schema, strategy

    gen_schema = schema("CreateImageRequest")
    gen_schema["properties"]["prompt"] = {"type": "string", "minLength": 0, "maxLength": 40}
    edit_schema = schema("CreateImageEditRequest")
    for f in ("image", "mask"):
        edit_schema["properties"].pop(f)
    edit_schema["properties"]["prompt"] = {"type": "string", "minLength": 0, "maxLength": 40}
    edit_schema["required"] = [r for r in edit_schema.get("required", []) if r not in ("image", "mask")]
    anything = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                            | st.text(max_size=20),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=8)
    files = [png(64, 48), png(16, 16), png(64, 48, mode="RGBA"), b"", b"GIF89a not really", b"\x89PNG\r\n\x1a\n",
             base64.b64decode("/9j/4AAQSkZJRgABAQ=="), os.urandom(200), png(4000, 16)]
    stats = Counter()
    bad: list = []
    http = httpx.Client(timeout=60, headers=AUTH)

    def tame(draw, req: dict) -> dict:
        """Servable on this deployment (so that some requests run): small sizes and n."""
        req["size"] = draw(st.sampled_from([None, "auto", "64x64", "16x128"]))
        req["model"] = draw(st.sampled_from([None, "z-image-turbo"]))
        if isinstance(req.get("n"), int):
            req["n"] = min(req["n"], 2)
        for k in ("output_compression", "background", "response_format", "style"):
            req.pop(k, None)
        return req

    def mutate(draw, req: dict, fields: list[str]) -> dict:
        kind = draw(st.sampled_from(["spec", "servable", "servable", "field", "key"]))
        if kind == "servable":
            return tame(draw, req)
        if kind == "field":
            req[draw(st.sampled_from(fields))] = draw(anything)
        elif kind == "key":
            req[draw(st.text(min_size=1, max_size=12))] = draw(anything)
        return req

    def text(v) -> bytes:
        if isinstance(v, bool):
            return b"true" if v else b"false"
        if v is None:
            return b""
        if isinstance(v, (dict, list)):
            return json.dumps(v).encode()
        return str(v).encode("utf-8", "surrogatepass")

    @st.composite
    def request(draw):
        route = draw(st.sampled_from(["gen", "gen", "edit-multipart", "edit-multipart", "edit-json", "bytes"]))
        if route == "bytes":
            return (route, "/v1/images/" + draw(st.sampled_from(["generations", "edits"])),
                    draw(st.binary(max_size=64)),
                    {"content-type": draw(st.sampled_from(["application/json", "multipart/form-data; boundary=b",
                                                          "text/plain"]))})
        if route == "gen":
            req = mutate(draw, draw(strategy(gen_schema)), sorted(gen_schema["properties"]) + ["seed", "loras"])
            return route, "/v1/images/generations", json.dumps(req).encode(), {"content-type": "application/json"}
        req = mutate(draw, draw(strategy(edit_schema)), sorted(edit_schema["properties"]) + ["strength", "loras"])
        images = [draw(st.sampled_from(files)) for _ in range(draw(st.integers(0, 3)))]
        mask = draw(st.sampled_from([None, None, files[2], files[0]]))
        if route == "edit-json":
            req["images"] = [{"image_url": "data:image/png;base64," + base64.b64encode(i).decode()} for i in images]
            if mask is not None:
                req["mask"] = {"image_url": "data:image/png;base64," + base64.b64encode(mask).decode()}
            return route, "/v1/images/edits", json.dumps(req).encode(), {"content-type": "application/json"}
        parts = [(draw(st.sampled_from(["image", "image[]"])), i, draw(st.sampled_from(["a.png", None])))
                 for i in images] + ([("mask", mask, "m.png")] if mask is not None else [])
        h, body = multipart({k: text(v) for k, v in req.items()}, parts)
        return route, "/v1/images/edits", body, {"content-type": h["content-type"]}

    def send(kind, path, body, headers):
        r = http.post(url + path, content=body, headers=headers)
        stats[{"gen": "generations-json", "bytes": "raw-bytes"}.get(kind, kind), r.status_code] += 1
        if r.status_code >= 500:
            bad.append(("5xx", path, body[:200], r.text[:200]))
        elif r.status_code != 200:
            err = r.json().get("error") if r.headers.get("content-type", "").startswith("application/json") else None
            if not isinstance(err, dict) or not {"message", "type", "param", "code", "request_id"} <= set(err):
                bad.append(("not an envelope", path, body[:200], r.text[:200]))

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.generate])
    @given(request())
    def fuzz(req):
        send(*req)

    # one valid request of each kind first: the fuzz draws at random, so a run may draw no servable request of a
    # kind, and every kind must be seen served beside the fuzz
    data_url = "data:image/png;base64," + base64.b64encode(files[0]).decode()
    valid = {"prompt": "a red fox in snow", "size": "64x64"}
    h, body = multipart({k: text(v) for k, v in valid.items()}, [("image", files[0], "a.png")])
    try:
        send("gen", "/v1/images/generations", json.dumps(valid).encode(), {"content-type": "application/json"})
        send("edit-multipart", "/v1/images/edits", body, {"content-type": h["content-type"]})
        send("edit-json", "/v1/images/edits", json.dumps({**valid, "images": [{"image_url": data_url}]}).encode(),
             {"content-type": "application/json"})
        fuzz()
    finally:
        http.close()
    total = sum(stats.values())
    return {"requests": total, "by_kind_status": {f"{k[0]} {k[1]}": v for k, v in sorted(stats.items())},
            "5xx": sum(v for (_, s), v in stats.items() if s >= 500),
            "non_envelope_errors": sum(1 for b in bad if b[0] == "not an envelope"), "examples_bad": bad[:5]}


# ---- the run --------------------------------------------------------------------------------------------------
async def run(profile: str, out: Path, only: tuple[str, ...] = ()) -> dict:
    import httpx
    import psutil

    from orchestrator.http_guard import raise_fd_limit

    p = PROFILES[profile]
    raise_fd_limit()
    out.mkdir(parents=True, exist_ok=True)
    lora_dir = out / "loras"
    lora_dir.mkdir(exist_ok=True)
    port_file, log_path = out / "port", out / "server.log"
    port_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "serve", "--port-file", str(port_file), "--lora-dir",
                                 str(lora_dir), "--lora-cap", str(p["lora_cap"])], stdout=log, stderr=log, env=env)
    results: dict = {"profile": profile, **{f"param_{k}": v for k, v in p.items()}}
    try:
        t0 = time.time()
        while not port_file.exists() or not port_file.read_text():
            assert proc.poll() is None and time.time() - t0 < 120, log_path.read_text()[-3000:]
            await asyncio.sleep(0.1)
        port = int(port_file.read_text())
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(timeout=60) as client:
            while (await client.get(f"{url}/readyz")).status_code != 200:
                await asyncio.sleep(0.1)
            canary = Canary(url)
            canary_task = asyncio.ensure_future(canary.run(client))
            cfg = server_config(str(lora_dir), p["lora_cap"])
            phases = [
                ("flood", lambda: flood_phase(port, p["slow"], p["flood_s"], log_path)),
                ("uploads", lambda: upload_phase(url, proc.pid, p["uploads"], p["upload_mb"],
                                                 cfg.limits.max_inflight_upload_bytes)),
                ("decode", lambda: decode_phase(url, p["big_pngs"])),
                ("adapters", lambda: adapter_phase(url, p["registrations"], p["hostile"])),
                ("disconnects", lambda: disconnect_phase(port, p["disconnects"])),
                ("fuzz", lambda: asyncio.to_thread(fuzz_phase, url, p["fuzz"])),
            ]
            for name, phase in phases:
                if only and name not in only:
                    continue
                t = time.perf_counter()
                results[name] = await phase()
                results[name]["phase_s"] = round(time.perf_counter() - t, 2)
                print(name, json.dumps(results[name]), flush=True)
            canary.stop = True
            await canary_task
            metrics = (await client.get(f"{url}/metrics", headers=AUTH)).text
        results["canary"] = {"rounds": canary.rounds, "changed": canary.changed, "refused": canary.refused,
                             "resent_after_transport_error": canary.transport_errors}
        from prometheus_client.parser import text_string_to_metric_families

        results["http_responses"] = {s.labels["status"]: s.value for f in text_string_to_metric_families(metrics)
                                     for s in f.samples if s.name == "zimage_http_responses_total"}
        text = log_path.read_text(errors="replace")
        results["server_log"] = {"bytes": len(text), "error_lines": text.count(" ERROR "),
                                 "tracebacks": text.count("Traceback"),
                                 "client_disconnected_lines": text.count("client disconnected")}
        results["server_rss_mb"] = round(psutil.Process(proc.pid).memory_info().rss / 2**20, 1)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    (out / "soak.json").write_text(json.dumps(results, indent=2, default=str))
    return json.loads((out / "soak.json").read_text())  # as the file has it: string keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    s = sub.add_parser("serve")
    s.add_argument("--port-file", required=True)
    s.add_argument("--lora-dir", required=True)
    s.add_argument("--lora-cap", type=int, required=True)
    fl = sub.add_parser("flood")
    fl.add_argument("--port", type=int, required=True)
    fl.add_argument("--n", type=int, required=True)
    fl.add_argument("--seconds", type=float, required=True)
    pr = sub.add_parser("probe")
    pr.add_argument("--port", type=int, required=True)
    pr.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="short")
    ap.add_argument("--out", default="soak-out")
    ap.add_argument("--phases", default="", help="comma-separated phases to run (default: all)")
    args = ap.parse_args()
    if args.cmd == "serve":
        serve(args.port_file, args.lora_dir, args.lora_cap)
        return
    if args.cmd == "flood":
        from orchestrator.http_guard import raise_fd_limit

        raise_fd_limit()
        print(json.dumps(asyncio.run(slow_clients(args.port, args.n, args.seconds))))
        return
    if args.cmd == "probe":
        probe(args.port, args.seconds)
        return
    only = tuple(p for p in args.phases.split(",") if p)
    results = asyncio.run(run(args.profile, Path(args.out), only))
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
