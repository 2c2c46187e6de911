"""Front doors over one pool, the pure parts (no Ray, no torch): the replica's admission gate, the Idempotency-Key
store and fingerprints, power of two choices, image bytes forwarded as encoded, the pool's config digest."""

import random
import threading
import time

import numpy as np
import pytest

from actors.admission import AdmissionGate, AdmissionLimits
from orchestrator.idempotency import body_digest, parse_key, scope, with_result_keys
from orchestrator.idempotency_store import DONE, MISMATCH, NEW, PENDING, RUN, WAIT, IdempotencyStore, StoredResponse
from orchestrator.pool import differing, pool_digest
from orchestrator.pow2 import QueueLengths
from zimage_common.config import config_from_dict
from zimage_common.image_codec import EncodedImage, encode_image, image_bytes


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


# ---- the admission gate ---------------------------------------------------------------------------------------
def test_gate_holds_calls_tokens_and_samples_whatever_number_of_callers():
    gate = AdmissionGate(AdmissionLimits(calls=2, tokens=100, samples=3))
    inside, peak, lock = [], {"calls": 0, "tokens": 0, "samples": 0}, threading.Lock()

    def call(i, tokens, samples):
        t = gate.enter([f"r{i}"], tokens, samples)
        with lock:
            inside.append((tokens, samples))
            peak["calls"] = max(peak["calls"], len(inside))
            peak["tokens"] = max(peak["tokens"], sum(x for x, _ in inside))
            peak["samples"] = max(peak["samples"], sum(y for _, y in inside))
        time.sleep(0.01)
        with lock:
            inside.remove((tokens, samples))
        gate.leave(t)

    threads = [threading.Thread(target=call, args=(i, 30 + 10 * (i % 3), 1 + i % 2)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    s = gate.snapshot()
    assert peak["calls"] <= 2 and peak["tokens"] <= 100 and peak["samples"] <= 3
    assert s.peak_calls == peak["calls"] and s.peak_tokens <= 100 and s.admitted_total == 24
    assert s.calls == s.tokens == s.samples == 0 and s.waited_total > 0


def test_gate_is_first_come_first_served_and_admits_an_oversized_call_alone():
    gate = AdmissionGate(AdmissionLimits(calls=4, tokens=100))
    first = gate.enter(["a"], 60, 1)
    order_in = []

    def call(name, tokens):
        t = gate.enter([name], tokens, 1)
        order_in.append(name)
        gate.leave(t)

    big = threading.Thread(target=call, args=("big", 500))  # over the limit: enters once alone
    big.start()
    time.sleep(0.05)
    small = threading.Thread(target=call, args=("small", 10))  # would fit now, but must not overtake
    small.start()
    time.sleep(0.05)
    assert order_in == [] and gate.snapshot().waiting_calls == 2 and gate.queue_len() == 3
    gate.leave(first)
    big.join(5)
    small.join(5)
    assert order_in == ["big", "small"]


def test_a_call_cancelled_while_waiting_leaves_the_queue_or_enters_without_its_cancelled_requests():
    gate = AdmissionGate(AdmissionLimits(calls=1))
    held = gate.enter(["x"], 1, 1)
    got = {}

    def call(name, ids):
        got[name] = gate.enter(ids, 2, len(ids))

    a = threading.Thread(target=call, args=("a", ["a1"]))
    b = threading.Thread(target=call, args=("b", ["b1", "b2"]))
    a.start()
    b.start()
    time.sleep(0.05)
    assert gate.cancel(["a1", "b2", "unknown"]) == {"a1", "b2"}
    a.join(5)
    assert got["a"].withdrawn and not got["a"].admitted
    gate.leave(held)
    b.join(5)
    assert got["b"].admitted and got["b"].live_ids == ("b1",)
    with pytest.raises(TimeoutError):
        gate.enter(["c"], 1, 1, timeout_s=0.05)  # b is inside and the limit is one call
    gate.leave(got["b"])


# ---- the Idempotency-Key store --------------------------------------------------------------------------------
def test_a_key_runs_once_its_answer_replays_and_another_body_is_a_mismatch():
    store = IdempotencyStore()
    assert store.begin("k", "body-1") == (NEW, None)
    assert store.begin("k", "body-1") == (PENDING, None)
    assert store.begin("k", "body-2") == (MISMATCH, None)
    store.finish("k", "body-1", StoredResponse(200, b'{"data": []}'))
    assert store.begin("k", "body-1") == (DONE, StoredResponse(200, b'{"data": []}'))
    assert store.begin("k", "body-2")[0] == MISMATCH
    assert store.begin("other", "body-1")[0] == NEW
    store.abandon("other", "body-1")  # a failed call is forgotten: its retry runs
    assert store.begin("other", "body-1")[0] == NEW
    s = store.snapshot()
    assert (s.calls_new, s.calls_replayed, s.calls_mismatched) == (3, 1, 2)


def test_keys_and_images_expire_and_the_store_stays_within_its_bounds():
    clock = Clock()
    store = IdempotencyStore(ttl_s=10, max_entries=3, max_bytes=10_000, clock=clock)
    store.begin("a", "f")
    store.finish("a", "f", StoredResponse(200, b"x" * 100))
    clock.t = 11
    assert store.begin("a", "f")[0] == NEW  # expired: runs again
    store.finish("a", "f", StoredResponse(200, b"x" * 100))
    for k in "bcd":
        store.begin(k, "f")
        store.finish(k, "f", StoredResponse(200, b"x" * 100))
    assert store.snapshot().entries == 3 and store.begin("a", "f")[0] == NEW  # "a" was the oldest: evicted
    store.finish("big", "f", StoredResponse(200, b"y" * 9_000))
    s = store.snapshot()
    assert s.bytes <= 10_000 and s.evicted >= 2 and store.begin("big", "f")[0] == DONE
    # work in progress (a call not answered yet: "a" again) is never evicted, only expired
    for k in "efgh":
        store.begin(k, "f")
        store.finish(k, "f", StoredResponse(200, b"x" * 100))
    assert store.begin("a", "f")[0] == PENDING
    clock.t = 22
    assert store.begin("a", "f")[0] == NEW


def test_an_image_is_claimed_once_and_handed_over_when_made():
    store = IdempotencyStore()
    assert store.claim("img", ("r0", 100)) == (RUN, None)
    assert store.claim("img", ("r1", 200)) == (WAIT, None)  # r0 is making it
    assert store.claim("img", ("r0", 100)) == (WAIT, None)  # another call of the same process
    store.deposit("img", ("r0", 100), "the result")
    assert store.claim("img", ("r1", 200)) == (DONE, "the result")
    assert store.claim("other", ("r1", 200)) == (RUN, None)
    store.release("other", ("r1", 200))  # it failed: a retry may run it
    assert store.claim("other", ("r0", 100)) == (RUN, None)


def test_a_claim_whose_replica_process_is_gone_is_taken_over():
    clock = Clock()
    alive = {("r0", 100): None, ("r1", 200): False}
    store = IdempotencyStore(claim_lease_s=60, clock=clock, alive=lambda c: alive.get(tuple(c)))
    store.claim("a", ("r0", 100))
    assert store.claim("a", ("r0", 101)) == (RUN, None)  # r0 restarted: its new process runs it
    store.claim("b", ("r1", 200))
    assert store.claim("b", ("r2", 300)) == (RUN, None)  # r1's process is gone
    store.claim("c", ("r0", 100))
    assert store.claim("c", ("r2", 300)) == (WAIT, None)  # cannot tell: wait
    clock.t = 61
    assert store.claim("c", ("r2", 300)) == (RUN, None)  # past the lease
    assert store.snapshot().claims_taken_over == 3


# ---- fingerprints and keys ------------------------------------------------------------------------------------
def test_fingerprints_ignore_key_order_and_formatting_and_see_every_value():
    a = body_digest("generations", {"prompt": "a fox", "n": 2, "seed": 1})
    assert a == body_digest("generations", {"seed": 1, "n": 2, "prompt": "a fox"})
    assert a != body_digest("generations", {"prompt": "a fox", "n": 2, "seed": 2})
    assert a != body_digest("edits", {"prompt": "a fox", "n": 2, "seed": 1})
    f1 = body_digest("edits", {"prompt": "x"}, {"image": [b"\x89PNG1"], "mask": None})
    assert f1 != body_digest("edits", {"prompt": "x"}, {"image": [b"\x89PNG2"], "mask": None})
    assert body_digest("generations", {"n": 1}) != body_digest("generations", {"n": "1"})


def test_malformed_keys_are_refused_with_the_reason_and_keys_are_scoped_by_caller():
    assert parse_key(None) is None and parse_key("a-UUID_1.2:3") == "a-UUID_1.2:3"
    for bad in ("", "has space", "x" * 256, "caf\u00e9"):
        with pytest.raises(ValueError, match="Idempotency-Key must be 1 to 255 visible ASCII"):
            parse_key(bad)
    assert scope(None) == "" and scope("Bearer a") != scope("Bearer b")


def test_keyed_images_get_keys_derived_from_the_call_key_body_and_index():
    from orchestrator.images_api import ImageCall
    from zimage_common.messages import ImageRequest

    call = ImageCall([ImageRequest(f"q{i}", "p", i, 64, 64, 2, 0.0) for i in range(3)])
    keyed = with_result_keys(call, "s:k", "fp")
    keys = [r.result_key for r in keyed.requests]
    assert len(set(keys)) == 3 and keys == [r.result_key for r in with_result_keys(call, "s:k", "fp").requests]
    assert keys[0] != with_result_keys(call, "s:k", "fp2").requests[0].result_key
    assert keys[0] != with_result_keys(call, "other:k", "fp").requests[0].result_key


# ---- power of two choices -------------------------------------------------------------------------------------
def test_power_of_two_choices_prefers_the_shorter_reported_queue_and_skips_full_ones():
    """The router's pick for pooled front doors (``free_replicas.PowerOfTwo``), one pass at a time."""
    from orchestrator.free_replicas import FreeReplicas, PowerOfTwo
    from orchestrator.scheduler import ReplicaCapacity

    rng = random.Random(3)
    lengths = {"a": 0, "b": 5, "c": 9}

    def choose(names, lengths, rng, max_queue=None):
        free = FreeReplicas([ReplicaCapacity(n, 1 << 30, 1 << 20) for n in names])
        pick = PowerOfTwo(lambda rid: (0, lengths.get(rid) or 0),
                          lambda rid: max_queue is not None and (lengths.get(rid) or 0) >= max_queue, rng)
        p = free.start(pick)
        room = p.next()
        p.end()
        return None if room is None else room.replica_id

    def order(names, lengths, rng):
        out, rest = [], list(names)
        while rest:
            out.append(choose(rest, lengths, rng))
            rest.remove(out[-1])
        return out

    assert all(choose(["a", "b"], lengths, rng) == "a" for _ in range(20))
    picks = [choose(["a", "b", "c"], lengths, rng) for _ in range(3000)]
    assert picks.count("c") == 0  # c loses every pair it is drawn into
    assert 0.6 < picks.count("a") / len(picks) < 0.73  # a wins both pairs it is in: 2/3
    assert choose(["a", "b", "c"], lengths, rng, max_queue=5) == "a"
    assert choose(["b", "c"], lengths, rng, max_queue=5) is None
    orders = [order(["a", "b", "c"], lengths, rng) for _ in range(50)]
    assert all(sorted(o) == ["a", "b", "c"] and o[-1] == "c" for o in orders)  # the longest queue never before
    ties = [choose(["x", "y"], {}, rng) for _ in range(2000)]  # no reports: spread at random
    assert 0.45 < ties.count("x") / 2000 < 0.55


def test_queue_lengths_expire_and_count_what_was_sent_since_the_report():
    clock = Clock()
    q = QueueLengths(ttl_s=1.0, clock=clock)
    assert q.get("r0") is None and q.stale(["r0", "r1"]) == ["r0", "r1"]
    q.report("r0", 3)
    q.sent("r0", 2)
    assert q.get("r0") == 5 and q.stale(["r0", "r1"]) == ["r1"]
    clock.t = 1.5
    assert q.get("r0") is None
    q.report("r0", 1)
    assert q.get("r0") == 1


def test_queue_lengths_count_what_was_sent_since_by_kind():
    """A job's samples add to the total only; interactive ones to both. A replica that reports one length (an older
    handle's ``queue_len``) has it taken for both."""
    clock = Clock()
    q = QueueLengths(ttl_s=1.0, clock=clock)
    q.report("r0", 10, interactive=2)  # 8 job samples, 2 interactive
    q.sent("r0", 4, job=True)
    assert (q.get("r0"), q.get("r0", interactive=True)) == (14, 2)
    q.sent("r0", 3)
    assert (q.get("r0"), q.get("r0", interactive=True)) == (17, 5)
    clock.t = 1.5  # stale: not fresh, but the last report still reads by kind
    assert q.get("r0", interactive=True) is None and (q.last("r0"), q.last("r0", interactive=True)) == (17, 5)
    q.report("r0", 6, interactive=1)  # a new report replaces what was sent since
    assert (q.get("r0"), q.get("r0", interactive=True)) == (6, 1)
    q.report("r1", 7)
    q.sent("r1", 2, job=True)
    assert q.get("r1") == q.get("r1", interactive=True) == 9


# ---- image bytes --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fmt", "compression"), [("png", None), ("jpeg", 80), ("jpeg", None), ("webp", 60)])
def test_encoded_bytes_are_forwarded_as_they_are_and_equal_encoding_the_pixels(fmt, compression):
    rng = np.random.default_rng(0)
    pixels = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    data = encode_image(pixels, fmt, compression)
    enc = EncodedImage(fmt, compression, data)
    assert image_bytes(enc, fmt, compression) is data  # forwarded, not encoded again
    assert image_bytes(pixels, fmt, compression) == data
    if fmt == "png":
        assert np.array_equal(enc.pixels(), pixels)
        assert image_bytes(enc, "jpeg", 90) == encode_image(pixels, "jpeg", 90)  # another format: re-encoded
    assert EncodedImage("jpeg", None, b"").matches("jpeg", 100) and not EncodedImage("jpeg", 90, b"").matches(
        "jpeg", 100)


# ---- the pool's config digest ---------------------------------------------------------------------------------
def test_front_doors_must_agree_on_what_shapes_the_replicas_but_not_on_their_own_settings():
    base = {"cluster": {"address": "auto"}, "frontdoor": {"pool": "p"}}
    a = pool_digest(config_from_dict(base))
    own = pool_digest(config_from_dict({**base, "router": {"queue_limit": 10, "request_timeout_s": 5},
                                        "server": {"port": 9000}, "frontdoor": {"pool": "p", "name": "fd-2"}}))
    assert differing(a, own) == []
    other = pool_digest(config_from_dict({**base, "router": {"max_batch_size": 2},
                                          "model": {"dtype": "float32"}}))
    assert differing(a, other) == ["model", "router"]


def test_a_pool_needs_a_cluster_that_outlives_the_process():
    from zimage_common.errors import ConfigError

    with pytest.raises(ConfigError, match="frontdoor.pool = 'p' keeps replicas.*set cluster.address"):
        config_from_dict({"frontdoor": {"pool": "p"}})
    with pytest.raises(ConfigError, match="frontdoor.pool"):
        config_from_dict({"cluster": {"address": "auto"}, "frontdoor": {"pool": "Bad_Name"}})
