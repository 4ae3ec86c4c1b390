"""Prometheus metrics of the proxy (`GET /metrics`, prometheus_client) and the middleware that gives every request
its id and its scope (proxy/scope.py).

Each app has its own `CollectorRegistry` (several apps run side by side in the tests; the process-wide default
registry would mix them). Labels are bounded: the endpoint is the matched route (unknown paths count as
"unmatched"), the status a number, the Triton code one of a short list, the key its configured *name*; never a
path, a request id, a text or a key.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from proxy.scope import REQUEST_ID_HEADER, RequestScope, accept_request_id, enter_scope, leave_scope
from proxy.web import METRICS, REQUEST_ID, STREAM_HOOKS, TRITON, WEBSOCKETS

# Seconds from a request reaching the proxy to its first audio from Triton.
TTFA_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
# Generation time / audio duration: below 1 is faster than real time.
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


class ProxyMetrics:
    def __init__(self):
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
            "limits), unauthorized (no or wrong key), forbidden (watermark policy), draining (shutting down)",
            ["reason"],
            registry=registry,
        )
        self.replicas = Gauge(
            "csm_proxy_triton_replicas",
            "Triton replicas known to this proxy; state=serving: ready with the model",
            ["state"],
            registry=registry,
        )
        self.draining = Gauge("csm_proxy_draining", "1 while the proxy drains before it stops", registry=registry)
        for reason in ("full", "rate_limited", "unauthorized", "forbidden", "draining"):
            self.rejections.labels(reason)  # every series exists from the start (rate() needs a first sample)

    def refresh(self, app: web.Application) -> None:
        """Gauges that mirror app state, set at scrape time."""
        pool = app[TRITON]
        self.active_streams.set(pool.active_streams)
        self.active_websockets.set(len(app[WEBSOCKETS]))
        self.replicas.labels("known").set(len(pool.replicas))
        self.replicas.labels("serving").set(len(pool.healthy()))

    def exposition(self, app: web.Application) -> bytes:
        self.refresh(app)
        return generate_latest(self.registry)


def endpoint_label(request: web.Request) -> str:
    info = request.match_info
    if info is None or info.http_exception is not None:  # 404 / 405: never the raw path (unbounded labels)
        return "unmatched"
    resource = info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe_middleware(request: web.Request, handler):
    """The outermost middleware: a request id (the client's X-Request-ID or a new one), the request's scope for
    everything below it, and the request counted with its final status."""
    request_id = accept_request_id(request.headers.get(REQUEST_ID_HEADER))
    request[REQUEST_ID] = request_id
    endpoint = endpoint_label(request)
    token = enter_scope(RequestScope(request_id, endpoint, hooks=request.app.get(STREAM_HOOKS)))
    metrics = request.app[METRICS]
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away (nginx's convention)
        raise
    finally:
        metrics.requests.labels(endpoint, request.method, str(status)).inc()
        metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - started)
        leave_scope(token)


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """Every response carries the request id, WebSocket upgrades (101) and errors included."""
    if REQUEST_ID in request:
        response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID]


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = request.app[METRICS].exposition(request.app)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class MetricsHooks:
    """The metrics part of a request scope's stream hooks (proxy/app.py chains it with the key limits)."""

    def __init__(self, metrics: ProxyMetrics):
        self.metrics = metrics

    def admitted(self, scope: RequestScope) -> None:
        if scope.key is not None:
            self.metrics.key_streams.labels(scope.key.name).inc()

    def first_audio(self, scope: RequestScope, seconds: float) -> None:
        self.metrics.ttfa.labels(scope.endpoint).observe(seconds)

    def closed(self, scope: RequestScope, seconds: float, audio_seconds: float, failed: bool) -> None:
        m = self.metrics
        m.stream_seconds.labels(scope.endpoint, "failed" if failed else "completed").observe(seconds)
        if audio_seconds > 0:
            m.audio_seconds.labels(scope.endpoint).inc(audio_seconds)
            if not failed:
                m.rtf.labels(scope.endpoint).observe(seconds / audio_seconds)
