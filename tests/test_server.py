"""The HTTP service on loopback with the tiny model: the official openai client, raw HTTP statuses, metrics."""

import asyncio
import base64
import io
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import ServerThread, tiny_config
from PIL import Image

pytestmark = [pytest.mark.ray, pytest.mark.slow]

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_cache):
    from orchestrator.server import create_app

    cfg = tiny_config(
        tiny_cache,
        router={"max_batch_size": 2, "max_wait_ms": 20, "queue_limit": 4, "request_timeout_s": 3},
        server={"api_keys": [KEY]},
        limits={"max_n": 4, "max_pixels": 256 * 256, "max_prompt_chars": 200, "max_body_bytes": 4096},
    )
    app = create_app(cfg)
    with ServerThread(app) as s:
        s.wait_ready()
        yield s


def auth():
    return {"Authorization": f"Bearer {KEY}"}


def test_openai_client_generates_images(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    resp = client.images.generate(model="z-image-turbo", prompt="a red fox", n=2, size="64x96",
                                  response_format="b64_json", extra_body={"seed": 3, "num_inference_steps": 2})
    assert len(resp.data) == 2
    for d in resp.data:
        img = Image.open(io.BytesIO(base64.b64decode(d.b64_json)))
        assert img.format == "PNG" and img.size == (64, 96)
    assert resp.data[0].b64_json != resp.data[1].b64_json  # n fans out with distinct seeds
    models = client.models.list()
    assert [m.id for m in models.data] == ["z-image-turbo"]


def test_same_seed_same_image_over_http(server):
    body = {"prompt": "a lighthouse", "size": "64x64", "seed": 42}
    a = httpx.post(f"{server.url}/v1/images/generations", json=body, headers=auth(), timeout=60).json()
    b = httpx.post(f"{server.url}/v1/images/generations", json=body, headers=auth(), timeout=60).json()
    assert a["data"][0]["b64_json"] == b["data"][0]["b64_json"] and a["data"][0]["seed"] == 42


def test_health_endpoints(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    r = httpx.get(f"{server.url}/readyz")
    assert r.status_code == 200 and r.json()["replicas"] == 2


def post(server, body, headers=None, **kw):
    return httpx.post(f"{server.url}/v1/images/generations", headers=auth() if headers is None else headers,
                      timeout=60, **kw, **({"json": body} if body is not None else {}))


BAD_INPUT = [
    ({"prompt": "x", "size": "100x64"}, "size", "multiple of 16"),
    ({"prompt": "x", "size": "0x64"}, "size", "between"),
    ({"prompt": "x", "size": "-64x64"}, "size", "1024x1024"),
    ({"prompt": "x", "size": "512x512"}, "size", "limits.max_pixels"),
    ({"prompt": "x", "size": "big"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "between 1"),
    ({"prompt": "x", "num_inference_steps": 500}, "num_inference_steps", "between 1"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale", "between 0"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": "x" * 201}, "prompt", "limits.max_prompt_chars"),
    ({"prompt": 5}, "prompt", "string"),
    ({"prompt": "x", "n": 0}, "n", "between 1"),
    ({"prompt": "x", "n": 9}, "n", "between 1"),
    ({"prompt": "x", "n": "2"}, "n", "integer"),
    ({"prompt": "x", "seed": "abc"}, "seed", "integer"),
    ({"prompt": "x", "response_format": "link"}, "response_format", "b64_json"),
    ({"prompt": "x", "model": "dall-e-3"}, "model", "not served"),
    ({"prompt": "x", "colour": "red"}, "colour", "unknown field"),
    ({"size": "64x64"}, "prompt", "required"),
    ([1, 2], None, "JSON object"),
]


@pytest.mark.parametrize("body,param,fragment", BAD_INPUT, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD_INPUT)])
def test_bad_input_is_400_naming_the_field(server, body, param, fragment):
    r = post(server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and fragment in err["message"]


def _rejected(server) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=auth()).text
    line = next(x for x in text.splitlines() if x.startswith("zimage_requests_total") and 'outcome="rejected"' in x)
    return float(line.rsplit(" ", 1)[1])


def test_not_json_and_oversized_body(server):
    r = post(server, None, content=b"{not json", headers={**auth(), "content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    before = _rejected(server)
    r = post(server, {"prompt": "x" * 5000})  # refused by its Content-Length
    assert r.status_code == 413 and "limits.max_body_bytes" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/loras", json={"name": "x", "path": "x" * 5000}, headers=auth())
    assert r.status_code == 413 and "limits.max_body_bytes" in r.json()["error"]["message"], r.text
    assert _rejected(server) == before + 2  # every 413 counts as a rejected request


def test_missing_or_wrong_key_is_401(server):
    assert post(server, {"prompt": "x"}, headers={}).status_code == 401
    r = post(server, {"prompt": "x"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # health needs no key


def _inject(server, kind, **kw):
    dep = server.service.deployment

    async def go():
        for r in dep.replicas.values():
            await r.call("inject_fault", kind, **kw)

    asyncio.run_coroutine_threadsafe(go(), server.server_loop).result(30)


@pytest.fixture
def loop_of(server):
    server.server_loop = server.service.deployment.router._task.get_loop()
    return server


def test_queue_full_is_429_with_retry_after_then_timeout_is_504(loop_of):
    server = loop_of
    _inject(server, "stall", seconds=4)
    try:
        with httpx.Client(timeout=60) as c:
            url = f"{server.url}/v1/images/generations"
            results = {}

            def call(i):
                results[i] = c.post(url, json={"prompt": f"p{i}", "size": "64x64", "seed": i}, headers=auth())

            # two replicas hold two running sets' worth each (2 x max_batch_size 2), the queue 4: the rest is refused
            threads = [threading.Thread(target=call, args=(i,)) for i in range(14)]
            for t in threads:
                t.start()
                time.sleep(0.05)
            for t in threads:
                t.join()
        codes = sorted(r.status_code for r in results.values())
        assert 429 in codes and 504 in codes, codes
        r429 = next(r for r in results.values() if r.status_code == 429)
        assert r429.headers["Retry-After"].isdigit() and r429.json()["error"]["type"] == "rate_limit_error"
        r504 = next(r for r in results.values() if r.status_code == 504)
        assert r504.json()["error"]["type"] == "timeout"
    finally:
        _inject(server, None)
    assert post(server, {"prompt": "still serving", "size": "64x64"}).status_code == 200


def test_streaming_progress(server):
    events, progress = [], []
    with httpx.stream("POST", f"{server.url}/v1/images/generations", headers=auth(), timeout=60,
                      json={"prompt": "a fox", "size": "64x64", "num_inference_steps": 3, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
            elif line.startswith(": image_generation.progress "):  # an SSE comment: SSE clients skip it
                progress.append(json.loads(line.split(" ", 2)[2]))
    steps = [e["step"] for e in progress]
    assert steps == [1, 2, 3]
    done = [e for e in events if e["type"] == "image_generation.completed"]
    assert len(done) == 1 and Image.open(io.BytesIO(base64.b64decode(done[0]["b64_json"]))).size == (64, 64)


def test_metrics_parse_and_move(server):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape():
        text = httpx.get(f"{server.url}/metrics", headers=auth()).text
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        assert len({s.labels["frontdoor"] for s in samples}) == 1  # every series names this front door
        return {s.name + json.dumps({k: v for k, v in s.labels.items() if k != "frontdoor"}, sort_keys=True): s.value
                for s in samples}

    before = scrape()
    assert post(server, {"prompt": "count me", "size": "64x64", "n": 2}).status_code == 200
    post(server, {"prompt": "x", "n": 0})
    after = scrape()
    key = "zimage_images_generated_total{}"
    assert after[key] - before.get(key, 0) == 2
    assert after['zimage_request_latency_seconds_count{}'] > before.get('zimage_request_latency_seconds_count{}', 0)
    for name in ("zimage_requests_waiting{}", "zimage_requests_running{}", 'zimage_replica_busy{"replica": "r0"}',
                 "zimage_batch_size_count{}", "zimage_queue_time_seconds_count{}"):
        assert name in after, name


def test_not_ready_is_503_until_the_deployment_starts(tiny_cache):
    """Before every replica has warmed up: /healthz answers, /readyz and generations say 503."""
    import asyncio as aio

    from orchestrator.server import create_app
    from zimage_common.config import config_from_dict

    gate = threading.Event()

    async def slow_factory(config, observer=None):
        while not gate.is_set():
            await aio.sleep(0.05)
        raise RuntimeError("replica r0 failed to load: injected")

    app = create_app(config_from_dict({}), deployment_factory=slow_factory)
    with ServerThread(app) as s:
        assert httpx.get(f"{s.url}/healthz").status_code == 200
        r = httpx.get(f"{s.url}/readyz")
        assert r.status_code == 503 and r.json()["status"] == "starting"
        r = httpx.post(f"{s.url}/v1/images/generations", json={"prompt": "x"})
        assert r.status_code == 503 and r.headers["Retry-After"] and r.json()["error"]["type"] == "service_unavailable"
        gate.set()
        time.sleep(0.3)
        r = httpx.get(f"{s.url}/readyz")
        assert r.status_code == 503 and "injected" in r.json()["error"]
        r = httpx.post(f"{s.url}/v1/images/generations", json={"prompt": "x"})
        assert r.status_code == 503 and "failed to start" in r.json()["error"]["message"]
        assert "injected" not in r.json()["error"]["message"]  # the cause is on /readyz and in the log only


def test_a_config_that_cannot_be_placed_is_one_log_line(caplog):
    """What the config or the cluster gets wrong (nothing fits) is logged as its message, not a traceback; an
    unexpected failure keeps its traceback."""
    import asyncio as aio

    from orchestrator.server import Service
    from placement.planner import PlacementError
    from zimage_common.config import config_from_dict

    for error, traceback in ((PlacementError("deployment.replicas = 5 but only 2 replica(s) fit"), False),
                             (RuntimeError("replica r0 failed to load"), True)):
        async def factory(config, observer=None, error=error):
            raise error

        caplog.clear()
        service = Service(config_from_dict({}), deployment_factory=factory)
        aio.run(service.start())
        (record,) = [r for r in caplog.records if "deployment failed to start" in r.getMessage()]
        assert (record.exc_info is not None) == traceback
        assert service.start_error.endswith(str(error))


def test_bench_over_http_reports_the_servers_batch_sizes(server, tmp_path):
    """`bench --http` without a config uses the server's defaults and, since HTTP responses carry no batch ids,
    reads the batch sizes of its own run from the server's /metrics."""
    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "orchestrator.cli", "bench", "--http", server.url, "--api-key", KEY,
           "--requests", "4", "--concurrency", "2", "--warmup", "0", "--steps", "2", "--out", str(out)]
    subprocess.run(cmd, check=True, timeout=300)
    run = json.loads((out / "bench.json").read_text())["runs"][0]
    assert run["images"] == 4 and run["failed"] == 0
    sizes = {int(k): n for k, n in run["batch_sizes"].items()}
    assert sum(k * n for k, n in sizes.items()) == 4 and set(sizes) <= {1, 2}  # router.max_batch_size is 2
