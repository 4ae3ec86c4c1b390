"""POST /generate (JSON with base64 WAV), POST /generate/wav (a WAV file), POST /generate/audio (any response_format,
streamed as generated) and POST /stream/chunks (NDJSON, one line per text as soon as it is ready).

/generate, /generate/wav and /generate/audio also take a voice to clone: `reference_audio` (base64 audio file) with
`reference_text`. /generate/wav without `response_format` answers exactly as it always has (the whole WAV, with
Content-Length); with it, it is /generate/audio.
"""

from __future__ import annotations

import json
import logging
import time

from aiohttp import web

from csm_tts import SAMPLE_RATE
from csm_tts.parsing import shown
from proxy.api import (
    NO_TEXT,
    ApiError,
    GenerateOptions,
    StreamConfig,
    ValidationError,
    parse_chunk_options,
    parse_generate,
    parse_query,
    parse_stream_config,
    parse_text_list,
    with_text,
)
from proxy.audio import run_sized, wav_base64, wav_bytes
from proxy.context import ContextBudget, Conversation, Segment
from proxy.encoders import FORMATS, RESPONSE_FORMATS
from proxy.endpoints.audio_stream import content_disposition, reference_error, reference_segments, stream_speech
from proxy.synthesis import synthesize
from proxy.triton_client import UpstreamError
from proxy.voices import REFERENCE_FIELDS, InvalidReference, Limits, Voice, parse_reference
from proxy.web import SETTINGS, TRITON, read_json

log = logging.getLogger("proxy")


async def parse_seed_body(request: web.Request, data: object) -> tuple[GenerateOptions, list[Segment]]:
    """The seed body (proxy/api.py's checks) plus an optional reference clip, decoded into a context segment."""
    fields = {k: data.pop(k) for k in REFERENCE_FIELDS if k in data} if isinstance(data, dict) else {}
    options = parse_generate(data)
    try:
        raw = parse_reference(fields, Limits.from_settings(request.app[SETTINGS]))
        return options, await reference_segments(request, Voice("request", options.speaker_id), raw)
    except InvalidReference as e:
        raise reference_error(e) from None


async def generate(request: web.Request) -> web.Response:
    started = time.perf_counter()
    settings, pool = request.app[SETTINGS], request.app[TRITON]
    options, reference = await parse_seed_body(request, await read_json(request))
    clip = await synthesize(pool, options, settings.watermark_enabled, reference=reference)
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


async def generate_wav(request: web.Request) -> web.StreamResponse:
    settings, pool = request.app[SETTINGS], request.app[TRITON]
    data = await read_json(request)
    if isinstance(data, dict) and "response_format" in data:
        return await stream_generate(request, data)
    options, reference = await parse_seed_body(request, data)
    clip = await synthesize(pool, options, settings.watermark_enabled, reference=reference)
    body = await run_sized(wav_bytes, clip.audio, int(settings.wav_offload_seconds * SAMPLE_RATE))
    return web.Response(
        body=body, content_type="audio/wav", headers={"Content-Disposition": "attachment; filename=speech.wav"}
    )


async def generate_audio(request: web.Request) -> web.StreamResponse:
    return await stream_generate(request, await read_json(request))


async def stream_generate(request: web.Request, data: object) -> web.StreamResponse:
    """The seed body + `response_format` (default wav): the audio file streamed as it is generated."""
    name = data.pop("response_format", "wav") if isinstance(data, dict) else "wav"
    if name not in RESPONSE_FORMATS:
        message = f"must be one of {', '.join(RESPONSE_FORMATS)}, got {shown(name)}"
        raise ValidationError([{"field": "response_format", "message": message}])
    options, reference = await parse_seed_body(request, data)
    fmt = FORMATS[name]
    return await stream_speech(request, options, fmt, reference, headers=content_disposition(fmt))


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
