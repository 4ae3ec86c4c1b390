"""WS /stream: an LLM's text chunks in, audio out (docs/api.md describes every message). This handler parses the
query, answers every refusal before the upgrade, then hands the socket to its session (proxy/session.py)."""

from __future__ import annotations

from aiohttp import web

from proxy.appkeys import SETTINGS
from proxy.auth import WS_PROTOCOL
from proxy.errors import ApiError
from proxy.parse.fields import OPTION_NAMES
from proxy.parse.job import GenerateOptions
from proxy.parse.native import parse_query
from proxy.parse.websocket import CONFIG_KEYS, StreamConfig, parse_stream_config
from proxy.requests import check_admission, check_websocket_room, websocket_session
from proxy.session import StreamSession
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
    check_websocket_room(request)
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
    async with websocket_session(request, ws):
        session = TextStreamSession if config.text_stream else StreamSession
        await session(ws, request, config).run()
    return ws
