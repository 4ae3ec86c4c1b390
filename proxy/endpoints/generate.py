"""POST /generate (JSON with base64 WAV), POST /generate/wav (a WAV file) and POST /stream/chunks (NDJSON, one line
per text as soon as it is ready)."""

from __future__ import annotations

import json
import logging
import time

from aiohttp import web

from csm_tts import SAMPLE_RATE
from proxy.api import (
    NO_TEXT,
    ApiError,
    StreamConfig,
    parse_chunk_options,
    parse_generate,
    parse_query,
    parse_stream_config,
    parse_text_list,
    with_text,
)
from proxy.audio import run_sized, wav_base64, wav_bytes
from proxy.context import ContextBudget, Conversation
from proxy.synthesis import synthesize
from proxy.triton_client import UpstreamError
from proxy.web import SETTINGS, TRITON, read_json

log = logging.getLogger("proxy")


async def generate(request: web.Request) -> web.Response:
    started = time.perf_counter()
    settings, pool = request.app[SETTINGS], request.app[TRITON]
    options = parse_generate(await read_json(request))
    clip = await synthesize(pool, options, settings.watermark_enabled)
    encoded = await run_sized(wav_base64, clip.audio, int(settings.wav_offload_seconds * SAMPLE_RATE))
    return web.json_response(
        {
            "audio_base64": encoded,
            "sample_rate": SAMPLE_RATE,
            "duration_ms": clip.audio.size * 1000.0 / SAMPLE_RATE,
            "processing_time_ms": (time.perf_counter() - started) * 1000.0,
            "watermarked": clip.watermarked,
        }
    )


async def generate_wav(request: web.Request) -> web.Response:
    settings, pool = request.app[SETTINGS], request.app[TRITON]
    options = parse_generate(await read_json(request))
    clip = await synthesize(pool, options, settings.watermark_enabled)
    body = await run_sized(wav_bytes, clip.audio, int(settings.wav_offload_seconds * SAMPLE_RATE))
    return web.Response(
        body=body, content_type="audio/wav", headers={"Content-Disposition": "attachment; filename=speech.wav"}
    )


async def stream_chunks(request: web.Request) -> web.StreamResponse:
    settings, pool = request.app[SETTINGS], request.app[TRITON]
    query = dict(request.query)
    context_enabled = settings.context_enabled
    if "context" in query:
        context_enabled = parse_stream_config(
            parse_query({"context": query.pop("context")}, ("context",)), StreamConfig()
        ).context
    options = parse_chunk_options(query)
    texts = parse_text_list(await read_json(request), settings.max_text_chunks)
    await pool.pick()  # 503 now, before the 200 starts, when no Triton replica can serve
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
    await response.prepare(request)
    conversation = Conversation(ContextBudget.from_settings(settings)) if context_enabled else None
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
    """One text's line. Whatever fails becomes that line's error: the 200 and the first lines are sent already, so an
    exception escaping here would break the response in the middle of its body."""
    if not text.strip():
        return {"error": NO_TEXT, "text": text}
    try:
        clip = await synthesize(pool, with_text(options, text), settings.watermark_enabled, conversation)
    except (ApiError, UpstreamError) as e:
        return {"error": e.message, "text": text}
    except Exception:
        log.exception("POST /stream/chunks: a text failed")
        return {"error": "Internal error while generating this text", "text": text}
    if conversation is not None:
        conversation.add(options.get("speaker_id", 0), text, clip.audio)
    return {"text": text, "audio_base64": await run_sized(wav_base64, clip.audio, offload), "sample_rate": SAMPLE_RATE}
