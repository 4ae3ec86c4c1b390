"""OpenAI's speech API: POST /v1/audio/speech, GET /v1/models, GET /v1/audio/voices, and OpenAI-shaped errors on
every /v1 path (docs/api.md). Request shapes and validation: proxy/openai_api.py."""

from __future__ import annotations

import logging

from aiohttp import web

from proxy.api import ApiError
from proxy.endpoints.audio_stream import reference_segments, stream_speech
from proxy.openai_api import OpenAIError, error_from, model_list, openai_error_body, openai_status, parse_speech
from proxy.triton_client import UpstreamError
from proxy.voices import InvalidReference, Limits
from proxy.web import SETTINGS, VOICES, read_json

log = logging.getLogger("proxy.openai")
PREFIX = "/v1/"


async def speech(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    parsed = parse_speech(await read_json(request), request.app[VOICES], Limits.from_settings(settings))
    try:
        reference = await reference_segments(request, parsed.voice, parsed.reference)
    except InvalidReference as e:
        raise OpenAIError(openai_status(e.status), e.message, e.field, "invalid_reference_audio") from None
    return await stream_speech(request, parsed.options, parsed.format, reference, sse=parsed.sse)


async def models(request: web.Request) -> web.Response:
    return web.json_response(model_list())


async def voices(request: web.Request) -> web.Response:
    return web.json_response({"voices": request.app[VOICES].listing()})


@web.middleware
async def openai_errors(request: web.Request, handler):
    """On /v1 paths every error leaves as OpenAI's `{"error": {"message", "type", "param", "code"}}`, with OpenAI's
    400 where this service's own endpoints say 422. Other paths pass through untouched."""
    if not request.path.startswith(PREFIX):
        return await handler(request)
    try:
        return await handler(request)
    except (ApiError, UpstreamError) as e:
        status, body, headers = error_from(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        status = e.status
        if status == 404:
            message, code = f"Unknown path {request.path}; see GET /v1/models and POST /v1/audio/speech", "not_found"
        elif status == 405:
            message = (
                f"Method {request.method} is not allowed for {request.path}; allowed: {e.headers.get('Allow', '')}"
            )
            code = "method_not_allowed"
        elif status == 413:
            limit = request.app[SETTINGS].max_body_bytes
            message, code = f"Request body too large; the limit is {limit} bytes", "request_too_large"
        else:
            message, code = e.text or e.reason, None
        body = openai_error_body(status, message, None, code)
        headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
    return web.json_response(body, status=status, headers=headers)
