"""GET /demo: the browser page that speaks as an LLM types (proxy/static/), and GET / as HTML for browsers.

The page is plain files shipped inside the package (package data in pyproject.toml): no build step, no CDN, no
third-party script. They are served from a fixed list, never from a path the client chooses, with a Content Security
Policy that lets the page talk only to this origin.
"""

from __future__ import annotations

import html
from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).resolve().parent.parent / "static"
# name -> content type; AudioWorklet.addModule() needs a JavaScript MIME type.
ASSETS = {
    "demo.js": "text/javascript",
    "pcm-player.js": "text/javascript",
    "pcm-player-worklet.js": "text/javascript",
    "demo.css": "text/css",
}
PAGE = "demo.html"
# Only this origin: the page's fetch() and WebSocket go back to the proxy that served it ('self' covers ws:/wss:).
# blob: for the WAV download link; data: for the empty favicon (no /favicon.ico request, no 404 in the console).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "media-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files that change with the package: revalidate rather than serve a stale page after an upgrade.
    "Cache-Control": "no-cache",
}


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


def wants_html(request: web.Request) -> bool:
    """A browser navigating to GET / (Accept: text/html, ...); curl, scripts and fetch() get JSON."""
    accept = request.headers.get("Accept", "")
    return any(part.split(";")[0].strip() == "text/html" for part in accept.split(","))


def index_page(info: dict) -> web.Response:
    """GET / for a browser: the same description as the JSON, with a link to the demo page."""
    rows = "\n".join(
        f"<tr><td><code>{html.escape(endpoint)}</code></td><td>{html.escape(text)}</td></tr>"
        for endpoint, text in info["endpoints"].items()
    )
    title = html.escape(f"{info['name']} {info['version']}")
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><link rel="icon" href="data:,">
<link rel="stylesheet" href="/demo/demo.css"></head>
<body class="index"><h1>{title}</h1>
<p>Streaming text-to-speech (model <code>{html.escape(str(info["model"]))}</code>, {info["sample_rate"]} Hz).
<a id="demo-link" href="/demo">Open the demo page</a>: type like an LLM and hear the audio as it streams.</p>
<table><thead><tr><th>Endpoint</th><th>What it does</th></tr></thead><tbody>
{rows}
</tbody></table>
<p>The same description as JSON: <code>curl {html.escape("http://<host>/")}</code> (any client that does not ask for
HTML).</p></body></html>
"""
    return web.Response(text=body, content_type="text/html", headers={**HEADERS, "Vary": "Accept"})
