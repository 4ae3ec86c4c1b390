"""Who may start what: API keys (401), their limits (429 + Retry-After), the watermark policy (403) and the drain
(503), for every endpoint at once.

Two places apply them. `guard_middleware` runs before any handler: open paths pass; while draining, everything else
is 503; with keys configured, a request without a valid key is 401, and an HTTP request whose key is at a limit is
429 before any work (so `/stream/chunks` answers 429, not a 200 with failed lines). `Admission` is the request
scope's stream hooks (proxy/scope.py): `Generation` calls it before each Triton stream, which is where a key's
stream count and rate are taken, the watermark choices of that text are checked, and a WebSocket session's next
text is refused during the drain.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import web

from proxy.api import ApiError, GenerateOptions
from proxy.auth import WS_BEARER_PREFIX, WS_PROTOCOL, ApiKey, ApiKeys, LimitReached, presented_key
from proxy.metrics import MetricsHooks, ProxyMetrics
from proxy.scope import RequestScope, current_scope
from proxy.web import API_KEYS, DRAIN, METRICS, REQUEST_ID

log = logging.getLogger("proxy.admission")

# Paths anyone may call: what probes, scrapers and a page's static files need. Everything else (new endpoints
# included) needs a key when keys are configured.
OPEN_PATHS = frozenset({"/", "/health", "/livez", "/readyz", "/metrics"})
OPEN_PREFIXES = ("/demo",)


def is_open(request: web.Request) -> bool:
    if request.method == "OPTIONS":  # CORS preflights carry no credentials by design
        return True
    path = request.path
    return path in OPEN_PATHS or any(path == p or path.startswith(p + "/") for p in OPEN_PREFIXES)


@dataclass(frozen=True)
class WatermarkPolicy:
    """Whether clients may turn the watermark off, or choose their own key (CSM_WATERMARK_ALLOW_DISABLE,
    CSM_WATERMARK_ALLOW_CUSTOM_KEY; an API key may say otherwise for its holder)."""

    allow_disable: bool = True
    allow_custom_key: bool = True
    watermark_default: bool = True  # what requests without `watermark` get (CSM_WATERMARK_ENABLED)

    def for_key(self, key: ApiKey | None) -> WatermarkPolicy:
        if key is None:
            return self
        return WatermarkPolicy(
            allow_disable=self.allow_disable if key.allow_watermark_off is None else key.allow_watermark_off,
            allow_custom_key=(
                self.allow_custom_key if key.allow_custom_watermark_key is None else key.allow_custom_watermark_key
            ),
            watermark_default=self.watermark_default,
        )

    def check(self, options: GenerateOptions) -> None:
        """403 for a forbidden choice; never a silent fallback to the default."""
        if options.watermark is False and self.watermark_default and not self.allow_disable:
            raise ApiError(403, "Turning the watermark off is not allowed here (watermark: false)")
        if options.watermark_key is not None and not self.allow_custom_key:
            raise ApiError(403, "Choosing a watermark key is not allowed here (watermark_key)")


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, headers={"WWW-Authenticate": 'Bearer realm="csm-tts"'})


def too_many(limit: LimitReached) -> ApiError:
    return ApiError(429, limit.message, headers={"Retry-After": str(limit.retry_after_s)})


def draining_error() -> ApiError:
    return ApiError(
        503, "The server is shutting down; retry (another replica will answer)", headers={"Retry-After": "1"}
    )


@web.middleware
async def guard_middleware(request: web.Request, handler):
    if is_open(request):
        return await handler(request)
    app = request.app
    metrics: ProxyMetrics = app[METRICS]
    drain = app.get(DRAIN)
    if drain is not None and drain.active:
        metrics.rejections.labels("draining").inc()
        raise draining_error()
    websocket = request.headers.get("Upgrade", "").lower() == "websocket"
    if websocket:
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if any(p.startswith(WS_BEARER_PREFIX) for p in protocols) and WS_PROTOCOL not in protocols:
            # Without "csm-tts" the server could select no protocol and a browser would fail the handshake.
            raise ApiError(400, f'Offer the subprotocols ["{WS_PROTOCOL}", "{WS_BEARER_PREFIX}<key>"] together')
    keys: ApiKeys | None = app.get(API_KEYS)
    if keys is not None:
        token = presented_key(request.headers, websocket)
        key = keys.authenticate(token)
        if key is None:
            metrics.rejections.labels("unauthorized").inc()
            # The key itself is never logged; only that one was missing or unknown.
            log.warning(
                "refused %s %s: %s API key (request %s)",
                request.method,
                request.path,
                "no" if token is None else "unknown",
                request.get(REQUEST_ID, "-"),
            )
            if token is None:
                raise unauthorized("An API key is required: send Authorization: Bearer <key>")
            raise unauthorized("Invalid API key")
        scope = current_scope()
        if scope is not None:
            scope.key = key
        if not websocket:
            try:
                key.check_room()
            except LimitReached as e:
                metrics.rejections.labels("rate_limited").inc()
                raise too_many(e) from None
    return await handler(request)


class Admission:
    """The stream hooks of every request scope: drain, watermark policy, key limits, then metrics."""

    def __init__(self, metrics: ProxyMetrics, policy: WatermarkPolicy, drain=None):
        self.metrics = metrics
        self.measure = MetricsHooks(metrics)
        self.policy = policy
        self.drain = drain

    def admit(self, scope: RequestScope, options: GenerateOptions) -> None:
        if self.drain is not None and self.drain.active:
            self.metrics.rejections.labels("draining").inc()
            raise draining_error()
        key: ApiKey | None = scope.key
        try:
            self.policy.for_key(key).check(options)
        except ApiError:
            self.metrics.rejections.labels("forbidden").inc()
            raise
        if key is not None:
            try:
                key.take_stream()
            except LimitReached as e:
                self.metrics.rejections.labels("rate_limited").inc()
                raise too_many(e) from None
        self.measure.admitted(scope)

    def first_audio(self, scope: RequestScope, seconds: float) -> None:
        self.measure.first_audio(scope, seconds)

    def closed(self, scope: RequestScope, seconds: float, audio_seconds: float, failed: bool) -> None:
        if scope.key is not None:
            scope.key.release_stream()
        self.measure.closed(scope, seconds, audio_seconds, failed)
