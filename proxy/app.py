"""The aiohttp application: middleware (request ids and metrics, CORS, errors as JSON, keys and drain), the Triton
client's lifetime (and replica discovery), open WebSockets.

`create_app(settings)` builds it (routes: proxy/routes.py, handlers: proxy/endpoints/); `start_server` /
`python -m proxy` run it with handler cancellation on, so a client that disconnects from POST /generate or
/stream/chunks cancels its Triton stream too.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref

from aiohttp import WSCloseCode, web

from proxy.admission import Admission, WatermarkPolicy, guard_middleware
from proxy.api import ApiError
from proxy.auth import ApiKeys, KeyFileError
from proxy.bad_requests import quiet_malformed_requests
from proxy.cors import add_cors_headers, cors_middleware
from proxy.discovery import ServiceDiscovery
from proxy.drain import Drain
from proxy.endpoints.openai import openai_errors
from proxy.logs import redact_keys_in_library_logs
from proxy.metrics import ProxyMetrics, add_request_id_header, observe_middleware
from proxy.routes import setup_routes
from proxy.settings import Settings, SettingsError
from proxy.triton_client import TritonPool, UpstreamError
from proxy.voices import VoiceBook, VoiceConfigError
from proxy.web import API_KEYS, DRAIN, METRICS, RESOLVER, SETTINGS, STARTED, STREAM_HOOKS, TRITON, VOICES, WEBSOCKETS

log = logging.getLogger("proxy")


def json_error(status: int, body: dict, headers: dict | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every error leaves as JSON `{"error": ...}` with a fitting status (docs/api.md lists them)."""
    try:
        return await handler(request)
    except ApiError as e:
        return json_error(e.status, e.body(), e.headers)
    except UpstreamError as e:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return json_error(e.status, {"error": e.message}, headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 404:
            message = f"Not found: {request.path}; GET / lists the endpoints"
        elif e.status == 405:
            allowed = e.headers.get("Allow", "")
            message = f"Method {request.method} is not allowed for {request.path}; allowed: {allowed}"
        elif e.status == 413:
            message = f"Request body too large; the limit is {request.app[SETTINGS].max_body_bytes} bytes"
        else:
            message = e.text or e.reason
        headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
        return json_error(e.status, {"error": message}, headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(500, {"error": "Internal server error"})


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
        # Outermost first: every response gets an id and is counted, errors become JSON (OpenAI's shape on /v1),
        # then keys and the drain.
        middlewares=[observe_middleware, cors_middleware, error_middleware, openai_errors, guard_middleware],
    )
    app[SETTINGS] = settings
    app[WEBSOCKETS] = weakref.WeakSet()
    app[STARTED] = time.monotonic()
    app[METRICS] = metrics = ProxyMetrics()
    app[DRAIN] = drain = Drain()
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
    app[STREAM_HOOKS] = Admission(metrics, policy, drain)
    redact_keys_in_library_logs()
    app[VOICES] = load_voices(settings)
    app.cleanup_ctx.append(triton_ctx)
    app.on_shutdown.append(close_websockets)
    app.on_response_prepare.append(add_cors_headers)
    app.on_response_prepare.append(add_request_id_header)
    setup_routes(app)
    return app


async def start_server(app: web.Application, host: str, port: int, shutdown_timeout: float = 10.0) -> web.AppRunner:
    """Run `app` on host:port (0 = a free port; see `runner.addresses`) the way `python -m proxy` does."""
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
