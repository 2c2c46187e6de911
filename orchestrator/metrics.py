"""Prometheus metrics (prefix ``zimage_``, base units, ``_total`` on counters, no per-prompt labels).

``PrometheusObserver`` plugs into the router's observer hooks; the HTTP server exposes its registry on /metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from zimage_common.messages import Batch, BatchResult, FailureKind, ImageResult, ReplicaHealth

from .router import RouterObserver

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
TOKEN_BUCKETS = (1024, 2048, 4096, 8192, 12288, 16384, 20480, 24576, 32768, 49152, 65536)


class PrometheusObserver(RouterObserver):
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.waiting = Gauge("zimage_requests_waiting", "Requests queued in the router.", registry=r)
        self.running = Gauge("zimage_requests_running", "Requests dispatched to a replica, not yet answered.",
                             registry=r)
        self.queue_time = Histogram("zimage_queue_time_seconds", "Time from arrival to dispatch.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("zimage_request_latency_seconds", "End-to-end latency of successful requests.",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("zimage_batch_size", "Requests per pipeline call.", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_tokens = Histogram("zimage_batch_tokens", "Tokens per packed batch (the router's budget unit: "
                                      "image and caption tokens, an upper bound).", buckets=TOKEN_BUCKETS,
                                      registry=r)
        self.compilations = Counter("zimage_compilations_total", "Graphs torch.compile built in a replica, by phase: "
                                    "warmup (before ready) or serving (after ready; the goal is none).",
                                    ["replica", "phase"], registry=r)
        self.eager_fallbacks = Counter("zimage_eager_fallbacks_total", "Calls a replica ran without compiled code "
                                       "after ready, by stage (denoise, decode): a shape no compiled graph covers "
                                       "(the goal is none).", ["replica", "stage"], registry=r)
        self._seen: dict[tuple, int] = {}  # (counter, replica, phase or stage) -> the count the replica last reported
        self.images = Counter("zimage_images_generated_total", "Images generated successfully.", registry=r)
        self.requests = Counter("zimage_requests_total", "Requests answered, by outcome.", ["outcome"], registry=r)
        self.errors = Counter("zimage_request_errors_total", "Failed or rejected requests, by error type.",
                              ["type"], registry=r)
        self.busy = Gauge("zimage_replica_busy", "Batches in flight at the replica (0 = idle).", ["replica"],
                          registry=r)
        self.replica_up = Gauge("zimage_replica_up", "1 when the replica is live and serving.", ["replica"],
                                registry=r)
        self.gpu_memory = Gauge("zimage_gpu_memory_bytes", "Allocated GPU memory per replica device.",
                                ["replica", "device"], registry=r)
        self.gpu_memory_peak = Gauge("zimage_gpu_memory_peak_bytes", "Peak allocated GPU memory per replica device.",
                                     ["replica", "device"], registry=r)
        self.stage = Histogram("zimage_stage_seconds", "Seconds per pipeline stage per batch.", ["stage"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.replica_events = Counter("zimage_replica_events_total",
                                      "Replica lifecycle events: lost, hung, back, dropped, failed.",
                                      ["replica", "event"],
                                      registry=r)
        self.http = Counter("zimage_http_responses_total", "HTTP responses by status code (5xx: server faults).",
                            ["status"], registry=r)
        self.loop_running = Gauge("zimage_replica_running_samples", "Samples in the replica's step loop at its latest "
                                  "step.", ["replica"], registry=r)
        self.loop_joins = Histogram("zimage_step_joins", "Samples that joined a replica's step loop at a step.",
                                    buckets=(0,) + BATCH_BUCKETS, registry=r)
        self.time_to_first_step = Histogram("zimage_time_to_first_step_seconds",
                                            "Time from arrival to a request's first denoising step.",
                                            buckets=LATENCY_BUCKETS, registry=r)
        # several front doors over one pool (frontdoor.pool)
        self.replica_queue = Gauge("zimage_replica_queue_length", "Samples waiting at the replica's admission gate "
                                   "and inside it, sent by every front door of its pool (as the replica reports "
                                   "it).", ["replica"], registry=r)
        self.idempotency = Counter("zimage_idempotency_requests_total", "Calls with an Idempotency-Key, by what "
                                   "happened: new (ran), replayed (the recorded answer), pending (ran again while "
                                   "the first ran; its images are not made twice), mismatch (422).", ["outcome"],
                                   registry=r)
        self._inflight: dict[str, int] = {}
        self._devices: dict[str, set[str]] = {}  # replica -> the devices its memory series were set for
        self._queued: set[str] = set()  # replicas with a queue-length series

    def bind(self, router) -> None:
        """Read queue depths from the router at scrape time (always exact, no bookkeeping here)."""
        self.waiting.set_function(lambda: router.waiting)
        self.running.set_function(lambda: router.running)

    # ---- router hooks ----------------------------------------------------------------------------------
    def dispatched(self, replica_id: str, batch: Batch, queue_times: list[float]) -> None:
        self.batch_size.observe(len(batch))
        self.batch_tokens.observe(batch.tokens)
        for q in queue_times:
            self.queue_time.observe(q)
        self._inflight[replica_id] = self._inflight.get(replica_id, 0) + 1
        self.busy.labels(replica_id).set(self._inflight[replica_id])

    def batch_done(self, replica_id: str, out: BatchResult | None) -> None:
        self._inflight[replica_id] = max(0, self._inflight.get(replica_id, 1) - 1)
        self.busy.labels(replica_id).set(self._inflight[replica_id])
        if out is not None and out.stage_times.total_s > 0:
            st = out.stage_times
            self.stage.labels("encode").observe(st.encode_s)
            self.stage.labels("denoise").observe(st.denoise_s)
            self.stage.labels("decode").observe(st.decode_s)
            if st.image_encode_s > 0:  # batches with edits: the input images' VAE encode
                self.stage.labels("image_encode").observe(st.image_encode_s)

    def first_step(self, replica_id: str, waited_s: float) -> None:
        self.time_to_first_step.observe(waited_s)

    def loop_step(self, replica_id: str, running: int, joined: int) -> None:
        self.loop_running.labels(replica_id).set(running)
        self.loop_joins.observe(joined)

    def loop_idle(self, replica_id: str) -> None:
        self.loop_running.labels(replica_id).set(0)

    def finished(self, result: ImageResult) -> None:
        if result.ok:
            self.images.inc()
            self.latency.observe(result.latency_s)
            self.requests.labels("ok").inc()
        else:
            self.requests.labels("error").inc()
            self.errors.labels(str(result.error_type or FailureKind.REPLICA_ERROR)).inc()

    def rejected(self, kind: FailureKind) -> None:
        self.requests.labels("rejected").inc()
        self.errors.labels(str(kind)).inc()

    def http_response(self, status: int) -> None:
        self.http.labels(str(status)).inc()

    def idempotent_call(self, outcome: str) -> None:
        self.idempotency.labels(outcome).inc()

    def replica_event(self, replica_id: str, event: str) -> None:
        self.replica_events.labels(replica_id, event).inc()
        if event in ("lost", "hung", "dropped"):
            self.replica_up.labels(replica_id).set(0)
        elif event == "back":
            self.replica_up.labels(replica_id).set(1)

    # ---- replica state ---------------------------------------------------------------------------------
    def replica_state(self, replica_id: str, up: bool, health: ReplicaHealth | None = None) -> None:
        self.replica_up.labels(replica_id).set(1 if up else 0)
        if not up:  # its process is gone or not answering: no memory to show (not its last process's values)
            for dev in self._devices.pop(replica_id, ()):
                for gauge in (self.gpu_memory, self.gpu_memory_peak):
                    _remove(gauge, replica_id, dev)
        if health is not None:
            self._devices.setdefault(replica_id, set()).update(health.memory_allocated_bytes)
            for dev, b in health.memory_allocated_bytes.items():
                self.gpu_memory.labels(replica_id, dev).set(b)
            for dev, b in health.peak_memory_bytes.items():
                self.gpu_memory_peak.labels(replica_id, dev).set(b)
            for phase, n in (("warmup", health.compiles_warmup), ("serving", health.compiles_after_ready)):
                self._add_reported(self.compilations, replica_id, phase, n)
            for stage, n in ({"denoise": 0, "decode": 0} | health.eager_fallbacks).items():
                self._add_reported(self.eager_fallbacks, replica_id, stage, n)

    def replica_queues(self, lengths: dict[str, int]) -> None:
        """The replicas' queue lengths as polled: a replica the poll has no answer for (down) has no series, not
        its last value."""
        for rid in self._queued - set(lengths):
            _remove(self.replica_queue, rid)
        for rid, n in lengths.items():
            self.replica_queue.labels(rid).set(n)
        self._queued = set(lengths)

    def _add_reported(self, counter: Counter, replica_id: str, label: str, n: int) -> None:
        """Add to ``counter`` what a replica's running count ``n`` grew by since its last report (shown at 0 from
        the first report); a restarted replica counts from zero again, so a drop means all of ``n`` is new."""
        series = counter.labels(replica_id, label)
        last = self._seen.get((counter, replica_id, label), 0)
        if n != last:
            series.inc(n - last if n >= last else n)
            self._seen[(counter, replica_id, label)] = n


def _remove(gauge, *labels) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:  # never set
        pass
