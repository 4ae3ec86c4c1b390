"""The aiohttp application: middleware (errors as JSON, CORS), the Triton client's lifetime, open WebSockets.

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

from proxy.api import ApiError
from proxy.bad_requests import quiet_malformed_requests
from proxy.cors import add_cors_headers, cors_middleware
from proxy.routes import setup_routes
from proxy.settings import Settings
from proxy.triton_client import TritonPool, UpstreamError
from proxy.web import SETTINGS, STARTED, TRITON, WEBSOCKETS

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
    """The one long-lived Triton client pool (one gRPC channel per replica) for the app's whole life."""
    pool = TritonPool.from_settings(app[SETTINGS])
    app[TRITON] = pool
    await pool.start()
    yield
    await pool.close()


async def close_websockets(app: web.Application) -> None:
    sockets = list(app[WEBSOCKETS])
    await asyncio.gather(
        *(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown") for ws in sockets), return_exceptions=True
    )


def create_app(settings: Settings | None = None) -> web.Application:
    settings = settings if settings is not None else Settings.from_env()
    quiet_malformed_requests()
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[cors_middleware, error_middleware])
    app[SETTINGS] = settings
    app[WEBSOCKETS] = weakref.WeakSet()
    app[STARTED] = time.monotonic()
    app.cleanup_ctx.append(triton_ctx)
    app.on_shutdown.append(close_websockets)
    app.on_response_prepare.append(add_cors_headers)
    setup_routes(app)
    return app


async def start_server(app: web.Application, host: str, port: int, shutdown_timeout: float = 10.0) -> web.AppRunner:
    """Run `app` on host:port (0 = a free port; see `runner.addresses`) the way `python -m proxy` does."""
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
