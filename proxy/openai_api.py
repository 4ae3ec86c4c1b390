"""OpenAI's speech API shapes (plain Python): the body of POST /v1/audio/speech, its errors, its SSE events.

Request fields as OpenAI defines them (`model`, `input`, `voice`, `response_format`, `speed`, `instructions`,
`stream_format`), plus this service's generation options and voice cloning (`reference_audio`, `reference_text`) as
extra body fields (openai clients send them with `extra_body`). Validation reuses proxy/api.py's checks; errors
leave as OpenAI's error object so its clients raise their usual exceptions (BadRequestError, NotFoundError, ...).

- `speed`: CSM-1B has no speed control and the proxy does no time-stretching: only 1.0 is accepted, anything else
  is a 400 that says so.
- `instructions`: CSM-1B cannot follow style instructions. The field is accepted (a string, as OpenAI's clients
  send it for gpt-4o-mini-tts) and ignored, always.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from csm_tts import SAMPLES_PER_FRAME
from csm_tts.parsing import shown
from proxy.api import ApiError, GenerateOptions, check_options, check_text
from proxy.encoders import FORMATS, RESPONSE_FORMATS, AudioFormat
from proxy.triton_client import UpstreamError
from proxy.voices import REFERENCE_FIELDS, InvalidReference, UnknownVoice, Voice, VoiceBook, parse_reference

SERVED_MODEL = "csm-1b"
# OpenAI's speech model names are accepted as aliases of the served model, so clients configured for OpenAI work.
MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-12-15")
MODELS = (SERVED_MODEL, *MODEL_ALIASES)
MODEL_CREATED = 1741824000  # 2025-03-13, CSM-1B's release (OpenAI's model objects carry a creation time)
STREAM_FORMATS = ("audio", "sse")
MAX_INSTRUCTIONS_CHARS = 4096
SPEECH_FIELDS = ("model", "input", "voice", "response_format", "speed", "instructions", "stream_format")
EXTRA_OPTIONS = ("seed", "temperature", "topk", "max_audio_length_ms", "watermark", "watermark_key")


class OpenAIError(ApiError):
    """An error with OpenAI's `param` and `code`; on /v1 every error is shaped by `openai_error_body`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(status, message, headers=headers)
        self.param = param
        self.code = code


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def openai_status(status: int) -> int:
    """OpenAI answers invalid content with 400; this service's own endpoints use 422 for it."""
    return 400 if status == 422 else status


def openai_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


@dataclass(frozen=True)
class SpeechRequest:
    options: GenerateOptions
    voice: Voice
    format: AudioFormat
    sse: bool
    reference: tuple[bytes, str] | None  # a per-request reference clip (undecoded) and its transcript


def _invalid(param: str | None, message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}" if param else message, param, code)


def parse_speech(data: object, voices: VoiceBook, reference_limits) -> SpeechRequest:
    if not isinstance(data, dict):
        raise _invalid(None, f"The request body must be a JSON object, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in (*SPEECH_FIELDS, *EXTRA_OPTIONS, *REFERENCE_FIELDS))
    if unknown:
        raise OpenAIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0])
    for name in ("model", "input", "voice"):
        if name not in data:
            raise OpenAIError(400, f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
    model = data["model"]
    if not isinstance(model, str):
        raise _invalid("model", f"must be a string, got {shown(model)}")
    if model not in MODELS:
        raise OpenAIError(
            404, f"The model '{model[:100]}' does not exist; available: {', '.join(MODELS)}", "model", "model_not_found"
        )
    try:
        text = check_text(data["input"])
    except ValueError as e:
        raise _invalid("input", str(e)) from None
    voice_name = data["voice"]
    if isinstance(voice_name, dict) and set(voice_name) == {"id"}:  # OpenAI's custom voice object {"id": ...}
        voice_name = voice_name["id"]
    try:
        voice = voices.resolve(voice_name)
    except UnknownVoice as e:
        raise OpenAIError(400, str(e), "voice", "unknown_voice") from None
    fmt = data.get("response_format", "mp3")
    if fmt not in RESPONSE_FORMATS:
        raise _invalid("response_format", f"must be one of {', '.join(RESPONSE_FORMATS)}, got {shown(fmt)}")
    stream_format = data.get("stream_format", "audio")
    if stream_format not in STREAM_FORMATS:
        raise _invalid("stream_format", f"must be one of {', '.join(STREAM_FORMATS)}, got {shown(stream_format)}")
    check_speed(data.get("speed", 1.0))
    instructions = data.get("instructions")
    if instructions is not None and (not isinstance(instructions, str) or len(instructions) > MAX_INSTRUCTIONS_CHARS):
        raise _invalid("instructions", f"must be a string of at most {MAX_INSTRUCTIONS_CHARS} characters")
    values, errors = check_options(data, EXTRA_OPTIONS)
    if errors:
        raise _invalid(errors[0]["field"], errors[0]["message"])
    try:
        reference = parse_reference(data, reference_limits)
    except InvalidReference as e:
        raise OpenAIError(openai_status(e.status), e.message, e.field, "invalid_reference_audio") from None
    options = GenerateOptions(text=text, speaker_id=voice.speaker_id, **values)
    return SpeechRequest(options, voice, FORMATS[fmt], stream_format == "sse", reference)


def check_speed(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.25 <= value <= 4.0:
        raise _invalid("speed", f"must be a number from 0.25 to 4.0, got {shown(value)}")
    if value != 1.0:
        raise _invalid(
            "speed",
            f"only 1.0 is supported (CSM-1B has no speed control and the proxy does no time-stretching), got {value}",
            "unsupported_value",
        )


# -- SSE (stream_format "sse") -------------------------------------------------------------------------------------
def sse_event(body: dict) -> bytes:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


def usage(text: str, samples: int, tokens_per_byte: float) -> dict:
    """`speech.audio.done`'s usage. The proxy does not tokenize: input_tokens is the context budget's estimate of
    the text's tokens, output_tokens the 80 ms audio frames generated (one backbone step each)."""
    input_tokens = math.ceil(len(text.encode("utf-8")) * tokens_per_byte)
    output_tokens = math.ceil(samples / SAMPLES_PER_FRAME)
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": input_tokens + output_tokens}


def model_list() -> dict:
    """GET /v1/models: the served model first, then the OpenAI names it answers to."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": MODEL_CREATED, "owned_by": "sesame", "root": SERVED_MODEL}
            for name in MODELS
        ],
    }


def error_from(exc: Exception) -> tuple[int, dict, Mapping]:
    """Any error an endpoint raises -> (status, OpenAI body, headers) for /v1 routes."""
    if isinstance(exc, OpenAIError):
        status = openai_status(exc.status)
        return status, openai_error_body(status, exc.message, exc.param, exc.code), exc.headers
    if isinstance(exc, ApiError):
        status = openai_status(exc.status)
        param = exc.errors[0].get("field") if exc.errors else None
        code = "invalid_value" if exc.errors else {413: "request_too_large"}.get(status)
        return status, openai_error_body(status, exc.message, param, code), exc.headers
    if isinstance(exc, UpstreamError):
        status = openai_status(exc.status)
        headers = {"Retry-After": "1"} if status == 503 else {}
        code = {400: "invalid_request", 503: "service_unavailable"}.get(status, "upstream_error")
        return status, openai_error_body(status, exc.message, None, code), headers
    raise TypeError(type(exc))
