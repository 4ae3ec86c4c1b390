"""GET /demo: the browser page that speaks as an LLM types (proxy/static/; its headers: proxy/render/index_page.py).

The page is plain files shipped inside the package (package data in pyproject.toml): no build step, no CDN, no
third-party script. They are served from a fixed list, never from a path the client chooses, with a Content Security
Policy that lets the page talk only to this origin.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from proxy.render.index_page import HEADERS

STATIC = Path(__file__).resolve().parent.parent / "static"
# name -> content type; AudioWorklet.addModule() needs a JavaScript MIME type.
ASSETS = {
    "demo.js": "text/javascript",
    "pcm-player.js": "text/javascript",
    "pcm-player-worklet.js": "text/javascript",
    "demo.css": "text/css",
}
PAGE = "demo.html"


def _file(name: str, content_type: str) -> web.FileResponse:
    response = web.FileResponse(STATIC / name, headers=HEADERS)
    response.content_type = content_type
    return response


async def demo_page(request: web.Request) -> web.StreamResponse:
    response = _file(PAGE, "text/html")
    response.charset = "utf-8"
    return response


async def demo_asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise web.HTTPNotFound()
    return _file(name, ASSETS[name])
