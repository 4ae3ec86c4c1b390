"""GET / (what this service is), GET /health (proxy, every Triton replica, each model, the watermark), the probes
GET /livez and /readyz (proxy/drain.py), and GET /metrics.

With API keys on, /health's details and /metrics are for operators: a key with `"operator": true`, or the metrics
listener (PROXY_METRICS_PORT, `metrics_listener`), which a network policy keeps for Prometheus. Anyone else gets
/health's status alone (replica addresses, stream counts and the watermark key source say too much to the internet).
"""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from csm_tts import SAMPLE_RATE
from proxy import NAME, __version__
from proxy.admission import unauthorized
from proxy.appkeys import API_KEYS, DRAIN, METRICS, SETTINGS, STARTED, TRITON, WEBSOCKETS
from proxy.auth import presented_key
from proxy.errors import ApiError
from proxy.parse.openapi import openapi_document
from proxy.render.index_page import index_page, wants_html

ENDPOINTS = {
    "GET /": "This description: name, version, endpoints (HTML with a link to /demo when a browser asks)",
    "GET /demo": "A browser page: type like an LLM, hear the streamed audio (WS /stream), download it as WAV",
    "GET /health": "Proxy, Triton (live/ready per replica, each stage's load), each model, watermark state; 200 "
    "when all is ready (status degraded while a stage is behind), else 503",
    "GET /livez": "Liveness: 200 while the proxy answers",
    "GET /readyz": "Readiness: 200, or 503 once a drain (SIGTERM) started; independent of Triton",
    "GET /openapi.json": "The OpenAPI 3.1 description of the HTTP API (native and OpenAI surfaces)",
    "GET /metrics": "Prometheus metrics of the proxy (requests, time to first audio, streams, errors, rejections)",
    "POST /generate": "JSON {text, speaker_id, max_audio_length_ms, temperature, topk, watermark, watermark_key} -> "
    "JSON {audio_base64 (WAV), sample_rate, duration_ms, processing_time_ms, watermarked}",
    "POST /generate/wav": "Same body -> audio/wav attachment (speech.wav); with response_format: as /generate/audio",
    "POST /generate/audio": "Same body + response_format (mp3, opus, aac, flac, wav, pcm; default wav) -> the audio "
    "file, streamed as it is generated",
    "WS /stream": "One JSON message per text chunk; default: one reply per chunk; low-latency mode with "
    '?mode=stream or a first {"config": {"mode": "stream"}} message',
    "POST /stream/chunks": "JSON list of strings (query: speaker_id, watermark, ...) -> application/x-ndjson, "
    "one line {text, audio_base64, sample_rate} per text as soon as it is ready",
    "POST /v1/audio/speech": "OpenAI's speech API: {model, input, voice, response_format, stream_format, ...} -> the "
    "audio file (or SSE events), streamed as it is generated",
    "GET /v1/models": "OpenAI's model list: the served model and the OpenAI names it answers to",
    "GET /v1/audio/voices": "The voices: OpenAI names, presets from CSM_VOICES_DIR, speaker ids",
    "WS /v1/text-to-speech/{voice_id}/stream-input": "ElevenLabs' input streaming: text pieces in, the server cuts "
    "them, {audio, isFinal} out (output_format pcm_8000-pcm_48000, mp3_*; key in xi-api-key)",
    "WS /v1/text-to-speech/{voice_id}/multi-stream-input": "The same with several contexts (context_id, "
    "close_context): pipecat's ElevenLabsTTSService(url=...)",
}


async def index(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    info = {
        "name": NAME,
        "version": __version__,
        "model": settings.triton_model,
        "sample_rate": SAMPLE_RATE,
        "endpoints": ENDPOINTS,
        "docs": "docs/api.md",
    }
    if wants_html(request):
        return index_page(info)
    return web.json_response(info, headers={"Vary": "Accept"})


async def health(request: web.Request) -> web.Response:
    app = request.app
    settings, pool = app[SETTINGS], app[TRITON]
    now = time.monotonic()
    await pool.check_all(max_age_s=0.5)  # fresh, but a flood of probes costs at most one check per 0.5 s
    replicas, models = [], {}
    for replica in pool.replicas:
        h = replica.health
        replicas.append(
            {
                "url": replica.url,
                "live": h.live,
                "ready": h.ready,
                "serving": replica.healthy(settings.triton_model),
                "active_streams": replica.active_streams,
                "streams_started": replica.streams_started,
                "error": h.error,
                "models": {name: m["state"] for name, m in sorted(h.models.items())},
                "stages": h.load.as_json() if h.load else None,
                **({"stages_error": h.load_error} if h.load_error else {}),
            }
        )
        for name, m in h.models.items():
            entry = models.setdefault(name, {"ready": False, "ready_replicas": 0, "state": m["state"]})
            if m["state"] == "READY":
                entry.update(ready=True, state="READY")
                entry["ready_replicas"] += 1
            elif not entry["ready"] and m.get("reason"):
                entry["reason"] = m["reason"][:300]
    serving = [r for r in pool.replicas if r.healthy(settings.triton_model)]
    # The serving model is required; so is the watermarker when watermarking is on by default.
    for name in (settings.triton_model, *((settings.watermark_model,) if settings.watermark_default else ())):
        models.setdefault(name, {"ready": False, "ready_replicas": 0, "state": "NOT_FOUND"})
    all_ready = bool(serving) and all(m["ready"] for m in models.values())
    behind = pool.behind()
    body = {
        "status": ("degraded" if behind else "ok") if all_ready else "unavailable",
        "proxy": {
            "status": "ok",
            "name": NAME,
            "version": __version__,
            "uptime_s": round(now - app[STARTED], 1),
            "active_streams": pool.active_streams,
            "websockets": len(app[WEBSOCKETS]),
        },
        "triton": {
            "live": any(r.health.live for r in pool.replicas),
            "ready": any(r.health.ready for r in pool.replicas),
            "model": settings.triton_model,
            "serving_replicas": len(serving),
            "replicas": replicas,
        },
        "models": dict(sorted(models.items())),
        "behind": behind,
        "watermark": {
            "enabled": settings.watermark_default,
            "key_source": settings.watermark_key_source,
            "weights_present": models.get(settings.watermark_model, {}).get("ready", False),
        },
    }
    if not all_ready:
        body["error"] = (
            pool.unavailable_reason()
            if not serving
            else "Not every model is ready: " + ", ".join(name for name, m in models.items() if not m["ready"])
        )
    if all_ready and behind:  # still serving; new streams are refused at once (503) where a stage is behind
        body["warning"] = "; ".join(
            f"the {stage} is behind on {len(urls)} of {len(serving)} serving replicas: they refuse new streams until "
            "it catches up"
            for stage, urls in behind.items()
        )
    if not is_operator(request):
        body = {"status": body["status"]}
    return web.json_response(body, status=200 if all_ready else 503)


def is_operator(request: web.Request) -> bool:
    """Without keys everyone is; with keys, a key with the operator permission."""
    keys = request.app[API_KEYS]
    if keys is None:
        return True
    key = keys.authenticate(presented_key(request.headers, websocket=False))
    return key is not None and key.operator


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(__version__))


async def livez(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[DRAIN].active:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready"})


async def metrics_endpoint(request: web.Request) -> web.Response:
    app = request.app
    if not is_operator(request):
        if presented_key(request.headers, websocket=False) is None:
            raise unauthorized("GET /metrics needs an operator key, or PROXY_METRICS_PORT's listener")
        raise ApiError(403, "GET /metrics needs a key with the operator permission")
    return exposition(app)


def exposition(app: web.Application) -> web.Response:
    body = app[METRICS].exposition(app[TRITON], len(app[WEBSOCKETS]))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def metrics_listener(main: web.Application) -> web.Application:
    """The app of PROXY_METRICS_PORT: GET /metrics of `main`, no keys (keep the port to the scraper)."""

    async def scrape(request: web.Request) -> web.Response:
        return exposition(main)

    listener = web.Application()
    listener.router.add_get("/metrics", scrape)
    return listener
