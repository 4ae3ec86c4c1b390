"""The aiohttp application: its parts (settings, metrics, keys, admission, voices, the thread pool, the Triton pool
and its discovery), the middleware chain (proxy/middleware.py) and the URL table (proxy/routes.py).

`create_app(settings)` builds it; proxy/server.py runs it. A request goes: middleware (id and metrics, CORS, errors,
the door) -> its endpoint (proxy/endpoints/), which reads parse -> admit -> prepare -> generate -> render.
"""

from __future__ import annotations

import asyncio
import time
import weakref

from aiohttp import WSCloseCode, web

from proxy.admission import Admission, WatermarkPolicy
from proxy.appkeys import (
    ADMISSION,
    API_KEYS,
    CONNECTIONS,
    DRAIN,
    METRICS,
    OFFLOAD,
    RESOLVER,
    SETTINGS,
    STARTED,
    TRITON,
    VOICES,
    WEBSOCKETS,
)
from proxy.auth import ApiKeys, KeyFileError
from proxy.bad_requests import quiet_malformed_requests
from proxy.connections import ConnectionGuard
from proxy.cors import add_cors_headers, cors_middleware
from proxy.drain import Drain
from proxy.endpoints.info import metrics_listener
from proxy.logs import redact_keys_in_library_logs
from proxy.metrics import ProxyMetrics
from proxy.middleware import add_request_id_header, door_middleware, error_middleware, observe_middleware
from proxy.render.offload import Offload
from proxy.routes import setup_routes
from proxy.settings import Settings, SettingsError
from proxy.upstream.discovery import ServiceDiscovery
from proxy.upstream.pool import TritonPool
from proxy.voices import VoiceBook, VoiceConfigError


async def triton_ctx(app: web.Application):
    """The one long-lived Triton client pool (one gRPC channel per replica) for the app's whole life; with
    TRITON_GRPC_SERVICE, the discovery that keeps its replicas in step with the name's addresses."""
    settings, metrics = app[SETTINGS], app[METRICS]
    pool = TritonPool.from_settings(settings)
    pool.on_upstream_error = lambda code: metrics.upstream_errors.labels(code).inc()
    pool.on_full = lambda: metrics.rejections.labels("full").inc()
    app[TRITON] = pool
    discovery = None
    if settings.triton_grpc_service:
        discovery = ServiceDiscovery(pool, settings.triton_grpc_service, settings.discovery_interval_s, app[RESOLVER])
        await discovery.refresh()
        discovery.start()
    await pool.start()
    yield
    if discovery is not None:
        await discovery.close()
    await pool.close()


async def metrics_listener_ctx(app: web.Application):
    """PROXY_METRICS_PORT: /metrics on a port of its own, for the scraper, without keys."""
    settings = app[SETTINGS]
    listener = web.AppRunner(metrics_listener(app), access_log=None)
    await listener.setup()
    await web.TCPSite(listener, settings.host, settings.metrics_port).start()
    yield
    await listener.cleanup()


async def offload_ctx(app: web.Application):
    app[OFFLOAD] = offload = Offload(app[SETTINGS].cpu_threads)
    yield
    offload.close()


async def close_websockets(app: web.Application) -> None:
    sockets = list(app[WEBSOCKETS])
    await asyncio.gather(
        *(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown") for ws in sockets), return_exceptions=True
    )


def load_voices(settings: Settings) -> VoiceBook:
    """The voice presets are read (and their audio decoded) once, at start-up; a bad one stops the proxy."""
    try:
        return VoiceBook.from_settings(settings)
    except VoiceConfigError as e:
        raise SettingsError(str(e)) from None


def create_app(settings: Settings | None = None, resolver=None) -> web.Application:
    """`resolver(host, port) -> [address, ...]` replaces the system resolver for TRITON_GRPC_SERVICE (tests)."""
    settings = settings if settings is not None else Settings.from_env()
    quiet_malformed_requests()
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        # Outermost first: every response gets an id and is counted, CORS, errors become JSON (OpenAI's flavour on
        # /v1), then the door (drain, keys).
        middlewares=[observe_middleware, cors_middleware, error_middleware, door_middleware],
    )
    app[SETTINGS] = settings
    app[WEBSOCKETS] = weakref.WeakSet()
    app[STARTED] = time.monotonic()
    app[METRICS] = metrics = ProxyMetrics(key_names=settings.metrics_key_names)
    app[DRAIN] = drain = Drain()
    app[CONNECTIONS] = ConnectionGuard(
        settings.max_connections, settings.header_timeout_s, lambda reason: metrics.rejections.labels(reason).inc()
    )
    app[RESOLVER] = resolver
    try:
        app[API_KEYS] = ApiKeys.load(settings.api_keys_file) if settings.api_keys_file else None
    except KeyFileError as e:
        raise SettingsError(f"PROXY_API_KEYS_FILE: {e}") from None
    policy = WatermarkPolicy(
        allow_disable=settings.watermark_allow_disable,
        allow_custom_key=settings.watermark_allow_custom_key,
        watermark_default=settings.watermark_default,
    )
    app[ADMISSION] = Admission(metrics, policy, drain)
    redact_keys_in_library_logs()
    app[VOICES] = load_voices(settings)
    app.cleanup_ctx.append(offload_ctx)
    app.cleanup_ctx.append(triton_ctx)
    if settings.metrics_port:
        app.cleanup_ctx.append(metrics_listener_ctx)
    app.on_shutdown.append(close_websockets)
    app.on_response_prepare.append(add_cors_headers)
    app.on_response_prepare.append(add_request_id_header)
    setup_routes(app)
    return app
