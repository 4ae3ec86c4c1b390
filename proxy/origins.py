"""Which web origins may use the API: the proxy's own (same host) and PROXY_CORS_ORIGINS ("*": any). Plain Python.

Browsers send `Origin` on cross-site requests and on every WebSocket handshake; a page cannot forge it. A
WebSocket is not covered by CORS (a browser opens one to any host), so the proxy checks its `Origin` itself; a
client that sends none (curl, SDKs, servers) is not a browser page and passes.
"""

from __future__ import annotations

from urllib.parse import urlsplit


def listed_origin(allowed: tuple[str, ...], origin: str) -> bool:
    return bool(origin) and ("*" in allowed or origin in allowed)


def same_host(origin: str, host: str) -> bool:
    """`Origin: http://h:p` against the request's `Host: h:p`. The scheme is not compared: behind a proxy that ends
    TLS the page is https and the request reaching this process is http."""
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        return False
    return bool(netloc) and bool(host) and netloc.lower() == host.strip().lower()


def page_may_connect(allowed: tuple[str, ...], origin: str | None, host: str) -> bool:
    """May a WebSocket handshake carrying this Origin (None: no header) be accepted?"""
    if origin is None:
        return True
    return same_host(origin, host) or listed_origin(allowed, origin)
