"""CORS for browsers on other origins (PROXY_CORS_ORIGINS): preflight answers and the headers of responses."""

from __future__ import annotations

from aiohttp import web

from proxy.appkeys import SETTINGS
from proxy.origins import listed_origin
from proxy.settings import Settings


@web.middleware
async def cors_middleware(request: web.Request, handler):
    """Answers CORS preflights; the headers of actual responses are added in `add_cors_headers`."""
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        origin = request.headers.get("Origin", "")
        if not origin_allowed(request.app[SETTINGS], origin):
            return web.json_response(
                status=403, data={"error": f"Origin {origin!r} is not allowed (PROXY_CORS_ORIGINS)"}
            )
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", "Content-Type"),
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            },
        )
    return await handler(request)


def origin_allowed(settings: Settings, origin: str) -> bool:
    return listed_origin(settings.cors_origins, origin)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    origin = request.headers.get("Origin", "")
    if origin and not isinstance(response, web.WebSocketResponse) and origin_allowed(request.app[SETTINGS], origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "X-Request-ID, Retry-After"
        response.headers.add("Vary", "Origin")
