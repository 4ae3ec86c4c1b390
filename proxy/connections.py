"""Limits on connections that aiohttp's server does not have: a cap on open connections and a time limit on a new
connection's first request header (docs/api.md, "Connections and time limits").

aiohttp 3.14's server has `keepalive_timeout` (proxy/server.py sets it), which runs from a connection's start and from
each answer until the next complete header, and closes the connection only while it waits for one: it bounds slow
headers, but the same figure is the idle keep-alive time, which must stay above a load balancer's own (60 s on many)
or the balancer reuses connections the proxy has just closed. It has no limit on open connections (only the listen
backlog) and no time limit on a body. So: the first header of a connection gets its own, short, limit here; bodies
are read under a limit in proxy/requests.py; and connections beyond the cap are answered 503 and closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

# What a connection over the cap gets before it is closed (no request has been read: a bare HTTP answer).
_FULL_BODY = b'{"error": "Too many open connections (PROXY_MAX_CONNECTIONS); retry later"}'
_FULL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\n"
    + b"Content-Length: %d\r\n\r\n" % len(_FULL_BODY)
    + _FULL_BODY
)


class ConnectionGuard:
    """Installed on the running server (`install`); the observe middleware calls `request_started` for each request,
    which marks its connection as past its first header."""

    def __init__(self, max_connections: int, header_timeout_s: float, on_refused: Callable[[str], None]):
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.on_refused = on_refused  # "connections" (the cap) or "header_timeout"
        self._waiting: dict = {}  # protocol (one per connection) -> the timer of its first header

    def install(self, server: web.Server) -> None:
        arrived = server.connection_made

        def connection_made(handler, transport: asyncio.Transport) -> None:
            arrived(handler, transport)
            if len(server.connections) > self.max_connections:
                self.on_refused("connections")
                transport.write(_FULL)
                transport.close()
                return
            loop = asyncio.get_running_loop()
            self._waiting[handler] = loop.call_later(self.header_timeout_s, self._header_late, handler, transport)

        server.connection_made = connection_made  # type: ignore[method-assign]

    def request_started(self, request: web.BaseRequest) -> None:
        timer = self._waiting.pop(request.protocol, None)
        if timer is not None:
            timer.cancel()

    def _header_late(self, handler, transport: asyncio.Transport) -> None:
        del self._waiting[handler]
        if not transport.is_closing():
            self.on_refused("header_timeout")
            transport.close()  # nothing was read: no answer to give, as a server does on a header timeout
