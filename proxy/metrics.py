"""Prometheus metrics of the proxy (`GET /metrics`, prometheus_client): the families, and the hooks each admitted
stream reports to (first audio, end).

Each app has its own `CollectorRegistry` (several apps run side by side in the tests; the process-wide default
registry would mix them). Labels are bounded: the endpoint is the matched route (unknown paths count as
"unmatched"), the status a number, the Triton code one of a short list, the key its configured *name*; never a
path, a request id, a text or a key.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from proxy.scope import RequestScope

# Seconds from a request reaching the proxy to its first audio from Triton.
TTFA_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
# Generation time / audio duration: below 1 is faster than real time.
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


class ProxyMetrics:
    def __init__(self, key_names: bool = False):
        self.key_names = key_names  # PROXY_METRICS_KEY_NAMES: key names are labels only when the operator says so
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "csm_proxy_requests",
            "HTTP requests and WebSocket sessions, by route, method and final status (101: a WebSocket session)",
            ["endpoint", "method", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "csm_proxy_request_duration_seconds",
            "How long requests take, WebSocket sessions included (their whole life)",
            ["endpoint"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.ttfa = Histogram(
            "csm_proxy_time_to_first_audio_seconds",
            "From a generation request (one text) to its first audio from Triton",
            ["endpoint"],
            buckets=TTFA_BUCKETS,
            registry=registry,
        )
        self.rtf = Histogram(
            "csm_proxy_real_time_factor",
            "Generation time divided by audio duration, per completed stream (below 1: faster than real time)",
            ["endpoint"],
            buckets=RTF_BUCKETS,
            registry=registry,
        )
        self.stream_seconds = Histogram(
            "csm_proxy_stream_duration_seconds",
            "How long each Triton stream (one text) ran, completed or not",
            ["endpoint", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.audio_seconds = Counter(
            "csm_proxy_audio_seconds", "Seconds of audio generated", ["endpoint"], registry=registry
        )
        self.key_streams = Counter(
            "csm_proxy_key_streams",
            "Streams started per API key (the key's configured name)",
            ["key"],
            registry=registry,
        )
        self.active_streams = Gauge("csm_proxy_active_streams", "Triton streams open now", registry=registry)
        self.active_websockets = Gauge("csm_proxy_active_websockets", "WebSocket sessions open now", registry=registry)
        self.upstream_errors = Counter(
            "csm_proxy_upstream_errors",
            "Triton failures by code: the models' codes (INVALID_ARG, UNAVAILABLE, INTERNAL, CANCELLED), UNCODED "
            "(Triton's own), GRPC_* (transport), IDLE_TIMEOUT, ENDED_EARLY, NO_REPLICA",
            ["code"],
            registry=registry,
        )
        self.rejections = Counter(
            "csm_proxy_rejections",
            "Requests and streams the proxy refused: full (its own or Triton's limits), rate_limited (a key's "
            "limits), unauthorized (no or wrong key), forbidden (watermark policy), draining (shutting down), "
            "connections (PROXY_MAX_CONNECTIONS), header_timeout, body_timeout (a client too "
            "slow to send its request)",
            ["reason"],
            registry=registry,
        )
        self.text_segments = Counter(
            "csm_proxy_text_segments",
            "Segments of long or streamed texts generated, by how they ended: eos (on their own), length (ran to "
            "their audio limit without the end-of-speech frame: text may be unspoken)",
            ["end"],
            registry=registry,
        )
        self.replicas = Gauge(
            "csm_proxy_triton_replicas",
            "Triton replicas known to this proxy; state=serving: ready with the model",
            ["state"],
            registry=registry,
        )
        self.behind = Gauge(
            "csm_proxy_triton_stage_behind",
            "Serving Triton replicas where a stage does not keep up (stage=watermarker: csm_1b starts no new stream "
            "there), at their last health check",
            ["stage"],
            registry=registry,
        )
        self.draining = Gauge("csm_proxy_draining", "1 while the proxy drains before it stops", registry=registry)
        for reason in (
            "full",
            "rate_limited",
            "unauthorized",
            "forbidden",
            "draining",
            "connections",
            "header_timeout",
            "body_timeout",
        ):
            self.rejections.labels(reason)  # every series exists from the start (rate() needs a first sample)

    def exposition(self, pool, websockets: int) -> bytes:
        """The text format, with the gauges that mirror the app's state set now (at scrape time)."""
        self.active_streams.set(pool.active_streams)
        self.active_websockets.set(websockets)
        self.replicas.labels("known").set(len(pool.replicas))
        self.replicas.labels("serving").set(len(pool.healthy()))
        self.behind.labels("watermarker").set(len(pool.behind().get("watermarker", ())))
        return generate_latest(self.registry)

    # -- what an admitted stream reports (proxy/admission.py `Lease`) ------------------------------------------------
    def stream_admitted(self, scope: RequestScope) -> None:
        if scope.key is not None and self.key_names:
            self.key_streams.labels(scope.key.name).inc()

    def stream_first_audio(self, scope: RequestScope, seconds: float) -> None:
        self.ttfa.labels(scope.endpoint).observe(seconds)

    def stream_closed(self, scope: RequestScope, seconds: float, audio_seconds: float, failed: bool) -> None:
        scope.audio_seconds += audio_seconds
        self.stream_seconds.labels(scope.endpoint, "failed" if failed else "completed").observe(seconds)
        if audio_seconds > 0:
            self.audio_seconds.labels(scope.endpoint).inc(audio_seconds)
            if not failed:
                self.rtf.labels(scope.endpoint).observe(seconds / audio_seconds)
