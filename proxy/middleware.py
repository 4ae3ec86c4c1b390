"""The middleware every request passes, outermost first (proxy/app.py lists them in this order):

1. `observe_middleware`: the request id (the client's X-Request-ID or a new one), the request's scope
   (`request[SCOPE]`, and a context variable for log lines), the request counted with its final status and
   written to the access log (one line, client-aborted requests and WebSocket sessions included);
2. CORS (proxy/cors.py);
3. `error_middleware`: every error leaves as JSON through the one mapper (proxy/errors.py), in OpenAI's flavour on
   /v1 paths;
4. `door_middleware`: open paths pass; while draining everything else is 503; with keys configured a request without
   a valid key is 401 before its body is read. What the caller may start is decided by the endpoint's own explicit
   admission call (proxy/requests.py `admit`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import WSCloseCode, web

from proxy.admission import draining_error, unauthorized
from proxy.appkeys import API_KEYS, CONNECTIONS, DRAIN, METRICS, SCOPE, SETTINGS
from proxy.auth import WS_BEARER_PREFIX, WS_PROTOCOL, ApiKeys, presented_key
from proxy.errors import NATIVE, OPENAI, ApiError, HttpRefusal, error_body
from proxy.logs import ACCESS_LOG, access_line
from proxy.metrics import ProxyMetrics
from proxy.origins import page_may_connect
from proxy.scope import REQUEST_ID_HEADER, RequestScope, accept_request_id, enter_scope, leave_scope
from proxy.upstream.errors import UpstreamError

log = logging.getLogger("proxy")
access_log = logging.getLogger(ACCESS_LOG)
OPENAI_PREFIX = "/v1/"


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
    scope = RequestScope(accept_request_id(request.headers.get(REQUEST_ID_HEADER)), endpoint_label(request))
    request[SCOPE] = scope
    request.app[CONNECTIONS].request_started(request)
    endpoint = scope.endpoint
    token = enter_scope(scope)
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
        # The client went away: 499 (nginx's convention), unless it was a WebSocket session, which ends this way
        # when the client closes the connection after the closing handshake.
        status = 101 if isinstance(scope.response, web.WebSocketResponse) else 499
        raise
    finally:
        seconds = time.perf_counter() - started
        metrics.requests.labels(endpoint, request.method, str(status)).inc()
        metrics.request_seconds.labels(endpoint).observe(seconds)
        close_code = None
        if isinstance(scope.response, web.WebSocketResponse):
            close_code = scope.response.close_code or WSCloseCode.ABNORMAL_CLOSURE  # gone without a closing frame
        line = access_line(
            request.remote,
            request.method,
            request.raw_path,
            status,
            seconds,
            scope.request_id,
            request.headers.get("User-Agent", ""),
            close_code,
            scope.audio_seconds,
        )
        access_log.info("%s", line)
        leave_scope(token)


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """Every response carries the request id, WebSocket upgrades (101) and errors included; the scope keeps the
    response (the access log's WebSocket close code)."""
    if SCOPE in request:
        response.headers[REQUEST_ID_HEADER] = request[SCOPE].request_id
        request[SCOPE].response = response


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every error leaves as JSON with a fitting status (docs/api.md lists them); OpenAI's error object on /v1."""
    flavour = OPENAI if request.path.startswith(OPENAI_PREFIX) else NATIVE
    try:
        return await handler(request)
    except (ApiError, UpstreamError) as e:
        status, body, headers = error_body(e, flavour)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        refusal = HttpRefusal(
            e.status,
            request.method,
            request.path,
            allow=e.headers.get("Allow", ""),
            body_limit=request.app[SETTINGS].max_body_bytes,
            text=e.text or e.reason,
        )
        status, body, headers = error_body(refusal, flavour)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        status, body, headers = error_body(ApiError(500, "Internal server error"), flavour)
    return web.json_response(body, status=status, headers=headers)


# Paths anyone may call: what probes, scrapers and a page's static files need. Everything else (new endpoints
# included) needs a key when keys are configured.
OPEN_PATHS = frozenset({"/", "/health", "/livez", "/readyz", "/metrics", "/openapi.json"})
OPEN_PREFIXES = ("/demo",)


def is_open(request: web.Request) -> bool:
    if request.method == "OPTIONS":  # CORS preflights carry no credentials by design
        return True
    path = request.path
    return path in OPEN_PATHS or any(path == p or path.startswith(p + "/") for p in OPEN_PREFIXES)


def is_websocket(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


@web.middleware
async def door_middleware(request: web.Request, handler):
    if is_open(request):
        return await handler(request)
    app = request.app
    metrics: ProxyMetrics = app[METRICS]
    if app[DRAIN].active:
        metrics.rejections.labels("draining").inc()
        raise draining_error()
    websocket = is_websocket(request)
    if websocket:
        origin = request.headers.get("Origin")
        if not page_may_connect(app[SETTINGS].cors_origins, origin, request.host):
            metrics.rejections.labels("forbidden").inc()
            shown = origin if len(origin) <= 100 else origin[:100] + "..."
            raise ApiError(403, f"Origin {shown!r} may not open a WebSocket here (same origin or PROXY_CORS_ORIGINS)")
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if any(p.startswith(WS_BEARER_PREFIX) for p in protocols) and WS_PROTOCOL not in protocols:
            # Without "csm-tts" the server could select no protocol and a browser would fail the handshake.
            raise ApiError(400, f'Offer the subprotocols ["{WS_PROTOCOL}", "{WS_BEARER_PREFIX}<key>"] together')
    keys: ApiKeys | None = app[API_KEYS]
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
                request[SCOPE].request_id,
            )
            if token is None:
                raise unauthorized("An API key is required: send Authorization: Bearer <key>")
            raise unauthorized("Invalid API key")
        request[SCOPE].key = key
    return await handler(request)
