"""The URL table: which handler serves which endpoint (GET / lists them with a description, proxy/endpoints/info.py).

A new endpoint: a module in proxy/endpoints/ (parse with proxy/parse/, `admit` from proxy/requests.py before any
expensive work, generate with proxy/spoken.py, answer with proxy/render/), one line here, one in info.ENDPOINTS.
"""

from __future__ import annotations

from aiohttp import web

from proxy.endpoints import demo, elevenlabs, generate, info, openai, websocket


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/", info.index)
    app.router.add_get("/health", info.health)
    app.router.add_get("/livez", info.livez)
    app.router.add_get("/readyz", info.readyz)
    app.router.add_get("/metrics", info.metrics_endpoint)
    app.router.add_get("/openapi.json", info.openapi)
    app.router.add_post("/generate", generate.generate)
    app.router.add_post("/generate/wav", generate.generate_wav)
    app.router.add_post("/generate/audio", generate.generate_audio)
    app.router.add_get("/stream", websocket.stream_ws)
    app.router.add_post("/stream/chunks", generate.stream_chunks)
    app.router.add_post("/v1/audio/speech", openai.speech)
    app.router.add_get("/v1/models", openai.models)
    app.router.add_get("/v1/audio/voices", openai.voices)
    app.router.add_get("/v1/text-to-speech/{voice_id}/stream-input", elevenlabs.stream_input)
    app.router.add_get("/v1/text-to-speech/{voice_id}/multi-stream-input", elevenlabs.multi_stream_input)
    app.router.add_get("/demo", demo.demo_page)
    app.router.add_get("/demo/{name}", demo.demo_asset)
