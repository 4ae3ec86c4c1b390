"""GET / as HTML for browsers, and the security headers every page of the proxy carries (the demo page's too)."""

from __future__ import annotations

import html

from aiohttp import web

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
