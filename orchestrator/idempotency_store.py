"""The ``Idempotency-Key`` store: what keyed calls answered, and which replica makes each keyed image.

Two kinds of entry, one bound on both (``frontdoor.idempotency``: a time to live, a count and bytes; past a bound the
least recently touched finished entries go first; work in progress, a call not answered yet or an image being
made, is never evicted, only expired, so that a retry waits for it instead of running it again):

- **Calls** (the front doors'): a key's request fingerprint, and once it succeeded its whole answer (status, body,
  media type), replayed to a retry with the same key and body; the same key with another body is a mismatch.
- **Images** (the replicas', ``actors/intake.py``): a keyed image's claim (which replica process is making it) and,
  once made, its result. A claim is taken over when its replica process is gone (a new process of the same replica
  asks, or ``alive`` says so) or after ``claim_lease_s``.

Plain Python with an injected clock: the tests use it as it is, a front door without a pool holds one in its process,
and a pool's front doors and replicas share one inside a Ray actor (``ray_pool.py``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NEW, PENDING, DONE, MISMATCH = "new", "pending", "done", "mismatch"  # what ``begin`` finds
RUN, WAIT = "run", "wait"  # what ``claim`` answers, besides DONE


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: bytes
    media_type: str = "application/json"


@dataclass
class _Entry:
    fingerprint: str = ""
    response: StoredResponse | None = None
    claimant: tuple[str, int] | None = None
    claimed_at: float = 0.0
    result: Any = None  # an ImageResult, once made
    expires: float = 0.0
    size: int = 0


def _result_size(result) -> int:
    enc = getattr(result, "encoded", None)
    if enc is not None:
        return len(enc.data) + 256
    image = getattr(result, "image", None)
    return int(getattr(image, "nbytes", 0)) + 256


@dataclass
class StoreStats:
    calls_new: int = 0
    calls_replayed: int = 0
    calls_mismatched: int = 0
    images_claimed: int = 0
    images_served: int = 0  # claims answered with an image made before
    claims_taken_over: int = 0
    evicted: int = 0
    entries: int = 0
    bytes: int = 0


class IdempotencyStore:
    def __init__(self, ttl_s: float = 3600, max_entries: int = 10_000, max_bytes: int = 512 * 1024**2,
                 claim_lease_s: float = 900.0, clock: Callable[[], float] | None = None,
                 alive: Callable[[tuple[str, int]], bool | None] | None = None):
        """``alive(claimant)``: whether that replica process still runs (None: cannot tell); without it a claim
        stands until its lease ends or a new process of the same replica asks."""
        self.ttl_s, self.max_entries, self.max_bytes = ttl_s, max_entries, max_bytes
        self.claim_lease_s = claim_lease_s
        self._clock = clock or time.monotonic
        self._alive = alive
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._next_sweep = 0.0
        self.stats = StoreStats()

    # ---- calls (front doors) -------------------------------------------------------------------------------
    def begin(self, key: str, fingerprint: str) -> tuple[str, StoredResponse | None]:
        """A keyed call arrives: NEW (first time: recorded), PENDING (the same body is being answered, maybe by a
        front door that died), DONE with the recorded answer, or MISMATCH (the key came with another body)."""
        with self._lock:
            e = self._get("call:" + key)
            if e is None:
                self._put("call:" + key, _Entry(fingerprint=fingerprint), 256 + len(key))
                self.stats.calls_new += 1
                return NEW, None
            if e.fingerprint != fingerprint:
                self.stats.calls_mismatched += 1
                return MISMATCH, None
            if e.response is not None:
                self.stats.calls_replayed += 1
                return DONE, e.response
            return PENDING, None

    def finish(self, key: str, fingerprint: str, response: StoredResponse, ttl_s: float | None = None) -> None:
        """Record a keyed call's answer (successes only: a failed call may be retried and run), kept ``ttl_s``
        where that is shorter than the store's (an answer of image links is replayed only while they work)."""
        with self._lock:
            e = self._get("call:" + key)
            if e is not None and e.fingerprint != fingerprint:
                return
            self._put("call:" + key, _Entry(fingerprint=fingerprint, response=response),
                      256 + len(key) + len(response.body), ttl_s)

    def abandon(self, key: str, fingerprint: str) -> None:
        """A keyed call failed: forget it, so that a retry runs (its images made meanwhile stay in the store)."""
        with self._lock:
            e = self._entries.get("call:" + key)
            if e is not None and e.fingerprint == fingerprint and e.response is None:
                self._drop("call:" + key)

    # ---- images (replicas) ---------------------------------------------------------------------------------
    def claim(self, key: str, claimant: tuple[str, int]) -> tuple[str, Any]:
        claimant = tuple(claimant)
        with self._lock:
            e = self._get("image:" + key)
            if e is not None and e.result is not None:
                self.stats.images_served += 1
                return DONE, e.result
            if e is not None and e.claimant is not None:
                if e.claimant == claimant:
                    return WAIT, None  # another call of this very process is making it
                holder = e.claimant
                stale = (e.claimant[0] == claimant[0] and e.claimant[1] != claimant[1]  # that replica restarted
                         or self._clock() - e.claimed_at > self.claim_lease_s)
            else:
                holder, stale = None, True
        if holder is not None and not stale and self._alive is not None:
            stale = self._alive(holder) is False  # asked outside the lock: it may take a round trip
        with self._lock:
            e = self._get("image:" + key)
            if e is not None and e.result is not None:
                self.stats.images_served += 1
                return DONE, e.result
            if e is not None and e.claimant is not None and e.claimant != holder:
                return WAIT, None  # another replica took it over meanwhile
            if holder is not None and not stale:
                return WAIT, None
            if holder is not None:
                self.stats.claims_taken_over += 1
            self._put("image:" + key, _Entry(claimant=claimant, claimed_at=self._clock()), 256 + len(key))
            self.stats.images_claimed += 1
            return RUN, None

    def deposit(self, key: str, claimant: tuple[str, int], result) -> None:
        with self._lock:
            self._put("image:" + key, _Entry(result=result), 256 + len(key) + _result_size(result))

    def release(self, key: str, claimant: tuple[str, int]) -> None:
        with self._lock:
            e = self._entries.get("image:" + key)
            if e is not None and e.result is None and e.claimant == tuple(claimant):
                self._drop("image:" + key)

    def snapshot(self) -> StoreStats:
        with self._lock:
            self._expire()
            return StoreStats(**{**vars(self.stats), "entries": len(self._entries), "bytes": self._bytes})

    # ---- bounds --------------------------------------------------------------------------------------------
    def _get(self, k: str) -> _Entry | None:
        self._expire()
        e = self._entries.get(k)
        if e is not None and e.expires <= self._clock():
            self._drop(k)
            return None
        if e is not None:
            self._entries.move_to_end(k)
        return e

    def _put(self, k: str, e: _Entry, size: int, ttl_s: float | None = None) -> None:
        self._drop(k)
        e.expires, e.size = self._clock() + (self.ttl_s if ttl_s is None else min(self.ttl_s, ttl_s)), size
        self._entries[k] = e
        self._bytes += size
        if len(self._entries) <= self.max_entries and self._bytes <= self.max_bytes:
            return
        for old in [o for o, x in self._entries.items() if o != k and (x.response is not None or x.result is not None)]:
            if len(self._entries) <= self.max_entries and self._bytes <= self.max_bytes:
                break
            self._drop(old)
            self.stats.evicted += 1

    def _drop(self, k: str) -> None:
        e = self._entries.pop(k, None)
        if e is not None:
            self._bytes -= e.size

    def _expire(self) -> None:
        """Sweep out expired entries, at most about once a second (each lookup checks its own entry's expiry)."""
        now = self._clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + min(1.0, self.ttl_s / 10)
        for k in [k for k, e in self._entries.items() if e.expires <= now]:
            self._drop(k)
