"""The URL table: which handler serves which endpoint (GET / lists them with a description)."""

from __future__ import annotations

from aiohttp import web

from proxy.endpoints.demo import demo_asset, demo_page
from proxy.endpoints.generate import generate, generate_wav, stream_chunks
from proxy.endpoints.info import health, index
from proxy.endpoints.websocket import stream_ws


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/health", health)
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate/wav", generate_wav)
    app.router.add_get("/stream", stream_ws)
    app.router.add_post("/stream/chunks", stream_chunks)
    app.router.add_get("/demo", demo_page)
    app.router.add_get("/demo/{name}", demo_asset)
