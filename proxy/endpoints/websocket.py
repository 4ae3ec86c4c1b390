"""WS /stream: an LLM's text chunks in, audio out (docs/api.md describes every message). This handler parses the
query, answers every refusal before the upgrade, then hands the socket to its session (proxy/session.py)."""

from __future__ import annotations

import socket

from aiohttp import web

from proxy.appkeys import METRICS, SETTINGS, WEBSOCKETS
from proxy.auth import WS_PROTOCOL
from proxy.errors import ApiError
from proxy.parse.fields import OPTION_NAMES
from proxy.parse.job import GenerateOptions
from proxy.parse.native import parse_query
from proxy.parse.websocket import CONFIG_KEYS, StreamConfig, parse_stream_config
from proxy.requests import check_admission
from proxy.session import StreamSession
from proxy.settings import Settings
from proxy.text_session import TextStreamSession


async def stream_ws(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    # The handshake's Origin was checked at the door (proxy/middleware.py).
    # parse: the session's config and default generation options, as a first {"config": {...}} message would set.
    config = parse_stream_config(
        parse_query(request.query, (*CONFIG_KEYS, *OPTION_NAMES)), StreamConfig(context=settings.context_enabled)
    )
    # admit, before the upgrade: the drain, the watermark policy of the session's options, a full server. Each text
    # is admitted again when its turn comes (key limits are per stream).
    check_admission(request, [GenerateOptions(text="", **config.options)], full=False)
    # Before the upgrade check: a plain GET then tells a browser why its handshake failed (the demo page does that).
    if len(app[WEBSOCKETS]) >= settings.max_websockets:
        app[METRICS].rejections.labels("full").inc()
        raise ApiError(
            503,
            f"Too many WebSocket connections (limit {settings.max_websockets}); retry later",
            headers={"Retry-After": "1"},
        )
    # No permessage-deflate: PCM and base64 audio barely compress, and deflating costs latency and CPU.
    ws = web.WebSocketResponse(
        heartbeat=settings.ws_heartbeat_s,
        max_msg_size=settings.max_body_bytes,
        writer_limit=settings.ws_write_buffer_bytes,
        compress=False,
        # Browsers send the API key as a second subprotocol ("bearer.<key>", proxy/auth.py): select only ours.
        protocols=(WS_PROTOCOL,),
    )
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "WS /stream needs a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)")
    await ws.prepare(request)
    bound_socket_buffers(request, settings)
    app[WEBSOCKETS].add(ws)
    try:
        session = TextStreamSession if config.text_stream else StreamSession
        await session(ws, request, config).run()
    finally:
        app[WEBSOCKETS].discard(ws)
    return ws


def bound_socket_buffers(request: web.Request, settings: Settings) -> None:
    """Flow control: the proxy holds at most ~ws_write_buffer_bytes (plus one message) for a client before its sends
    wait; optionally the kernel's send buffer is capped as well."""
    transport = request.transport
    if transport is None:
        return
    transport.set_write_buffer_limits(high=settings.ws_write_buffer_bytes)
    sock = transport.get_extra_info("socket")
    if settings.ws_socket_sndbuf and sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.ws_socket_sndbuf)
