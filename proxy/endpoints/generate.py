"""POST /generate (JSON with base64 WAV), POST /generate/wav (a WAV file), POST /generate/audio (any response_format,
streamed as generated) and POST /stream/chunks (NDJSON, one line per text as soon as it is ready).

Every handler reads top to bottom: parse -> admit -> prepare (voice clip, context) -> generate -> render.
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
from proxy.appkeys import OFFLOAD, SETTINGS, TRITON
from proxy.conversation import ContextBudget, Conversation
from proxy.errors import ApiError
from proxy.generation import synthesize
from proxy.parse.job import GenerateOptions, SpeechJob
from proxy.parse.native import (
    NO_TEXT,
    parse_chunk_options,
    parse_generate_body,
    parse_query,
    parse_text_list,
    reference_error,
    with_text,
)
from proxy.parse.reference import ReferenceLimits
from proxy.parse.websocket import StreamConfig, parse_stream_config
from proxy.render import http
from proxy.render.frames import wav_message
from proxy.requests import admit, check_admission, read_json
from proxy.spoken import SpeechPlan, SpokenGeneration, conversation_for, plan_speech
from proxy.upstream.errors import UpstreamError
from proxy.voice_context import voice_segments
from proxy.voices import InvalidReference

log = logging.getLogger("proxy")


async def generate(request: web.Request) -> web.Response:
    started = time.perf_counter()
    job = parse_generate_body(await read_json(request), ReferenceLimits.from_settings(request.app[SETTINGS]))
    plan = plan_speech(job.options)
    with admit(request, job.options) as lease:
        clip = await synthesize_job(request, job, plan, lease)
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    return await http.clip_json(clip, request.app[OFFLOAD], elapsed_ms, plan.headers())


async def generate_wav(request: web.Request) -> web.StreamResponse:
    data = await read_json(request)
    if isinstance(data, dict) and "response_format" in data:
        return await stream_generate(request, data)
    job = parse_generate_body(data, ReferenceLimits.from_settings(request.app[SETTINGS]))
    plan = plan_speech(job.options)
    with admit(request, job.options) as lease:
        clip = await synthesize_job(request, job, plan, lease)
    return await http.wav_file(clip, request.app[OFFLOAD], plan.headers())


async def generate_audio(request: web.Request) -> web.StreamResponse:
    return await stream_generate(request, await read_json(request))


async def stream_generate(request: web.Request, data: object) -> web.StreamResponse:
    """The seed body + `response_format` (default wav): the audio file streamed as it is generated."""
    app = request.app
    settings = app[SETTINGS]
    job = parse_generate_body(data, ReferenceLimits.from_settings(settings), response_format=True)
    plan = plan_speech(job.options)
    with admit(request, job.options) as lease:
        reference = await job_voice(request, job)
        conversation = conversation_for(settings)
        async with SpokenGeneration(app[TRITON], plan, lease, settings.watermark_enabled, conversation, reference) as g:
            headers = {**http.content_disposition(job.format), **plan.headers()}
            return await http.stream_audio(request, g, job.format, app[OFFLOAD], headers=headers)


async def job_voice(request: web.Request, job: SpeechJob) -> list:
    settings = request.app[SETTINGS]
    try:
        return await voice_segments(job, request.app[OFFLOAD], settings.reference_max_seconds)
    except InvalidReference as e:
        raise reference_error(e) from None


async def synthesize_job(request: web.Request, job: SpeechJob, plan: SpeechPlan, lease):
    reference = await job_voice(request, job)
    settings = request.app[SETTINGS]
    conversation = conversation_for(settings)
    return await synthesize(
        SpokenGeneration(request.app[TRITON], plan, lease, settings.watermark_enabled, conversation, reference)
    )


async def stream_chunks(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings, pool = app[SETTINGS], app[TRITON]
    query = dict(request.query)
    context_enabled = settings.context_enabled
    if "context" in query:
        context_enabled = parse_stream_config(
            parse_query({"context": query.pop("context")}, ("context",)), StreamConfig()
        ).context
    options = parse_chunk_options(query)
    texts = parse_text_list(await read_json(request), settings.max_text_chunks)
    # Refusals before the 200: what every line would get (policy, key limits, drain, full), and no replica.
    check_admission(request, [GenerateOptions(text="", **options)])
    await pool.pick()
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
    await response.prepare(request)
    conversation = Conversation(ContextBudget.from_settings(settings)) if context_enabled else None
    try:
        for text in texts:
            line = await chunk_line(request, options, text, conversation)
            await response.write(line.encode() + b"\n")
        await response.write_eof()
    except ConnectionError:
        log.info("client left POST /stream/chunks early")
    return response


async def chunk_line(request: web.Request, options: dict, text: str, conversation: Conversation | None) -> str:
    """One text's line. Whatever fails becomes that line's error: the 200 and the first lines are sent already, so an
    exception escaping here would break the response in the middle of its body."""
    if not text.strip():
        return json.dumps({"error": NO_TEXT, "text": text})
    app = request.app
    try:
        job = with_text(options, text)
        plan = plan_speech(job)
        with admit(request, job) as lease:
            watermark = app[SETTINGS].watermark_enabled
            clip = await synthesize(SpokenGeneration(app[TRITON], plan, lease, watermark, conversation))
    except (ApiError, UpstreamError) as e:
        return json.dumps({"error": e.message, "text": text})
    except Exception:
        log.exception("POST /stream/chunks: a text failed")
        return json.dumps({"error": "Internal error while generating this text", "text": text})
    fields = {"text": text, "audio_base64": None, "sample_rate": SAMPLE_RATE}
    return await app[OFFLOAD].run(wav_message, fields, clip.audio)
