"""The OpenAPI 3.1 description of the HTTP API (GET /openapi.json), built from the request models themselves: the
bodies are the pydantic models' JSON Schemas (their bounds come from the same place as the checks, proxy/parse/fields.py
`described`), so the description cannot drift from what the parse layer accepts. `WS /stream` is not HTTP and is
described in docs/api.md only.
"""

from __future__ import annotations

from proxy.formats import FORMATS, RESPONSE_FORMATS
from proxy.parse.fields import TEXT_SCHEMA
from proxy.parse.native import GenerateBody
from proxy.parse.openai import SpeechBody

JSON = "application/json"
_NATIVE_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": {"type": ["string", "null"]}, "message": {"type": "string"}},
            },
        },
    },
}
_OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
# What any request may meet besides its own answers (docs/api.md, Errors): the door, the limits, Triton's state.
_COMMON = {
    "400": "Malformed request",
    "401": "API keys are on and the key is missing or unknown",
    "404": "Unknown path",
    "405": "Wrong method",
    "503": "Draining, full, or no Triton replica ready (Retry-After)",
}
_BODY = {
    "408": "The body did not arrive within PROXY_BODY_TIMEOUT_S",
    "413": "Body (or reference clip) too large",
    "415": "Content-Type is not application/json",
    "422": "A field is invalid",
    "403": "A watermark choice the policy forbids",
    "429": "An API key's limit (Retry-After)",
    "502": "Triton failed the request",
    "504": "Triton sent nothing for TRITON_STREAM_IDLE_TIMEOUT_S",
}
_AUDIO_TYPES = sorted({f.content_type for f in FORMATS.values()})


def _errors(kind: str, body: bool) -> dict:
    ref = {"$ref": f"#/components/schemas/{kind}"}
    codes = {**_COMMON, **(_BODY if body else {})}
    return {code: {"description": text, "content": {JSON: {"schema": ref}}} for code, text in sorted(codes.items())}


def _audio(description: str, types: list[str] = _AUDIO_TYPES) -> dict:
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {"description": description, "content": {t: binary for t in types}}


def _speech_answer() -> dict:
    answer = _audio("The audio, or (stream_format sse) server-sent events")
    event = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
    answer["content"]["text/event-stream"] = {"schema": event}
    return answer


def _json(description: str, schema: dict | None = None) -> dict:
    return {"description": description, "content": {JSON: {"schema": schema or {"type": "object"}}}}


def _post(summary: str, body_ref: str, answer: dict, kind: str = "Error", parameters: list | None = None) -> dict:
    operation = {
        "summary": summary,
        "requestBody": {"required": True, "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{body_ref}"}}}},
        "responses": {"200": answer, **_errors(kind, body=True)},
    }
    if parameters:
        operation["parameters"] = parameters
    return {"post": operation}


def _get(summary: str, answer: dict, kind: str = "Error", extra: dict | None = None) -> dict:
    return {"get": {"summary": summary, "responses": {"200": answer, **(extra or {}), **_errors(kind, body=False)}}}


def _schema(model, **extra_properties) -> dict:
    schema = model.model_json_schema()
    schema["properties"].update(extra_properties)
    return schema


def _query(name: str, schema: dict) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def openapi_document(version: str) -> dict:
    generate = _schema(GenerateBody)
    for name in ("reference_audio", "reference_text"):
        generate["properties"][name] = {"type": ["string", "null"]}
    with_format = _schema(GenerateBody, response_format={"type": "string", "enum": list(RESPONSE_FORMATS)})
    with_format["properties"].update({k: generate["properties"][k] for k in ("reference_audio", "reference_text")})
    speech = _schema(SpeechBody)
    for name in ("reference_audio", "reference_text"):
        speech["properties"][name] = {"type": ["string", "null"]}
    options = generate["properties"]
    chunk_query = [_query(name, options[name]) for name in ("speaker_id", "max_audio_length_ms", "temperature", "topk")]
    chunk_query.append(_query("watermark", {"type": "boolean"}))
    clip = {
        "type": "object",
        "required": ["audio_base64", "sample_rate"],
        "properties": {
            "audio_base64": {"type": "string"},
            "sample_rate": {"type": "integer"},
            "duration_ms": {"type": "number"},
            "processing_time_ms": {"type": "number"},
            "watermarked": {"type": ["boolean", "null"]},
        },
    }
    status = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
    unhealthy = {
        "503": _json("Not every model is ready (or, with keys on and no operator key: only the status)", status)
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "CSM-1B streaming text-to-speech",
            "version": version,
            "description": "The native API and OpenAI's speech API (docs/api.md). The WebSockets (WS /stream, "
            "ElevenLabs' stream-input) are described there and in docs/elevenlabs.md.",
        },
        "components": {
            "schemas": {
                "GenerateRequest": generate,
                "GenerateAudioRequest": with_format,
                "SpeechRequest": speech,
                "TextList": {"type": "array", "minItems": 1, "items": TEXT_SCHEMA},
                "Error": _NATIVE_ERROR,
                "OpenAIError": _OPENAI_ERROR,
            }
        },
        "paths": {
            "/": _get("What this service is", _json("Name, version, endpoints")),
            "/health": _get("Proxy, Triton and model health", _json("Everything is ready", status), extra=unhealthy),
            "/livez": _get("Liveness", _json("The proxy answers", status)),
            "/readyz": _get("Readiness", _json("Ready", status)),
            "/metrics": _get(
                "Prometheus metrics",
                {"description": "The text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
                extra={"403": _json("With keys on: a key without the operator permission", _NATIVE_ERROR)},
            ),
            "/openapi.json": _get("This description", _json("OpenAPI 3.1")),
            "/generate": _post("One clip as base64 WAV in JSON", "GenerateRequest", _json("The clip", clip)),
            "/generate/wav": _post(
                "One clip as a WAV (or response_format) file", "GenerateAudioRequest", _audio("The file")
            ),
            "/generate/audio": _post("One clip in any format, streamed", "GenerateAudioRequest", _audio("The file")),
            "/stream/chunks": _post(
                "A list of texts, answered as NDJSON lines",
                "TextList",
                {
                    "description": "One line per text",
                    "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
                },
                parameters=chunk_query,
            ),
            "/v1/audio/speech": _post(
                "OpenAI's speech API",
                "SpeechRequest",
                _speech_answer(),
                "OpenAIError",
            ),
            "/v1/models": _get("OpenAI's model list", _json("The models"), "OpenAIError"),
            "/v1/audio/voices": _get("The voices", _json("OpenAI names, presets, speaker ids"), "OpenAIError"),
        },
    }
