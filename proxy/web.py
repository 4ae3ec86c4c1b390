"""aiohttp glue shared by the endpoints: the application's keys, reading a JSON body within the size limit."""

from __future__ import annotations

import json
import weakref

from aiohttp import web

from proxy.api import ApiError
from proxy.settings import Settings
from proxy.triton_client import TritonPool
from proxy.voices import VoiceBook

SETTINGS = web.AppKey("settings", Settings)
TRITON = web.AppKey("triton", TritonPool)
WEBSOCKETS = web.AppKey("websockets", weakref.WeakSet)
STARTED = web.AppKey("started", float)
# Production concerns (proxy/metrics.py, proxy/admission.py, proxy/drain.py, proxy/discovery.py).
METRICS = web.AppKey("metrics", object)
STREAM_HOOKS = web.AppKey("stream_hooks", object)
API_KEYS = web.AppKey("api_keys", object)
DRAIN = web.AppKey("drain", object)
RESOLVER = web.AppKey("resolver", object)
REQUEST_ID = web.RequestKey("request_id", str)
VOICES = web.AppKey("voices", VoiceBook)


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
