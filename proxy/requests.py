"""What an endpoint reads from its request: the JSON body (bounded; parsed in the thread pool when large), the
explicit admission call (proxy/admission.py) with the request's scope and the app's parts, and the room and upgrade
of a WebSocket session (WS /stream and the ElevenLabs sockets alike)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterable

from aiohttp import web

from proxy.admission import Lease
from proxy.appkeys import ADMISSION, METRICS, OFFLOAD, SCOPE, SETTINGS, TRITON, WEBSOCKETS
from proxy.errors import ApiError
from proxy.parse import strict_json
from proxy.parse.job import GenerateOptions

# Bodies up to this size are parsed on the event loop (microseconds); larger ones (reference clips) in the pool.
INLINE_JSON_BYTES = 64 << 10


async def read_json(request: web.Request) -> object:
    if not is_json_type(request.content_type):
        # A page on any site may POST text/plain or a form without asking (no CORS preflight): answering those
        # would let it drive this API from a visitor's browser.
        shown = request.headers.get("Content-Type", "none")[:100]
        raise ApiError(415, f"Content-Type must be application/json (got {shown!r})")
    settings = request.app[SETTINGS]
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"Request body too large: {request.content_length} bytes; the limit is {limit}")
    try:
        # aiohttp has no time limit on a body: a client announcing 100 kB and sending 8 bytes would hold its
        # connection (and this handler) forever.
        raw = await asyncio.wait_for(request.read(), settings.body_timeout_s)
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"Request body too large; the limit is {limit} bytes") from None
    except asyncio.TimeoutError:
        request.app[METRICS].rejections.labels("body_timeout").inc()
        message = f"The request body did not arrive within {settings.body_timeout_s:g} s (PROXY_BODY_TIMEOUT_S)"
        raise ApiError(408, message, headers={"Connection": "close"}) from None
    if not raw.strip():
        raise ApiError(400, "The request body is empty: send JSON")
    try:
        if len(raw) <= INLINE_JSON_BYTES:
            return strict_json.loads(raw)
        return await request.app[OFFLOAD].run(strict_json.loads, raw)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"Invalid JSON: {str(e)[:200]}") from None


def is_json_type(content_type: str) -> bool:
    """application/json or a +json type; `request.content_type` is already lower-cased, without parameters."""
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


def admit(request: web.Request, options: GenerateOptions) -> Lease:
    """Admission of one stream (403 policy, 429 key limits, 503 drain or full): call it before any expensive work;
    hold the lease (`with lease:`) until the stream ends."""
    return request.app[ADMISSION].admit(request[SCOPE], options, request.app[TRITON])


def check_admission(request: web.Request, asked: Iterable[GenerateOptions] = (), full: bool = True) -> None:
    """Admission of a request that will start several streams, before its 200 or upgrade: raises what a stream
    of these options would get now, takes nothing. `full`: also refuse when the proxy's stream limit is reached."""
    app = request.app
    app[ADMISSION].check(request[SCOPE], asked, app[TRITON] if full else None)


def check_websocket_room(request: web.Request) -> None:
    """503 + Retry-After when PROXY_MAX_WEBSOCKETS sessions are open (before the upgrade: a plain GET then tells a
    browser why its handshake failed)."""
    app, limit = request.app, request.app[SETTINGS].max_websockets
    if len(app[WEBSOCKETS]) >= limit:
        app[METRICS].rejections.labels("full").inc()
        raise ApiError(
            503, f"Too many WebSocket connections (limit {limit}); retry later", headers={"Retry-After": "1"}
        )


@contextlib.asynccontextmanager
async def websocket_session(request: web.Request, ws: web.WebSocketResponse) -> AsyncIterator[web.WebSocketResponse]:
    """The upgrade, its flow control, and the session counted (and closed by a drain) while it runs."""
    await ws.prepare(request)
    _bound_socket_buffers(request)
    request.app[WEBSOCKETS].add(ws)
    try:
        yield ws
    finally:
        request.app[WEBSOCKETS].discard(ws)


def _bound_socket_buffers(request: web.Request) -> None:
    """Flow control: the proxy holds at most ~ws_write_buffer_bytes (plus one message) for a client before its sends
    wait; optionally the kernel's send buffer is capped as well."""
    settings, transport = request.app[SETTINGS], request.transport
    if transport is None:
        return
    transport.set_write_buffer_limits(high=settings.ws_write_buffer_bytes)
    sock = transport.get_extra_info("socket")
    if settings.ws_socket_sndbuf and sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.ws_socket_sndbuf)
