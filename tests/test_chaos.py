"""Chaos through the HTTP service: concurrent load while replica processes are killed several times."""

import threading
import time

import httpx
import pytest
import ray
from conftest import ServerThread, tiny_config

from orchestrator.router import STEP_QUEUE_DEPTH

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_cache):
    from orchestrator.server import create_app

    cfg = tiny_config(tiny_cache, router={"max_batch_size": 2, "max_wait_ms": 5, "request_timeout_s": 90,
                                          "max_attempts": 5, "queue_limit": 500},
                      deployment={"health_interval_s": 1.0})
    app = create_app(cfg)
    with ServerThread(app) as s:
        s.wait_ready()
        yield s


def test_chaos_kills_lose_no_request(server):
    url = f"{server.url}/v1/images/generations"
    results, errors = {}, {}

    def client(i):
        try:
            results[i] = httpx.post(url, json={"prompt": f"chaos {i}", "size": "64x64", "seed": i,
                                               "num_inference_steps": 4}, timeout=120)
        except Exception as e:  # noqa: BLE001 - a hang or transport failure would land here
            errors[i] = repr(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(60)]
    for i, t in enumerate(threads):
        t.start()
        if i % 20 == 10:  # three kills spread over the load
            victim = server.service.deployment.replicas[f"r{(i // 20) % 2}"].actor
            ray.kill(victim, no_restart=False)
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert len(results) == 60
    codes = {}
    for r in results.values():
        codes[r.status_code] = codes.get(r.status_code, 0) + 1
        if r.status_code != 200:  # allowed only as a clear error in the OpenAI envelope
            assert r.json()["error"]["message"], r.text
    # re-dispatched or queued until a replica is back: nothing lost
    assert codes.get(200, 0) == 60, (codes, [r.text[:300] for r in results.values() if r.status_code != 200])
    # back to full strength
    dep = server.service.deployment
    deadline = time.time() + 90
    while len(dep.live()) < 2:
        assert time.time() < deadline, dep.events
        time.sleep(0.3)
    body = httpx.get(f"{server.url}/readyz").json()
    assert body["status"] == "ready" and body["down"] == []
    metrics = httpx.get(f"{server.url}/metrics").text
    events = [line for line in metrics.splitlines() if line.startswith("zimage_replica_events_total")]
    assert any('event="lost"' in e for e in events) and any('event="back"' in e for e in events), events
    assert any(what.startswith("lost") for _, _, what in dep.events)


def test_disconnected_client_has_its_queued_request_cancelled(server):
    dep = server.service.deployment
    deadline = time.time() + 90
    while len(dep.live()) < len(dep.replicas):  # start from full strength
        assert time.time() < deadline, dep.events
        time.sleep(0.2)
    loop = dep.router._task.get_loop()
    import asyncio

    async def stall(kind, **kw):
        for r in dep.replicas.values():
            await r.call("inject_fault", kind, **kw)

    asyncio.run_coroutine_threadsafe(stall("stall", seconds=4), loop).result(30)
    try:
        url = f"{server.url}/v1/images/generations"
        # each replica (its loop stalled) holds two running sets' worth: 2 x max_batch_size 2
        room = STEP_QUEUE_DEPTH * dep.config.router.max_batch_size
        busy = [threading.Thread(target=lambda i=i: httpx.post(url, json={"prompt": f"b{i}", "size": "64x64"},
                                                               timeout=60)) for i in range(room * len(dep.replicas))]
        for t in busy:
            t.start()
            time.sleep(0.05)
        time.sleep(0.5)
        before = dep.router.waiting
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json={"prompt": "impatient", "size": "64x64"}, timeout=1.0)
        time.sleep(1.0)  # the server hears of the disconnect from the connection at once
        assert dep.router.waiting == before
        metrics = httpx.get(f"{server.url}/metrics").text
        assert any(line.startswith("zimage_request_errors_total{") and 'type="cancelled"' in line
                   for line in metrics.splitlines())
        for t in busy:
            t.join(timeout=60)
    finally:
        asyncio.run_coroutine_threadsafe(stall(None), loop).result(30)
