"""The native API's request shapes: the body of POST /generate, /generate/wav and /generate/audio, the query and
body of POST /stream/chunks, and the query strings typed from their spelling.

Bounds are the documented API's (csm_tts/limits.py): text 1-5000 characters (encodable as UTF-8), speaker_id 0-31,
max_audio_length_ms 1000-90000 (absent: the model's default, which follows the text), temperature 0.1-2.0, topk
1-100, watermark_key exactly 5 integers 0-255, seed 0..2^63-1. Every number is range-checked, so nothing out of range
reaches gRPC (an int64 field). Unknown fields are rejected, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from collections.abc import Mapping

import pydantic

from csm_tts.parsing import parse_bool, shown
from proxy.errors import ApiError, ValidationError
from proxy.formats import FORMATS, RESPONSE_FORMATS
from proxy.parse.fields import OPTION_NAMES, Options, Text, check_text, field_errors, given, unknown_fields
from proxy.parse.job import GenerateOptions, SpeechJob
from proxy.parse.reference import REFERENCE_FIELDS, ReferenceLimits, parse_reference
from proxy.voices import InvalidReference, Voice

NO_TEXT = "No text provided"  # the documented reply to a text chunk without text


class TextMessage(Options):
    """One text and its options: a WebSocket text message, the core of every REST body."""

    text: Text


class GenerateBody(TextMessage):
    """POST /generate and /generate/wav: a text, its options, optionally a voice to clone."""

    reference_audio: object = None  # checked by parse_reference, after the fields
    reference_text: object = None


ORDER = ("text", *OPTION_NAMES)


def parse_generate(data: object, defaults: Mapping | None = None, model=TextMessage) -> GenerateOptions:
    """A text message (or a REST body's text and options) -> GenerateOptions; `defaults` are a session's options."""
    if not isinstance(data, dict):
        raise ApiError(400, f"The request body must be a JSON object, got {type(data).__name__}")
    try:
        message = model.model_validate(data)
    except pydantic.ValidationError as e:
        raise ValidationError(field_errors(e, ORDER)) from None
    return GenerateOptions(text=message.text, **{**(defaults or {}), **given(message)})


def parse_generate_body(data: object, references: ReferenceLimits, response_format: bool = False) -> SpeechJob:
    """The body of /generate, /generate/wav (and, with `response_format`, /generate/audio) -> a SpeechJob whose
    reference clip, if any, is checked and base64-decoded but not yet decoded as audio."""
    if response_format:
        name = data.get("response_format", "wav") if isinstance(data, dict) else "wav"
        if name not in RESPONSE_FORMATS:
            message = f"must be one of {', '.join(RESPONSE_FORMATS)}, got {shown(name)}"
            raise ValidationError([{"field": "response_format", "message": message}])
        data = {k: v for k, v in data.items() if k != "response_format"} if isinstance(data, dict) else data
    else:
        name = "wav"
    options = parse_generate(data, model=GenerateBody)
    try:
        reference = parse_reference({k: data[k] for k in REFERENCE_FIELDS if k in data}, references)
    except InvalidReference as e:
        raise reference_error(e) from None
    voice = Voice("request", options.speaker_id)
    return SpeechJob(options, FORMATS[name], voice=voice, reference=reference)


def reference_error(e: InvalidReference) -> ApiError:
    """The native spelling of a bad reference (413 or 422 with the field); /v1 maps 422 to 400."""
    return ApiError(e.status, f"Invalid request: {e.field}: {e.message}", [{"field": e.field, "message": e.message}])


def with_text(options: Mapping, text: object) -> GenerateOptions:
    """Options validated earlier (a session's or a query's) applied to one text."""
    try:
        clean = check_text(text)
    except ValueError as e:
        raise ValidationError([{"field": "text", "message": str(e)}]) from None
    return GenerateOptions(text=clean, **options)


def check_options(data: Mapping, allowed: tuple[str, ...] = OPTION_NAMES) -> tuple[dict, list[dict]]:
    """The generation options among `allowed` present in `data` (other keys are ignored) -> (values, errors)."""
    present = {name: data[name] for name in allowed if name in data}
    try:
        return given(Options.model_validate(present)), []
    except pydantic.ValidationError as e:
        return {}, field_errors(e, OPTION_NAMES)


# -- query strings: typed from their string spelling, then the same checks ---------------------------------------
def query_value(name: str, raw: str) -> object:
    raw = raw.strip()
    if name in ("watermark", "binary", "context", "normalize", "text_stream", "early_cut"):
        if raw.lower() in ("", "null", "none") and name == "watermark":
            return None
        try:
            return parse_bool(raw, name)
        except ValueError:
            return raw  # the check reports it
    if name in ("watermark_key", "mode", "format"):
        return raw
    try:
        return int(raw)
    except ValueError:
        try:
            return float(raw)
        except ValueError:
            return raw


def parse_query(query: Mapping[str, str], allowed: tuple[str, ...]) -> dict:
    """Query parameters -> typed values for the names in `allowed`; anything else is an error."""
    errors = unknown_fields([k for k in query if k not in allowed], "query parameter(s)")
    if errors:
        raise ValidationError(errors)
    return {name: query_value(name, value) for name, value in query.items()}


def parse_chunk_options(query: Mapping[str, str]) -> dict:
    """POST /stream/chunks query: speaker_id and watermark (documented) plus the other generation options."""
    values, errors = check_options(parse_query(query, OPTION_NAMES))
    if errors:
        raise ValidationError(errors)
    return values


def parse_text_list(data: object, max_items: int) -> list:
    """The body of POST /stream/chunks: a JSON list of strings (each string is checked when its turn comes)."""
    if not isinstance(data, list):
        raise ApiError(400, f"The request body must be a JSON list of strings, got {type(data).__name__}")
    if not data:
        raise ValidationError([{"field": None, "message": "the list of texts is empty"}])
    if len(data) > max_items:
        raise ValidationError([{"field": None, "message": f"{len(data)} texts; the limit is {max_items} per request"}])
    bad = [i for i, item in enumerate(data) if not isinstance(item, str)]
    if bad:
        raise ValidationError([{"field": f"[{i}]", "message": "must be a string"} for i in bad[:10]])
    return data
