"""The URL table: which handler serves which endpoint (GET / lists them with a description)."""

from __future__ import annotations

from aiohttp import web

from proxy.drain import livez, readyz
from proxy.endpoints import openai
from proxy.endpoints.demo import demo_asset, demo_page
from proxy.endpoints.generate import generate, generate_audio, generate_wav, stream_chunks
from proxy.endpoints.info import health, index
from proxy.endpoints.websocket import stream_ws
from proxy.metrics import metrics_endpoint


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/health", health)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate/wav", generate_wav)
    app.router.add_post("/generate/audio", generate_audio)
    app.router.add_get("/stream", stream_ws)
    app.router.add_post("/stream/chunks", stream_chunks)
    app.router.add_post("/v1/audio/speech", openai.speech)
    app.router.add_get("/v1/models", openai.models)
    app.router.add_get("/v1/audio/voices", openai.voices)
    app.router.add_get("/demo", demo_page)
    app.router.add_get("/demo/{name}", demo_asset)
