"""The load ``zimage-orch bench`` sends: a deterministic request stream per workload (``uniform``, ``varied``,
``mixed``, ``random``/``random-1mp`` from ``sizes.py``, and the edit and ControlNet workloads), closed and open
loops (Poisson arrivals), and the senders that submit through the Python API or over HTTP."""

from __future__ import annotations

import asyncio
import random
import time
from functools import lru_cache

from zimage_common.config import Config
from zimage_common.messages import ImageResult
from zimage_common.prompts import PROMPTS, varied_prompt

from .sizes import MENU_MP, draw_size

REALISTIC_SIZES = [(512, 512), (1024, 1024), (1024, 768), (768, 1344), (1344, 768)]
WORKLOADS = ("uniform", "varied", "mixed", "random", "random-1mp",
             "img2img", "inpaint", "edit-mix", "control", "control-mix")
EDIT_KINDS = {"img2img": ("img2img",), "inpaint": ("inpaint",), "edit-mix": ("t2i", "img2img", "inpaint"),
              "control": ("control",), "control-mix": ("t2i", "control")}


class RequestMaker:
    """Deterministic request stream: seed i, size drawn from ``sizes`` (mixed when several), prompt i of the
    bench prompts, or with ``varied`` a prompt of 3 to 160 words."""

    def __init__(self, config: Config | None, sizes: list[tuple[int, int]] | None, steps: int | None, seed: int = 0,
                 varied: bool = False, edits: tuple[str, ...] = (), strength: float = 0.6,
                 edit_steps: int | None = None, draw=None):
        self.config = config
        self.draw = draw  # rng -> (width, height): a new size per request (the random workloads)
        self.sizes = sizes  # None: let the server choose (its default size)
        self.steps = steps
        self.varied = varied
        self.edits = edits  # edit workloads: the kinds sent in turn (t2i, img2img, inpaint)
        self.strength = strength
        self.edit_steps = edit_steps
        self.rng = random.Random(seed)
        self.i = 0

    @classmethod
    def for_workload(cls, workload: str, config, sizes, steps, seed: int = 0, strength: float = 0.6,
                     edit_steps: int | None = None) -> RequestMaker:
        if workload == "mixed":
            return cls(config, sizes if sizes and len(sizes) > 1 else REALISTIC_SIZES, steps, seed, varied=True)
        if workload in ("random", "random-1mp"):
            max_pixels = config.limits.max_pixels if config is not None else 2048 * 2048
            area = MENU_MP if workload == "random-1mp" else None
            return cls(config, None, steps, seed, varied=True,
                       draw=lambda rng: draw_size(rng, max_pixels, area))
        if workload in EDIT_KINDS:
            if not sizes and config is not None:
                sizes = [(config.defaults.width, config.defaults.height)]
            return cls(config, sizes, steps, seed, edits=EDIT_KINDS[workload], strength=strength,
                       edit_steps=edit_steps)
        return cls(config, sizes, steps, seed, varied=workload == "varied")

    def params(self) -> dict:
        w = h = None
        if self.draw is not None:
            w, h = self.draw(self.rng)
        elif self.sizes:
            w, h = self.sizes[0] if len(self.sizes) == 1 else self.rng.choice(self.sizes)
        self.i += 1
        prompt = varied_prompt(self.rng) if self.varied else PROMPTS[self.i % len(PROMPTS)]
        p = {"prompt": prompt, "width": w, "height": h, "seed": self.i, "num_inference_steps": self.steps}
        kind = self.edits[self.i % len(self.edits)] if self.edits else "t2i"
        if kind == "control":  # text-to-image guided by a ControlNet (needs model.controlnet)
            p.update(kind=kind, control_image=edit_inputs(w, h)[0])
        elif kind != "t2i":
            image, mask = edit_inputs(w, h)
            p.update(kind=kind, image=image, mask=mask if kind == "inpaint" else None, strength=self.strength,
                     num_inference_steps=self.edit_steps or self.steps)
        return p


@lru_cache(maxsize=8)
def edit_inputs(width: int, height: int):
    """A synthetic input image for edit workloads (smooth gradients and rings: something a VAE encodes like a
    photo) and an inpainting mask (RGBA, transparent over the middle quarter), as uint8 arrays."""
    import numpy as np

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = np.hypot(x - width / 2, y - height / 2)
    image = np.stack([255 * x / width, 255 * y / height, 127.5 + 127.5 * np.sin(r / 23)], -1).astype(np.uint8)
    mask = np.full((height, width, 4), 255, np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4, 3] = 0
    return image, mask


@lru_cache(maxsize=8)
def _data_url(width: int, height: int) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(_png_of(width, height, 0)).decode()


@lru_cache(maxsize=16)
def _png_of(width: int, height: int, which: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(edit_inputs(width, height)[which]).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


async def closed_loop(send, maker: RequestMaker, concurrency: int, n: int, bar=None,
                      done_at: list[float] | None = None) -> tuple[list, float]:
    """``n`` requests from ``concurrency`` clients, each sending its next as its last returns; ``done_at`` (if given)
    collects each completion's time from the start, in completion order."""
    results: list = []
    remaining = [n]

    async def client():
        while remaining[0] > 0:
            remaining[0] -= 1
            results.append(await send(maker.params()))
            if done_at is not None:
                done_at.append(time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


def steady_throughput(done_at: list[float], concurrency: int) -> float | None:
    """Completions per second between the ``concurrency``-th completion and the last: a closed loop's rate once
    every client has had one answer, without the first round's start-up and with the drain's tail only at its end.
    None when fewer than ``2 * concurrency`` requests completed."""
    if len(done_at) < 2 * concurrency or concurrency < 1:
        return None
    span = done_at[-1] - done_at[concurrency - 1]
    return round((len(done_at) - concurrency) / span, 4) if span > 0 else None


def poisson_gaps(rate: float, seed: int):
    """The gaps between Poisson arrivals at ``rate`` per second, from ``seed``: ``open_loop`` waits each one after a
    send, so the same seed gives the same arrivals (``poisson_arrivals``)."""
    rng = random.Random(seed)
    while True:
        yield rng.expovariate(rate)


def poisson_arrivals(rate: float, n: int, seed: int) -> list[float]:
    """The send times ``open_loop(rate, n=n, seed=seed)`` aims at: the first at 0, then ``poisson_gaps``'s."""
    gaps = poisson_gaps(rate, seed)
    out, t = [], 0.0
    for _ in range(n):
        out.append(t)
        t += next(gaps)
    return out


async def open_loop(send, maker: RequestMaker, rate: float, duration: float | None = None, bar=None,
                    n: int | None = None, seed: int = 1) -> tuple[list, float]:
    """Poisson arrivals at ``rate`` per second (``poisson_gaps`` from ``seed``: the same arrivals for the same seed)
    for ``duration`` seconds and/or ``n`` requests; returns the results and the seconds from the first send to the
    last answer."""
    gaps = poisson_gaps(rate, seed)
    tasks = []
    t0 = time.perf_counter()
    while (n is None or len(tasks) < n) and (duration is None or time.perf_counter() - t0 < duration):
        tasks.append(asyncio.ensure_future(send(maker.params())))
        if bar is not None:
            tasks[-1].add_done_callback(lambda _: bar.update(1))
        await asyncio.sleep(next(gaps))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - t0


# ---- senders: Python API and HTTP ------------------------------------------------------------------------------
def api_sender(dep):
    kinds: dict[str, str] = {}  # request id -> t2i / img2img / inpaint, for mixed_batches

    async def send(p: dict) -> ImageResult:
        edit = {k: p[k] for k in ("image", "mask", "strength", "control_image") if p.get(k) is not None}
        (req,) = await dep.build_requests([p["prompt"]], width=p["width"], height=p["height"], seed=p["seed"],
                                          num_inference_steps=p["num_inference_steps"], **edit)
        kinds[req.request_id] = p.get("kind", "t2i")
        try:
            return await dep.submit(req)
        except Exception as e:  # noqa: BLE001 - rejections count as failures in the stats
            return ImageResult(req.request_id, ok=False, error=str(e), error_type=type(e).__name__)

    send.kinds = kinds
    return send


def mixed_batches(results: list[ImageResult], kinds: dict[str, str]) -> dict[str, int]:
    """How many batches of a run held each combination of request kinds (e.g. ``img2img+t2i``): whether edits
    shared packed batches with text-to-image."""
    by_batch: dict[int, set] = {}
    for r in results:
        if r.ok and r.request_id in kinds:
            by_batch.setdefault(r.batch_id, set()).add(kinds[r.request_id])
    out: dict[str, int] = {}
    for ks in by_batch.values():
        key = "+".join(sorted(ks))
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def http_sender(client, url: str, api_key: str | None):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def send(p: dict) -> ImageResult:
        body = {"prompt": p["prompt"], "seed": p["seed"]}
        if p["width"]:  # else the server's default size
            body["size"] = f"{p['width']}x{p['height']}"
        if p["num_inference_steps"]:
            body["num_inference_steps"] = p["num_inference_steps"]
        t0 = time.perf_counter()
        try:
            if p.get("image") is not None:  # an edit: multipart, the synthetic image (and mask) as PNG files
                w, h = p["width"], p["height"]
                files = [("image", ("image.png", _png_of(w, h, 0), "image/png"))]
                if p.get("mask") is not None:
                    files.append(("mask", ("mask.png", _png_of(w, h, 1), "image/png")))
                data = {k: str(v) for k, v in {**body, "strength": p["strength"]}.items()}
                r = await client.post(f"{url}/v1/images/edits", data=data, files=files, headers=headers)
            else:
                if p.get("control_image") is not None:
                    body["control_image"] = _data_url(p["width"], p["height"])
                r = await client.post(f"{url}/v1/images/generations", json=body, headers=headers)
        except Exception as e:  # noqa: BLE001
            return ImageResult("http", ok=False, error=str(e), error_type=type(e).__name__)
        lat = time.perf_counter() - t0
        if r.status_code != 200:
            return ImageResult("http", ok=False, error=r.text[:200], error_type=str(r.status_code), latency_s=lat)
        w, h = _png_size(r.json()["data"][0].get("b64_json") or "")
        return ImageResult("http", ok=True, batch_id=-1, latency_s=lat, width=w, height=h)

    return send


async def server_batch_counts(client, url: str, api_key: str | None = None) -> dict[float, float]:
    """The server's ``zimage_batch_size`` histogram (cumulative count per upper bound) from its /metrics (which
    needs the key when the server has keys)."""
    from prometheus_client.parser import text_string_to_metric_families

    r = await client.get(f"{url}/metrics", headers={"Authorization": f"Bearer {api_key}"} if api_key else None)
    r.raise_for_status()
    out: dict[float, float] = {}
    for family in text_string_to_metric_families(r.text):
        if family.name == "zimage_batch_size":
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    out[float(sample.labels["le"])] = sample.value
    return out


def batch_size_delta(before: dict[float, float], after: dict[float, float]) -> dict[str, int]:
    """Batches dispatched between two scrapes, by size (a bucket's range where buckets are wider than 1)."""
    sizes: dict[str, int] = {}
    prev_le, prev_n = 0.0, 0.0
    for le in sorted(after):
        n = after[le] - before.get(le, 0.0)
        if n - prev_n > 0:
            lo = int(prev_le) + 1
            key = "+Inf" if le == float("inf") else (str(int(le)) if lo >= int(le) else f"{lo}-{int(le)}")
            sizes[key] = int(n - prev_n)
        prev_le, prev_n = le, n
    return sizes


def _png_size(b64: str) -> tuple[int, int]:
    """(width, height) from a base64 PNG's header (IHDR), without decoding the image."""
    import base64
    import struct

    head = base64.b64decode(b64[:44] + "=" * (-len(b64[:44]) % 4))
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n":
        return 0, 0
    return struct.unpack(">II", head[16:24])

