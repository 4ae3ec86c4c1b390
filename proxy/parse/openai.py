"""OpenAI's speech API shapes (plain Python): the body of POST /v1/audio/speech, its errors, its model list.

Request fields as OpenAI defines them (`model`, `input`, `voice`, `response_format`, `speed`, `instructions`,
`stream_format`), plus this service's generation options and voice cloning (`reference_audio`, `reference_text`) as
extra body fields (openai clients send them with `extra_body`). One pydantic model (`SpeechBody`) with the checks
of proxy/parse/fields.py; errors leave as OpenAI's error object (proxy/errors.py), so its clients raise their
usual exceptions (BadRequestError, NotFoundError, ...).

- `speed`: CSM-1B has no speed control and the proxy does no time-stretching: only 1.0 is accepted, anything else
  is a 400 that says so.
- `instructions`: CSM-1B cannot follow style instructions. The field is accepted (a string, as OpenAI's clients
  send it for gpt-4o-mini-tts) and ignored, always.
"""

from __future__ import annotations

from typing import Annotated

import pydantic
from pydantic import ValidationInfo

from csm_tts.parsing import shown
from proxy.errors import OpenAIError, openai_status
from proxy.formats import FORMATS, RESPONSE_FORMATS
from proxy.parse.fields import (
    TEXT_SCHEMA,
    Refusal,
    SamplingOptions,
    check_text,
    checked,
    described,
    first_problem,
    given,
)
from proxy.parse.job import GenerateOptions, SpeechJob
from proxy.parse.reference import REFERENCE_FIELDS, ReferenceLimits, parse_reference
from proxy.voices import InvalidReference, UnknownVoice, Voice, VoiceBook

SERVED_MODEL = "csm-1b"
# OpenAI's speech model names are accepted as aliases of the served model, so clients configured for OpenAI work.
MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-12-15")
MODELS = (SERVED_MODEL, *MODEL_ALIASES)
MODEL_CREATED = 1741824000  # 2025-03-13, CSM-1B's release (OpenAI's model objects carry a creation time)
STREAM_FORMATS = ("audio", "sse")
MAX_INSTRUCTIONS_CHARS = 4096
SPEECH_FIELDS = ("model", "input", "voice", "response_format", "speed", "instructions", "stream_format")
EXTRA_OPTIONS = ("seed", "temperature", "topk", "max_audio_length_ms", "watermark", "watermark_key", "normalize")
# The order in which a body's problems are reported (the first one is the answer).
ORDER = (*SPEECH_FIELDS[:3], "response_format", "stream_format", "speed", "instructions", *EXTRA_OPTIONS)


def _model(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {shown(value)}")
    if value not in MODELS:
        raise Refusal(
            f"The model '{value[:100]}' does not exist; available: {', '.join(MODELS)}", 404, "model_not_found"
        )
    return value


def _voice(value: object, info: ValidationInfo) -> Voice:
    if isinstance(value, dict) and set(value) == {"id"}:  # OpenAI's custom voice object {"id": ...}
        value = value["id"]
    try:
        return info.context["voices"].resolve(value)
    except UnknownVoice as e:
        raise Refusal(str(e), 400, "unknown_voice") from None


# A name from GET /v1/audio/voices, a speaker id as a string, or OpenAI's custom voice object.
VOICE_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"], "additionalProperties": False},
    ]
}


def _enum(choices: tuple[str, ...]) -> dict:
    return {"type": "string", "enum": list(choices)}


def _one_of(choices: tuple[str, ...]):
    def check(value: object) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {shown(value)}")
        return value

    return check


def _speed(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.25 <= value <= 4.0:
        raise ValueError(f"must be a number from 0.25 to 4.0, got {shown(value)}")
    if value != 1.0:
        raise Refusal(
            f"only 1.0 is supported (CSM-1B has no speed control and the proxy does no time-stretching), got {value}",
            400,
            "unsupported_value",
        )
    return float(value)


def _instructions(value: object) -> str | None:
    if value is not None and (not isinstance(value, str) or len(value) > MAX_INSTRUCTIONS_CHARS):
        raise ValueError(f"must be a string of at most {MAX_INSTRUCTIONS_CHARS} characters")
    return value


class SpeechBody(SamplingOptions):
    """The body of POST /v1/audio/speech: OpenAI's fields, this service's sampling options, a voice to clone."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True, frozen=True, arbitrary_types_allowed=True)

    model: Annotated[str, checked(_model), described({"type": "string", "enum": list(MODELS)})]
    input: Annotated[str, checked(check_text), described(TEXT_SCHEMA)]
    voice: Annotated[Voice, pydantic.BeforeValidator(_voice), described(VOICE_SCHEMA)]
    response_format: Annotated[str, checked(_one_of(RESPONSE_FORMATS)), described(_enum(RESPONSE_FORMATS))] = "mp3"
    stream_format: Annotated[str, checked(_one_of(STREAM_FORMATS)), described(_enum(STREAM_FORMATS))] = "audio"
    speed: Annotated[float, checked(_speed), described({"type": "number", "const": 1.0})] = 1.0
    instructions: Annotated[  # accepted, and ignored: CSM takes none
        str | None,
        checked(_instructions),
        described({"anyOf": [{"type": "string", "maxLength": MAX_INSTRUCTIONS_CHARS}, {"type": "null"}]}),
    ] = None
    reference_audio: object = None  # checked by parse_reference, after the fields
    reference_text: object = None


def _invalid(param: str | None, message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}" if param else message, param, code)


def parse_speech(data: object, voices: VoiceBook, references: ReferenceLimits) -> SpeechJob:
    if not isinstance(data, dict):
        raise _invalid(None, f"The request body must be a JSON object, got {type(data).__name__}")
    try:
        body = SpeechBody.model_validate(data, context={"voices": voices})
    except pydantic.ValidationError as e:
        raise _openai_error(e) from None
    try:
        reference = parse_reference({k: data[k] for k in REFERENCE_FIELDS if k in data}, references)
    except InvalidReference as e:
        raise OpenAIError(openai_status(e.status), e.message, e.field, "invalid_reference_audio") from None
    options = GenerateOptions(text=body.input, speaker_id=body.voice.speaker_id, **given(body, EXTRA_OPTIONS))
    return SpeechJob(options, FORMATS[body.response_format], body.stream_format == "sse", body.voice, reference)


def _openai_error(e: pydantic.ValidationError) -> OpenAIError:
    kind, name, message, error = first_problem(e, ORDER)
    if kind == "unknown":
        return OpenAIError(400, f"Unrecognized request argument supplied: {name}", name.split(", ")[0])
    if kind == "missing":
        return OpenAIError(400, f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
    if isinstance(error, Refusal):
        return OpenAIError(error.status, error.message, name, error.code)
    return _invalid(name, message)


def model_list() -> dict:
    """GET /v1/models: the served model first, then the OpenAI names it answers to."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": MODEL_CREATED, "owned_by": "sesame", "root": SERVED_MODEL}
            for name in MODELS
        ],
    }
