"""GET /openapi.json describes the HTTP API as it is: every HTTP route and only those, valid JSON Schemas, and bodies
the description accepts are exactly the bodies the parse layer accepts (bounds included)."""

from __future__ import annotations

import itertools

import jsonschema
import pytest

from csm_tts import limits
from csm_tts.tooling.local_triton import free_port
from proxy.app import create_app
from proxy.errors import ApiError
from proxy.parse.native import parse_generate_body
from proxy.parse.openai import parse_speech
from proxy.parse.openapi import openapi_document
from proxy.parse.reference import ReferenceLimits
from proxy.settings import Settings
from proxy.voices import VoiceBook

DOC = openapi_document("test")
SCHEMAS = DOC["components"]["schemas"]


@pytest.fixture
async def client(aiohttp_client):
    return await aiohttp_client(create_app(Settings(triton_grpc_urls=(f"127.0.0.1:{free_port()}",))))


async def test_the_description_is_served_and_names_every_http_route(client):
    response = await client.get("/openapi.json")
    served = await response.json()
    assert response.status == 200 and served["openapi"] == "3.1.0" and set(served["paths"]) == set(DOC["paths"])
    routes = set()
    for route in client.app.router.routes():
        path = route.resource.canonical
        websocket = path == "/stream" or path.endswith("stream-input")  # WS /stream and ElevenLabs' sockets
        if route.method != "HEAD" and not websocket and not path.startswith("/demo"):  # and the demo page
            routes.add((path, route.method.lower()))
    described = {(path, method) for path, item in DOC["paths"].items() for method in item}
    assert described == routes


def test_every_schema_is_valid_json_schema_and_every_reference_resolves():
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    text = repr(DOC)
    for name in SCHEMAS:
        text = text.replace(f"#/components/schemas/{name}", "")
    assert "#/components/schemas/" not in text


def accepted_by_description(schema_name: str, body: object) -> bool:
    return jsonschema.Draft202012Validator(SCHEMAS[schema_name]).is_valid(body)


def accepted_by_parser(body: dict, parse) -> bool:
    try:
        parse(body)
    except ApiError:
        return False
    return True


EDGES = {
    "speaker_id": [0, limits.MAX_SPEAKER_ID, -1, limits.MAX_SPEAKER_ID + 1, "1", 1.5],
    "max_audio_length_ms": [
        None,
        limits.API_MIN_AUDIO_LENGTH_MS,
        limits.MAX_AUDIO_LENGTH_MS,
        limits.API_MIN_AUDIO_LENGTH_MS - 1,
        limits.MAX_AUDIO_LENGTH_MS + 1,
    ],
    "temperature": [limits.API_TEMPERATURE[0], limits.API_TEMPERATURE[1], 0.0, 2.5, "hot"],
    "topk": [1, 100, 0, 101],
    "watermark": [True, False, None, "yes"],
    "watermark_key": [[1, 2, 3, 4, 5], [1, 2, 3, 4], [1, 2, 3, 4, 256], None],
    "seed": [0, limits.MAX_SEED, -1, limits.MAX_SEED + 1, None],
    "text": ["Hi.", "x" * limits.MAX_TEXT_CHARS, "x" * (limits.MAX_TEXT_CHARS + 1), " ", "", 5],
}


@pytest.mark.parametrize("field, value", [(f, v) for f, values in EDGES.items() for v in values])
def test_the_native_body_description_accepts_exactly_what_the_parser_accepts(field, value):
    body = {"text": "Hi.", field: value}
    parse = lambda b: parse_generate_body(b, ReferenceLimits())  # noqa: E731
    assert accepted_by_description("GenerateRequest", body) == accepted_by_parser(body, parse), body


SPEECH_EDGES = {
    "input": ["Hi.", "", "x" * (limits.MAX_TEXT_CHARS + 1)],
    "voice": ["alloy", {"id": "alloy"}],
    "response_format": ["mp3", "pcm", "wav", "midi"],
    "stream_format": ["audio", "sse", "ws"],
    "speed": [1.0, 2.0],
    "instructions": [None, "calm", "x" * 5000],
    "model": ["csm-1b"],
}


@pytest.mark.parametrize(
    "field, value", [(f, v) for f, values in itertools.chain(SPEECH_EDGES.items()) for v in values]
)
def test_the_openai_body_description_accepts_exactly_what_the_parser_accepts(field, value):
    body = {"model": "csm-1b", "input": "Hi.", "voice": "alloy", field: value}
    voices = VoiceBook.from_settings(Settings())
    parse = lambda b: parse_speech(b, voices, ReferenceLimits())  # noqa: E731
    assert accepted_by_description("SpeechRequest", body) == accepted_by_parser(body, parse), body


def test_unknown_fields_are_refused_by_both():
    body = {"text": "Hi.", "txt": "typo"}
    assert not accepted_by_description("GenerateRequest", body)
    assert not accepted_by_parser(body, lambda b: parse_generate_body(b, ReferenceLimits()))
