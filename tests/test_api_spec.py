"""Issue 11 at the HTTP level, against a real server on loopback with the tiny model: no input fails another request
or gives a 5xx, every error is in OpenAI's envelope, and requests and responses follow OpenAI's published schema
(tests/data/openai-images-openapi.yaml), checked with the official client and by a property-based fuzz test."""

import asyncio
import base64
import io
import json
import os
import threading
import time

import httpx
import pytest
from conftest import ServerThread, tiny_config
from openai_spec import check, check_stream, schema, strategy
from PIL import Image

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BODY_LIMIT = 1 << 16


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_cache):
    from orchestrator.server import create_app

    cfg = tiny_config(
        tiny_cache,
        deployment={"replicas": 1},
        router={"max_batch_size": 4, "max_wait_ms": 100, "queue_limit": 8, "request_timeout_s": 60},
        defaults={"width": 64, "height": 64, "num_inference_steps": 2,
                  "quality_steps": {"low": 1, "medium": 2, "high": 3}},
        limits={"max_n": 4, "max_pixels": 8192 * 16, "max_steps": 4, "max_body_bytes": BODY_LIMIT,
                "max_prompt_chars": 300},
    )
    app = create_app(cfg)
    with ServerThread(app) as s:
        s.wait_ready()
        s.loop = s.service.deployment.router._task.get_loop()
        yield s


def url(server):
    return f"{server.url}/v1/images/generations"


def post(server, body=None, content=None, **kw):
    if content is None:
        content = json.dumps(body).encode()
    return httpx.post(url(server), content=content, headers={"content-type": "application/json"}, timeout=120, **kw)


def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def on_loop(server, coro, timeout=60):
    return asyncio.run_coroutine_threadsafe(coro, server.loop).result(timeout)


def inject(server, kind, **kw):
    async def go():
        for r in server.service.deployment.replicas.values():
            await r.call("inject_fault", kind, **kw)

    on_loop(server, go())


def http_count(server, status):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics").text
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            if s.name == "zimage_http_responses_total" and s.labels.get("status") == str(status):
                return s.value
    return 0.0


def concurrently(fns):
    """Run the calls at once, in threads; return their results in order, re-raising the first failure."""
    out, errors = [None] * len(fns), []

    def run(i):
        try:
            out[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def png_size(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


# ---- isolation ---------------------------------------------------------------------------------------------
def test_unencodable_prompt_batched_with_valid_ones_fails_alone(server):
    """The issue's reproduction: a prompt the tokenizer cannot encode (a lone surrogate, legal in JSON) sent with
    three valid ones into one batch. Before: all four failed with 500 and the tokenizer's exception text."""
    bodies = [b'{"prompt": "a fox %d", "seed": %d}' % (i, i) for i in range(3)]
    bodies.insert(1, b'{"prompt": "a fox \\ud800 in snow", "seed": 9}')
    out = concurrently([lambda b=b: post(server, content=b) for b in bodies])
    assert [r.status_code for r in out] == [200, 400, 200, 200], [r.text[:200] for r in out]
    err = out[1].json()["error"]
    assert err["param"] == "prompt" and "lone surrogate" in err["message"]
    check("ErrorResponse", out[1].json())


def test_replica_screens_requests_that_skip_http_validation(server):
    """Through the deployment, without the HTTP layer's checks (the Python API, a future path): the replica
    screens each request alone, so the bad one fails with invalid_request and its batch-mates succeed."""
    from zimage_common.messages import ImageRequest

    reqs = [ImageRequest(f"direct-{i}", p, i, 64, 64, 2, 0.0)
            for i, p in enumerate(["a red fox", "bad \udfff prompt", "a lighthouse", "a cat"])]

    async def go():
        return await asyncio.gather(*server.service.deployment.admit(reqs))

    results = on_loop(server, go())
    assert [r.ok for r in results] == [True, False, True, True]
    assert results[1].error_type == "invalid_request" and results[1].param == "prompt"
    assert len({r.batch_id for r in results}) == 1  # they did share a batch


def test_a_batch_failing_as_a_whole_is_bisected(server):
    """A failure that one prompt causes and no check catches (an injected model bug): the router bisects the batch,
    the three innocent requests succeed, the culprit gets a 500 without internal text, counted in metrics."""
    before = http_count(server, 500)
    inject(server, "poison", marker="POISON")
    try:
        bodies = [{"prompt": f"fine {i}", "seed": i} for i in range(3)]
        bodies.insert(2, {"prompt": "POISON here", "seed": 7})
        out = concurrently([lambda b=b: post(server, b) for b in bodies])
    finally:
        inject(server, None)
    assert [r.status_code for r in out] == [200, 200, 500, 200], [r.text[:200] for r in out]
    err = out[2].json()["error"]
    assert err["type"] == "server_error" and "injected" not in err["message"] and "RuntimeError" not in err["message"]
    check("ErrorResponse", out[2].json())
    assert http_count(server, 500) == before + 1


# ---- no 5xx on input ---------------------------------------------------------------------------------------
MALFORMED = [
    ("deep-nesting", b"[" * 200_00 + b"]" * 200_00, None, "nested too deeply"),
    ("deep-nesting-in-field", b'{"prompt": "x", "size": ' + b"[" * 5000 + b"]" * 5000 + b"}", None, None),
    ("huge-int", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", None, "too many digits"),
    ("big-int-n", b'{"prompt": "x", "n": ' + b"9" * 4000 + b"}", "n", "between 1 and 4"),
    ("big-int-size", b'{"prompt": "x", "size": "' + b"9" * 5000 + b'x64"}', "size", "WIDTHxHEIGHT"),
    ("nan", b'{"prompt": "x", "guidance_scale": NaN}', None, "NaN"),
    ("infinity", b'{"prompt": "x", "guidance_scale": 1e999}', "guidance_scale", "between 0 and 20"),
    ("surrogate-key", b'{"prompt": "x", "\\ud800": 1}', "\\ud800", "unknown field"),
    ("long-key", b'{"prompt": "x", "' + b"k" * 10000 + b'": 1}', None, "unknown field"),
    ("not-utf8", b'{"prompt": "\xff\xfe"}', None, "not valid JSON"),
    ("empty", b"", None, "empty"),
    ("null", b"null", None, "JSON object"),
    ("array", b"[1, 2]", None, "JSON object"),
    ("prompt-list", b'{"prompt": ["a"]}', "prompt", "string"),
    ("prompt-null", b'{"prompt": null}', "prompt", "required"),
    ("surrogate-negative", b'{"prompt": "x", "negative_prompt": "\\udc00", "guidance_scale": 2}',
     "negative_prompt", "lone surrogate"),
    ("n-string", b'{"prompt": "x", "n": "2"}', "n", "integer"),
    ("n-float", b'{"prompt": "x", "n": 2.5}', "n", "integer"),
    ("stream-string", b'{"prompt": "x", "stream": "yes"}', "stream", "true, false or null"),
    ("size-object", b'{"prompt": "x", "size": {"w": 1}}', "size", "WIDTHxHEIGHT"),
    ("side-too-long", b'{"prompt": "x", "size": "8208x16"}', "size", "8192"),
    ("side-absurd", b'{"prompt": "x", "size": "9999999x16"}', "size", "8192"),
    ("compression-string", b'{"prompt": "x", "output_format": "jpeg", "output_compression": "hi"}',
     "output_compression", "0 to 100"),
    ("compression-range", b'{"prompt": "x", "output_format": "webp", "output_compression": 101}',
     "output_compression", "0 to 100"),
    ("quality-int", b'{"prompt": "x", "quality": 5}', "quality", "one of"),
    ("quality-unknown", b'{"prompt": "x", "quality": "xhigh"}', "quality", "one of"),
    ("background-int", b'{"prompt": "x", "background": 1}', "background", "one of"),
    ("user-int", b'{"prompt": "x", "user": 5}', "user", "string"),
    ("partial-images-range", b'{"prompt": "x", "stream": true, "partial_images": 4}', "partial_images", "between 0"),
    ("partial-images-type", b'{"prompt": "x", "partial_images": "2"}', "partial_images", "0 to 3"),
    ("model-object", b'{"prompt": "x", "model": {}}', "model", "not served"),
]


@pytest.mark.parametrize("body,param,fragment", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_input_is_a_4xx_in_the_envelope(server, body, param, fragment):
    r = post(server, content=body)
    assert r.status_code == 400, r.text[:300]
    check("ErrorResponse", r.json())
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    if fragment is not None:
        assert fragment in err["message"], err["message"]
    assert len(r.content) < 2000  # echoed values are cut short
    assert "Traceback" not in r.text


def test_the_side_limit_is_the_models(server):
    """8192 px per side is where the tiny transformer's position table ends (axes_lens 512 x 16 px); it runs."""
    r = post(server, {"prompt": "a long strip", "size": "8192x16", "seed": 1})
    assert r.status_code == 200, r.text[:300]
    assert png_size(r.json()["data"][0]["b64_json"]) == (8192, 16)


def test_chunked_body_is_cut_off_at_the_limit(server):
    sent = []

    def body():
        for _ in range(8 * 1024 * 1024 // 65536):  # 8 MiB in 64 KiB chunks, no Content-Length
            sent.append(1)
            yield b" " * 65536

    r = httpx.post(url(server), content=body(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "limits.max_body_bytes" in r.json()["error"]["message"]
    check("ErrorResponse", r.json())


async def test_read_body_stops_reading_at_the_limit():
    from orchestrator.server import BodyTooLarge, read_body

    class Endless:
        read = 0

        async def stream(self):
            while True:
                self.read += 1
                yield b"x" * 1000

    req = Endless()
    with pytest.raises(BodyTooLarge):
        await read_body(req, 10_000)
    assert req.read == 11  # never more than the limit plus one chunk


# ---- the spec's fields --------------------------------------------------------------------------------------
NULLABLE = ["model", "n", "quality", "response_format", "output_format", "output_compression", "stream",
            "partial_images", "size", "moderation", "background", "style"]


def test_every_field_the_spec_marks_nullable_takes_null_as_default(server):
    spec = schema("CreateImageRequest")["properties"]
    for name in NULLABLE:  # this list is the spec's, checked here
        accepts_null = json.dumps(spec[name]).count('"null"') > 0
        assert accepts_null, name
    body = {"prompt": "a fox", **dict.fromkeys(NULLABLE), "seed": None, "num_inference_steps": None,
            "guidance_scale": None, "negative_prompt": None}
    r = post(server, body)
    assert r.status_code == 200, r.text[:300]
    check("ImagesResponse", r.json())
    assert len(r.json()["data"]) == 1 and png_size(r.json()["data"][0]["b64_json"]) == (64, 64)


REFUSED = [
    ({"background": "transparent"}, "background", "alpha channel"),
    ({"style": "vivid"}, "style", "dall-e-3"),
    ({"style": "natural"}, "style", "no style control"),
    ({"output_compression": 50}, "output_compression", "PNG is lossless"),
    ({"model": "dall-e-3"}, "model", "not served"),
]


@pytest.mark.parametrize("extra,param,why", REFUSED, ids=[r[1] + "-" + str(list(r[0].values())[0]) for r in REFUSED])
def test_spec_fields_not_implemented_are_refused_saying_why(server, extra, param, why):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as e:
        client(server).images.generate(prompt="a fox", **extra)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and why in e.value.body["message"]


@pytest.mark.parametrize("fmt,pil", [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_output_formats_with_the_official_client(server, fmt, pil):
    kw = {"output_compression": 40} if fmt != "png" else {}
    resp = client(server).images.generate(prompt="a fox", output_format=fmt, size="64x64",
                                          extra_body={"seed": 5}, **kw)
    img = Image.open(io.BytesIO(base64.b64decode(resp.data[0].b64_json)))
    assert img.format == pil and img.size == (64, 64)
    assert resp.output_format == fmt


def test_compression_changes_the_file(server):
    sizes = []
    for q in (5, 95):
        r = post(server, {"prompt": "a fox", "output_format": "jpeg", "output_compression": q, "seed": 3,
                          "size": "256x256"})
        sizes.append(len(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert sizes[0] < sizes[1]


def test_response_matches_the_spec_and_counts_tokens(server):
    from actors.models import build_tokenizer

    resp = client(server).images.generate(prompt="a red fox", n=2, moderation="low", user="u-1",
                                          safety_identifier="sid-1", extra_body={"seed": 11})
    raw = resp.model_dump(exclude_unset=True)
    check("ImagesResponse", raw)
    assert all("revised_prompt" not in d for d in raw["data"])  # left out, never null
    tok = build_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "a red fox"}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=True)
    prompt_tokens = len(tok(text)["input_ids"])
    assert resp.usage.input_tokens == prompt_tokens == resp.usage.input_tokens_details.text_tokens
    assert resp.usage.output_tokens == 2 * (64 // 16) ** 2  # image tokens of two 64x64 images
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    assert resp.background == "opaque" and [d.seed for d in resp.data] == [11, 12]


def test_quality_maps_to_documented_steps(server):
    def total_steps(body):
        with httpx.stream("POST", url(server), json={"prompt": "a fox", "stream": True, **body}, timeout=60) as r:
            assert r.status_code == 200
            lines = [ln for ln in r.iter_lines() if ln.startswith(": image_generation.progress ")]
        return {json.loads(ln.split(" ", 2)[2])["total_steps"] for ln in lines}

    # quality_steps here is {low: 1, medium: 2, high: 3}; hd counts as high; an explicit step count wins.
    assert total_steps({"quality": "low"}) == {1}
    assert total_steps({"quality": "hd"}) == {3}
    assert total_steps({"quality": "auto"}) == {2}  # defaults.num_inference_steps
    assert total_steps({"quality": "high", "num_inference_steps": 4}) == {4}


# ---- streaming ----------------------------------------------------------------------------------------------
def test_official_client_streams_real_partial_images(server):
    stream = client(server).images.generate(prompt="a fox", stream=True, partial_images=2, n=2,
                                            extra_body={"num_inference_steps": 4, "seed": 1})
    events = list(stream)
    types = [e.type for e in events]
    assert set(types) == {"image_generation.partial_image", "image_generation.completed"}
    assert types.count("image_generation.completed") == 2
    for e in events:  # every event decodes to a real image: no empty partials from progress events
        img = Image.open(io.BytesIO(base64.b64decode(e.b64_json)))
        assert img.size == (64, 64) and e.output_format == "png" and e.background == "opaque"
    for index in (0, 1):
        mine = [e for e in events if e.model_extra.get("index") == index]
        assert [e.type for e in mine][-1] == "image_generation.completed"  # previews come before the image
        assert [e.partial_image_index for e in mine[:-1]] == [0, 1]
        assert mine[-1].usage.output_tokens == 16


def test_progress_never_reaches_the_official_client(server):
    with httpx.stream("POST", url(server), json={"prompt": "a fox", "stream": True, "num_inference_steps": 3},
                      timeout=60) as r:
        text = r.read().decode()
    assert text.count(": image_generation.progress") == 3  # there, as SSE comments
    events = check_stream(text)
    assert [e["type"] for e in events] == ["image_generation.completed"]
    types = [e.type for e in client(server).images.generate(prompt="a fox", stream=True)]
    assert types == ["image_generation.completed"]


def test_full_queue_refuses_before_the_stream_and_n_all_or_nothing(server):
    """One request runs (its replica's loop stalled) and its replica holds all it takes (two running sets' worth,
    8 images), eight wait: the queue (8) is full. A stream request gets 429 with Retry-After before any event; an
    n=2 request is refused whole and nothing of it is queued or computed."""
    from openai import RateLimitError

    router = server.service.deployment.router
    inject(server, "stall", seconds=4)
    try:
        running = threading.Thread(target=post, args=(server, {"prompt": "runs", "seed": 1}))
        running.start()
        time.sleep(0.5)
        fill = [threading.Thread(target=post, args=(server, {"prompt": f"waits {i}", "n": n, "seed": 10 * i}))
                for i, n in enumerate((4, 4, 4, 3))]  # 7 more at the replica, 8 in the queue
        for t in fill:
            t.start()
            time.sleep(0.2)  # each admitted (and what the replica has room for dispatched) before the next
        deadline = time.time() + 10
        while router.waiting < 8:
            assert time.time() < deadline, router.waiting
            time.sleep(0.02)
        with httpx.stream("POST", url(server), json={"prompt": "stream me", "stream": True}, timeout=30) as r:
            assert r.status_code == 429 and r.headers["Retry-After"].isdigit()
            assert r.headers["content-type"].startswith("application/json")
            check("ErrorResponse", json.loads(r.read()))
        with pytest.raises(RateLimitError):
            client(server).images.generate(prompt="two", n=2, stream=True)
        r = post(server, {"prompt": "two", "n": 2})
        assert r.status_code == 429 and "room for 0 more" in r.json()["error"]["message"]
        assert router.waiting == 8
    finally:
        for t in [running, *fill]:
            t.join()
        inject(server, None)


def test_errors_404_405_head_and_docs(server):
    r = httpx.get(f"{server.url}/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    check("ErrorResponse", r.json())
    r = httpx.get(url(server))
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed" and "POST" in r.headers["allow"]
    check("ErrorResponse", r.json())
    for path in ("/healthz", "/readyz"):
        r = httpx.head(f"{server.url}{path}")
        assert r.status_code == 200 and r.content == b""
    for path in ("/docs", "/redoc", "/openapi.json"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 404 and "error" in r.json()


def test_docs_only_when_configured():
    from orchestrator.server import create_app
    from zimage_common.config import config_from_dict

    async def never(config, observer=None):
        await asyncio.sleep(3600)

    app = create_app(config_from_dict({"server": {"docs": True}}), deployment_factory=never)
    with ServerThread(app) as s:
        assert httpx.get(f"{s.url}/openapi.json").status_code == 200
        assert httpx.get(f"{s.url}/docs").status_code == 200


# ---- the fuzz test ----------------------------------------------------------------------------------------
FUZZ_EXAMPLES = int(os.environ.get("ZIMAGE_FUZZ_EXAMPLES", "200"))
FUZZ_SECONDS = float(os.environ.get("ZIMAGE_FUZZ_SECONDS", "75"))
FUZZ_LOG = os.environ.get("ZIMAGE_FUZZ_LOG")  # a file to append one line per request to (the long run)


def test_fuzz_from_the_published_schema(server):
    """Requests generated from OpenAI's CreateImageRequest schema (valid ones, and ones with a field replaced by
    any JSON value, an unknown key, or raw bytes), sent one to three at a time: never a 5xx, every response valid
    against the spec (ImagesResponse, stream events, ErrorResponse). Bounded in examples and wall time; the long
    run sets ZIMAGE_FUZZ_EXAMPLES / ZIMAGE_FUZZ_SECONDS."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    request_schema = schema("CreateImageRequest")
    # Short prompts keep generation cheap; everything else is the spec's.
    request_schema["properties"]["prompt"] = {"type": "string", "minLength": 0, "maxLength": 40}
    valid = strategy(request_schema)
    anything = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                            | st.text(max_size=20),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=8)
    fields = sorted(request_schema["properties"]) + ["seed", "num_inference_steps", "guidance_scale",
                                                     "negative_prompt", "safety_identifier"]

    @st.composite
    def body(draw):
        req = draw(valid)
        kind = draw(st.sampled_from(["spec", "servable", "servable", "field", "key", "bytes"]))
        if kind == "servable":  # still valid against the spec, and within what this server runs
            req.pop("style", None)
            req["model"] = draw(st.sampled_from([None, "z-image-turbo"]))
            req["size"] = draw(st.sampled_from([None, "auto", "64x64", "256x256", "16x128"]))
            if req.get("output_format") in (None, "png"):
                req.pop("output_compression", None)
            if req.get("background") == "transparent" or req.get("response_format") == "url":
                req.pop("background", None), req.pop("response_format", None)
            if isinstance(req.get("n"), int):
                req["n"] = min(req["n"], 4)
        elif kind == "field":
            req[draw(st.sampled_from(fields))] = draw(anything)
        elif kind == "key":
            req[draw(st.text(min_size=1, max_size=12))] = draw(anything)
        elif kind == "bytes":
            return draw(st.binary(max_size=64))
        return json.dumps(req).encode()

    t_end = time.monotonic() + FUZZ_SECONDS
    stats = {"requests": 0, "status": {}}
    http = httpx.Client(timeout=120)

    def send(content):
        r = http.post(url(server), content=content, headers={"content-type": "application/json"})
        stats["requests"] += 1
        stats["status"][r.status_code] = stats["status"].get(r.status_code, 0) + 1
        if FUZZ_LOG:
            with open(FUZZ_LOG, "a") as f:
                f.write(json.dumps({"status": r.status_code, "body": content.decode("utf-8", "replace")[:300],
                                    "response": r.text[:300]}) + "\n")
        assert r.status_code < 500, (content[:300], r.status_code, r.text[:500])
        if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
            check_stream(r.text)
        elif r.status_code == 200:
            check("ImagesResponse", r.json())
            assert all("revised_prompt" not in d for d in r.json()["data"])
        else:
            assert r.status_code in (400, 413, 429), r.status_code
            check("ErrorResponse", r.json())

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=not FUZZ_LOG,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(st.lists(body(), min_size=1, max_size=3))
    def fuzz(contents):
        if time.monotonic() > t_end:
            return  # over the time budget: the remaining examples are not sent
        concurrently([lambda c=c: send(c) for c in contents])

    try:
        fuzz()
    finally:
        http.close()
        print(f"fuzz: {stats['requests']} requests, statuses {dict(sorted(stats['status'].items()))}")
    assert stats["requests"] >= min(50, FUZZ_EXAMPLES)
    assert stats["status"].get(200, 0) > 0  # some generated requests did run
