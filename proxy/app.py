"""The aiohttp application: routes, error mapping, CORS, the Triton client's lifetime, open WebSockets.

`create_app(settings)` builds it; `start_server` / `python -m proxy` run it with handler cancellation on, so a client
that disconnects from POST /generate or /stream/chunks cancels its Triton stream too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import weakref

from aiohttp import WSCloseCode, web

from proxy import NAME, __version__
from proxy.api import (
    CONFIG_KEYS, OPTION_NAMES, ApiError, StreamConfig, parse_chunk_options, parse_generate, parse_query,
    parse_stream_config, parse_text_list, with_text,
)
from proxy.audio import SAMPLE_RATE, run_sized, wav_base64, wav_bytes
from proxy.context import ContextBudget, Conversation
from proxy.settings import Settings
from proxy.synthesis import synthesize
from proxy.triton_client import TritonPool, UpstreamError
from proxy.websocket import NO_TEXT, StreamSession

log = logging.getLogger("proxy")

SETTINGS = web.AppKey("settings", Settings)
TRITON = web.AppKey("triton", TritonPool)
WEBSOCKETS = web.AppKey("websockets", weakref.WeakSet)
STARTED = web.AppKey("started", float)

ENDPOINTS = {
    "GET /": "This description: name, version, endpoints",
    "GET /health": "Proxy, Triton (live/ready per replica), each model, watermark state; 200 when all is ready, "
                   "else 503",
    "POST /generate": "JSON {text, speaker_id, max_audio_length_ms, temperature, topk, watermark, watermark_key} -> "
                      "JSON {audio_base64 (WAV), sample_rate, duration_ms, processing_time_ms, watermarked}",
    "POST /generate/wav": "Same body -> audio/wav attachment (speech.wav)",
    "WS /stream": "One JSON message per text chunk; default: one reply per chunk; low-latency mode with "
                  "?mode=stream or a first {\"config\": {\"mode\": \"stream\"}} message",
    "POST /stream/chunks": "JSON list of strings (query: speaker_id, watermark, ...) -> application/x-ndjson, "
                           "one line {text, audio_base64, sample_rate} per text as soon as it is ready",
}


# -- helpers -------------------------------------------------------------------------------------------------------
def json_error(status: int, body: dict, headers: dict | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


async def read_json(request: web.Request) -> object:
    limit = request.app[SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"Request body too large: {request.content_length} bytes; the limit is {limit}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"Request body too large; the limit is {limit} bytes") from None
    if not raw.strip():
        raise ApiError(400, "The request body is empty: send JSON")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"Invalid JSON: {str(e)[:200]}") from None


def budget(settings: Settings) -> ContextBudget:
    return ContextBudget(positions=settings.context_positions, tokens_per_byte=settings.context_tokens_per_byte,
                         max_audio_s=settings.context_max_audio_s, max_segments=settings.context_max_segments)


# -- middleware and signals ----------------------------------------------------------------------------------------
@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every error leaves as JSON `{"error": ...}` with a fitting status (docs/api.md lists them)."""
    try:
        return await handler(request)
    except ApiError as e:
        return json_error(e.status, e.body(), e.headers)
    except UpstreamError as e:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return json_error(e.status, {"error": e.message}, headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 404:
            message = f"Not found: {request.path}; GET / lists the endpoints"
        elif e.status == 405:
            allowed = e.headers.get("Allow", "")
            message = f"Method {request.method} is not allowed for {request.path}; allowed: {allowed}"
        elif e.status == 413:
            message = f"Request body too large; the limit is {request.app[SETTINGS].max_body_bytes} bytes"
        else:
            message = e.text or e.reason
        headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
        return json_error(e.status, {"error": message}, headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(500, {"error": "Internal server error"})


@web.middleware
async def cors_middleware(request: web.Request, handler):
    """Answers CORS preflights; the headers of actual responses are added in `add_cors_headers`."""
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        origin = request.headers.get("Origin", "")
        if not origin_allowed(request.app[SETTINGS], origin):
            return json_error(403, {"error": f"Origin {origin!r} is not allowed (PROXY_CORS_ORIGINS)"})
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", "Content-Type"),
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        })
    return await handler(request)


def origin_allowed(settings: Settings, origin: str) -> bool:
    return bool(origin) and ("*" in settings.cors_origins or origin in settings.cors_origins)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    origin = request.headers.get("Origin", "")
    if origin and not isinstance(response, web.WebSocketResponse) and origin_allowed(request.app[SETTINGS], origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers.add("Vary", "Origin")


async def triton_ctx(app: web.Application):
    """The one long-lived Triton client pool (one gRPC channel per replica) for the app's whole life."""
    pool = TritonPool.from_settings(app[SETTINGS])
    app[TRITON] = pool
    await pool.start()
    yield
    await pool.close()


async def close_websockets(app: web.Application) -> None:
    sockets = list(app[WEBSOCKETS])
    await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown") for ws in sockets),
                         return_exceptions=True)


# -- handlers ------------------------------------------------------------------------------------------------------
async def index(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return web.json_response({
        "name": NAME, "version": __version__, "model": settings.triton_model, "sample_rate": SAMPLE_RATE,
        "endpoints": ENDPOINTS, "docs": "docs/api.md",
    })


async def health(request: web.Request) -> web.Response:
    app = request.app
    settings, pool = app[SETTINGS], app[TRITON]
    now = time.monotonic()
    await pool.check_all(max_age_s=0.5)  # fresh, but a flood of probes costs at most one check per 0.5 s
    replicas, models = [], {}
    for replica in pool.replicas:
        h = replica.health
        replicas.append({
            "url": replica.url, "live": h.live, "ready": h.ready, "serving": replica.healthy(settings.triton_model),
            "active_streams": replica.active_streams, "streams_started": replica.streams_started, "error": h.error,
            "models": {name: m["state"] for name, m in sorted(h.models.items())},
        })
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
    body = {
        "status": "ok" if all_ready else "unavailable",
        "proxy": {
            "status": "ok", "name": NAME, "version": __version__, "uptime_s": round(now - app[STARTED], 1),
            "active_streams": pool.active_streams, "websockets": len(app[WEBSOCKETS]),
        },
        "triton": {
            "live": any(r.health.live for r in pool.replicas),
            "ready": any(r.health.ready for r in pool.replicas),
            "model": settings.triton_model,
            "serving_replicas": len(serving),
            "replicas": replicas,
        },
        "models": dict(sorted(models.items())),
        "watermark": {
            "enabled": settings.watermark_default,
            "key_source": settings.watermark_key_source,
            "weights_present": models.get(settings.watermark_model, {}).get("ready", False),
        },
    }
    if not all_ready:
        body["error"] = pool.unavailable_reason() if not serving else "Not every model is ready: " + ", ".join(
            name for name, m in models.items() if not m["ready"])
    return web.json_response(body, status=200 if all_ready else 503)


async def generate(request: web.Request) -> web.Response:
    started = time.perf_counter()
    settings, pool = request.app[SETTINGS], request.app[TRITON]
    options = parse_generate(await read_json(request))
    clip = await synthesize(pool, options, settings.watermark_enabled)
    encoded = await run_sized(wav_base64, clip.audio, int(settings.wav_offload_seconds * SAMPLE_RATE))
    return web.json_response({
        "audio_base64": encoded,
        "sample_rate": SAMPLE_RATE,
        "duration_ms": clip.audio.size * 1000.0 / SAMPLE_RATE,
        "processing_time_ms": (time.perf_counter() - started) * 1000.0,
        "watermarked": clip.watermarked,
    })


async def generate_wav(request: web.Request) -> web.Response:
    settings, pool = request.app[SETTINGS], request.app[TRITON]
    options = parse_generate(await read_json(request))
    clip = await synthesize(pool, options, settings.watermark_enabled)
    body = await run_sized(wav_bytes, clip.audio, int(settings.wav_offload_seconds * SAMPLE_RATE))
    return web.Response(body=body, content_type="audio/wav",
                        headers={"Content-Disposition": "attachment; filename=speech.wav"})


async def stream_chunks(request: web.Request) -> web.StreamResponse:
    settings, pool = request.app[SETTINGS], request.app[TRITON]
    query = dict(request.query)
    context_enabled = settings.context_enabled
    if "context" in query:
        context_enabled = parse_stream_config(parse_query({"context": query.pop("context")}, ("context",)),
                                              StreamConfig()).context
    options = parse_chunk_options(query)
    texts = parse_text_list(await read_json(request), settings.max_text_chunks)
    await pool.pick()  # 503 now, before the 200 starts, when no Triton replica can serve
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
    await response.prepare(request)
    conversation = Conversation(budget(settings)) if context_enabled else None
    offload = int(settings.wav_offload_seconds * SAMPLE_RATE)
    try:
        for text in texts:
            line = await chunk_line(pool, settings, options, text, conversation, offload)
            await response.write(json.dumps(line).encode() + b"\n")
        await response.write_eof()
    except ConnectionError:
        log.info("client left POST /stream/chunks early")
    return response


async def chunk_line(pool, settings, options, text, conversation, offload) -> dict:
    if not text.strip():
        return {"error": NO_TEXT, "text": text}
    try:
        clip = await synthesize(pool, with_text(options, text), settings.watermark_enabled, conversation)
    except (ApiError, UpstreamError) as e:
        return {"error": e.message, "text": text}
    if conversation is not None:
        conversation.add(options.get("speaker_id", 0), text, clip.audio)
    return {"text": text, "audio_base64": await run_sized(wav_base64, clip.audio, offload), "sample_rate": SAMPLE_RATE}


async def stream_ws(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    origin = request.headers.get("Origin", "")
    if origin and settings.cors_origins and not origin_allowed(settings, origin):
        raise ApiError(403, f"Origin {origin!r} is not allowed (PROXY_CORS_ORIGINS)")
    # Query: the session's config and default generation options, as a first {"config": {...}} message would set.
    config = parse_stream_config(parse_query(request.query, (*CONFIG_KEYS, *OPTION_NAMES)),
                                 StreamConfig(context=settings.context_enabled))
    # No permessage-deflate: PCM and base64 audio barely compress, and deflating costs latency and CPU.
    ws = web.WebSocketResponse(
        heartbeat=settings.ws_heartbeat_s, max_msg_size=settings.max_body_bytes,
        writer_limit=settings.ws_write_buffer_bytes, compress=False,
    )
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "WS /stream needs a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)")
    if len(app[WEBSOCKETS]) >= settings.max_websockets:
        raise ApiError(503, f"Too many WebSocket connections (limit {settings.max_websockets}); retry later",
                       headers={"Retry-After": "1"})
    await ws.prepare(request)
    bound_socket_buffers(request, settings)
    app[WEBSOCKETS].add(ws)
    try:
        await StreamSession(ws, request, config, settings, app[TRITON]).run()
    finally:
        app[WEBSOCKETS].discard(ws)
    return ws


def bound_socket_buffers(request: web.Request, settings: Settings) -> None:
    """Flow control: the proxy holds at most ~ws_write_buffer_bytes (plus one message) for a client before its sends
    wait; optionally the kernel's send buffer is capped as well."""
    transport = request.transport
    if transport is None:
        return
    transport.set_write_buffer_limits(high=settings.ws_write_buffer_bytes)
    sock = transport.get_extra_info("socket")
    if settings.ws_socket_sndbuf and sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.ws_socket_sndbuf)


# -- the application -----------------------------------------------------------------------------------------------
def create_app(settings: Settings | None = None) -> web.Application:
    settings = settings if settings is not None else Settings.from_env()
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[cors_middleware, error_middleware])
    app[SETTINGS] = settings
    app[WEBSOCKETS] = weakref.WeakSet()
    app[STARTED] = time.monotonic()
    app.cleanup_ctx.append(triton_ctx)
    app.on_shutdown.append(close_websockets)
    app.on_response_prepare.append(add_cors_headers)
    app.router.add_get("/", index)
    app.router.add_get("/health", health)
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate/wav", generate_wav)
    app.router.add_get("/stream", stream_ws)
    app.router.add_post("/stream/chunks", stream_chunks)
    return app


async def start_server(app: web.Application, host: str, port: int, shutdown_timeout: float = 10.0) -> web.AppRunner:
    """Run `app` on host:port (0 = a free port; see `runner.addresses`) the way `python -m proxy` does."""
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner

