"""OpenAI's speech API: POST /v1/audio/speech, GET /v1/models, GET /v1/audio/voices (docs/api.md). Request shapes:
proxy/parse/openai.py; errors on /v1 leave in OpenAI's flavour of the one mapper (proxy/errors.py)."""

from __future__ import annotations

from aiohttp import web

from proxy.appkeys import OFFLOAD, SETTINGS, TRITON, VOICES
from proxy.errors import OpenAIError, openai_status
from proxy.parse.openai import model_list, parse_speech
from proxy.parse.reference import ReferenceLimits
from proxy.render import http
from proxy.requests import admit, read_json
from proxy.spoken import SpokenGeneration, conversation_for, plan_speech
from proxy.voice_context import voice_segments
from proxy.voices import InvalidReference


async def speech(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    # parse
    job = parse_speech(await read_json(request), app[VOICES], ReferenceLimits.from_settings(settings))
    plan = plan_speech(job.options)  # normalised and split into segments; 400 when nothing is speakable
    # admit: 403 / 429 / 503 before any expensive work
    with admit(request, job.options) as lease:
        # prepare: the voice's clip (the client's is decoded now, in the thread pool)
        try:
            reference = await voice_segments(job, app[OFFLOAD], settings.reference_max_seconds)
        except InvalidReference as e:
            raise OpenAIError(openai_status(e.status), e.message, e.field, "invalid_reference_audio") from None
        # generate (entered at the first audio chunk; segment after segment) and render
        conversation = conversation_for(settings)
        watermark = settings.watermark_enabled
        async with SpokenGeneration(app[TRITON], plan, lease, watermark, conversation, reference) as g:
            return await http.stream_audio(
                request, g, job.format, app[OFFLOAD], job.sse, settings.context_tokens_per_byte, plan.headers()
            )


async def models(request: web.Request) -> web.Response:
    return web.json_response(model_list())


async def voices(request: web.Request) -> web.Response:
    return web.json_response({"voices": request.app[VOICES].listing()})
