"""The documented request shapes and their validation (plain Python: no aiohttp, no gRPC).

Bounds are the documented API's: text 1-5000 characters (encodable as UTF-8), speaker_id 0-31 (what the model
accepts), max_audio_length_ms 1000-90000 (absent: the model's default, which follows the text), temperature 0.1-2.0,
topk 1-100, watermark_key exactly 5 integers 0-255, seed 0..2^63-1. `seed` is an optional extension (same seed, same
audio). Every number is range-checked here, so nothing out of range reaches gRPC (an int64 field). Unknown fields are
rejected, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from csm_tts.parsing import parse_bool, shown
from csm_tts.watermark.options import KEY_FORMAT, InvalidWatermarkOption, parse_key
from proxy.encoders import RESPONSE_FORMATS

MAX_TEXT_CHARS = 5000
OPTION_NAMES = ("speaker_id", "max_audio_length_ms", "temperature", "topk", "watermark", "watermark_key", "seed")
DEFAULTS = {"speaker_id": 0, "temperature": 0.9, "topk": 50}
MAX_SPEAKER_ID = 31
MAX_SEED = 2**63 - 1
SAMPLE_FORMATS = ("s16le", "f32le")
# Stream mode may also send each text chunk as one encoded file, in pieces as generated (proxy/encoders.py).
ENCODED_FORMATS = tuple(name for name in RESPONSE_FORMATS if name != "pcm")
MODES = ("message", "stream")
NO_TEXT = "No text provided"  # the documented reply to a text chunk without text


class ApiError(Exception):
    """An error the client caused or must know about; `status` is the HTTP status, `message` the JSON `error`."""

    def __init__(self, status: int, message: str, errors: list[dict] | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors or []
        self.headers = headers or {}

    def body(self) -> dict:
        body: dict = {"error": self.message}
        if self.errors:
            body["errors"] = self.errors
        return body


class ValidationError(ApiError):
    """Well-formed JSON with invalid content (422); one entry per bad field."""

    def __init__(self, errors: list[dict]):
        message = "; ".join(f"{e['field']}: {e['message']}" if e.get("field") else e["message"] for e in errors)
        super().__init__(422, f"Invalid request: {message}", errors)


@dataclass(frozen=True)
class GenerateOptions:
    text: str
    speaker_id: int = DEFAULTS["speaker_id"]
    max_audio_length_ms: int | None = None  # None: the model's default, which follows the text
    temperature: float = DEFAULTS["temperature"]
    topk: int = DEFAULTS["topk"]
    watermark: bool | None = None  # None: the server default
    watermark_key: tuple[int, ...] | None = None  # None: the server key
    seed: int | None = None

    def triton_parameters(self, watermark_default: bool | None = None) -> dict:
        """The gRPC request parameters for the `tts` model. `watermark_default` is sent when the request has none
        and the proxy was configured with one (CSM_WATERMARK_ENABLED); otherwise Triton's default applies."""
        params: dict = {"speaker_id": self.speaker_id, "temperature": float(self.temperature), "topk": self.topk}
        if self.max_audio_length_ms is not None:
            params["max_audio_length_ms"] = self.max_audio_length_ms
        if self.seed is not None:
            params["seed"] = self.seed
        watermark = self.watermark if self.watermark is not None else watermark_default
        if watermark is not None:
            params["watermark"] = bool(watermark)
        if self.watermark_key is not None:
            params["watermark_key"] = ",".join(str(v) for v in self.watermark_key)
        return params


# -- field validators: each returns the clean value or raises ValueError with a user-facing message ---------------
def _int(value: object, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be an integer, got {shown(value)}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"must be an integer, got {value!r}")
        value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(_range_message(low, high, shown(value)))
    return value


def _float(value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, got {shown(value)}")
    if isinstance(value, int) and not low <= value <= high:  # float() of a huge JSON integer would overflow
        raise ValueError(_range_message(low, high, shown(value)))
    value = float(value)
    if not low <= value <= high:  # also rejects NaN
        raise ValueError(_range_message(low, high, value))
    return value


def _range_message(low, high, value) -> str:
    value = value if isinstance(value, str) else repr(value)
    if high is None:
        return f"must be >= {low}, got {value}"
    if low is None:
        return f"must be <= {high}, got {value}"
    return f"must be between {low} and {high}, got {value}"


def check_text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {shown(value)}")
    if not value.strip():
        raise ValueError("must not be empty")
    if len(value) > MAX_TEXT_CHARS:
        raise ValueError(f"has {len(value)} characters; the limit is {MAX_TEXT_CHARS}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800" is valid JSON but not text
        raise ValueError(f"cannot be encoded as UTF-8 (character {e.start} is a lone surrogate)") from None
    return value


def _watermark(value: object) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise ValueError(f"must be true, false or null, got {shown(value)}")


def _watermark_key(value: object) -> tuple[int, ...] | None:
    """A list of 5 integers, or "a,b,c,d,e" as CSM_WATERMARK_KEY spells it; the error never echoes the key."""
    if value is None:
        return None
    try:
        return parse_key(value)
    except InvalidWatermarkOption:
        raise ValueError(f"must be {KEY_FORMAT}") from None


def _seed(value: object) -> int | None:
    return None if value is None else _int(value, 0, MAX_SEED)


CHECKS = {
    "speaker_id": lambda v: _int(v, 0, MAX_SPEAKER_ID),
    "max_audio_length_ms": lambda v: _int(v, 1000, 90_000),
    "temperature": lambda v: _float(v, 0.1, 2.0),
    "topk": lambda v: _int(v, 1, 100),
    "watermark": _watermark,
    "watermark_key": _watermark_key,
    "seed": _seed,
}


def check_options(data: Mapping, allowed: tuple[str, ...] = OPTION_NAMES) -> tuple[dict, list[dict]]:
    """Validate the generation options present in `data` (other keys are ignored here). Returns (values, errors)."""
    values, errors = {}, []
    for name in allowed:
        if name not in data:
            continue
        try:
            values[name] = CHECKS[name](data[name])
        except ValueError as e:
            errors.append({"field": name, "message": str(e)})
    return values, errors


def unknown_fields(data: Mapping, known) -> list[dict]:
    unknown = sorted(str(k) for k in data if k not in known)
    if not unknown:
        return []
    return [{"field": None, "message": f"unknown field(s): {', '.join(unknown)}"}]


def parse_generate(data: object, defaults: Mapping | None = None) -> GenerateOptions:
    """The body of POST /generate and /generate/wav (and one WebSocket text message)."""
    if not isinstance(data, dict):
        raise ApiError(400, f"The request body must be a JSON object, got {type(data).__name__}")
    errors = unknown_fields(data, ("text", *OPTION_NAMES))
    if "text" not in data:
        errors.append({"field": "text", "message": "is required"})
        text = None
    else:
        try:
            text = check_text(data["text"])
        except ValueError as e:
            errors.append({"field": "text", "message": str(e)})
            text = None
    values, option_errors = check_options(data)
    errors += option_errors
    if errors:
        raise ValidationError(errors)
    return GenerateOptions(text=text, **{**(defaults or {}), **values})


def with_text(options: Mapping, text: object) -> GenerateOptions:
    """Options validated earlier (a session's or a query's) applied to one text."""
    try:
        clean = check_text(text)
    except ValueError as e:
        raise ValidationError([{"field": "text", "message": str(e)}]) from None
    return GenerateOptions(text=clean, **options)


# -- query strings: typed from their string spelling, then the same checks ---------------------------------------
def _query_value(name: str, raw: str) -> object:
    raw = raw.strip()
    if name in ("watermark", "binary", "context"):
        if raw.lower() in ("", "null", "none") and name == "watermark":
            return None
        try:
            return parse_bool(raw, name)
        except ValueError:
            return raw  # the check reports it
    if name == "watermark_key":
        return raw
    if name in ("mode", "format"):
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
    errors = unknown_fields(query, allowed)
    if errors:
        errors[0]["message"] = errors[0]["message"].replace("field(s)", "query parameter(s)")
        raise ValidationError(errors)
    return {name: _query_value(name, value) for name, value in query.items()}


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


# -- WebSocket session configuration -----------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamConfig:
    """How a WebSocket session answers. `message` (default): one JSON message per text chunk, exactly the documented
    shape. `stream`: audio as it is generated, several messages per text chunk (docs/api.md)."""

    mode: str = "message"
    binary: bool = False  # stream mode: audio as binary frames (16-byte header + PCM) instead of base64 JSON
    sample_format: str = "s16le"  # stream mode: PCM (s16le, f32le) or an encoded format (mp3, opus, ...)
    context: bool = True  # voice continuity: earlier chunks of the session are context for the next
    options: dict = field(default_factory=dict)  # default generation options for the session's text chunks

    def public(self) -> dict:
        return {
            "mode": self.mode,
            "binary": self.binary,
            "format": self.sample_format,
            "context": self.context,
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.options.items()},
        }


CONFIG_KEYS = ("mode", "binary", "format", "context")


def parse_stream_config(data: object, base: StreamConfig) -> StreamConfig:
    """A `{"config": {...}}` message (or the /stream query string, already typed) applied on top of `base`."""
    if not isinstance(data, dict):
        raise ValidationError([{"field": "config", "message": "must be a JSON object"}])
    errors = unknown_fields(data, (*CONFIG_KEYS, *OPTION_NAMES))
    changes: dict = {}
    if "mode" in data:
        if data["mode"] not in MODES:
            errors.append({"field": "mode", "message": f"must be one of {', '.join(MODES)}, got {shown(data['mode'])}"})
        else:
            changes["mode"] = data["mode"]
    if "format" in data:
        if data["format"] not in (*SAMPLE_FORMATS, *ENCODED_FORMATS):
            errors.append(
                {
                    "field": "format",
                    "message": f"must be one of {', '.join((*SAMPLE_FORMATS, *ENCODED_FORMATS))}, "
                    f"got {shown(data['format'])}",
                }
            )
        else:
            changes["sample_format"] = data["format"]
    for name in ("binary", "context"):
        if name in data:
            if not isinstance(data[name], bool):
                errors.append({"field": name, "message": f"must be true or false, got {shown(data[name])}"})
            else:
                changes[name] = data[name]
    values, option_errors = check_options(data)
    errors += option_errors
    if errors:
        raise ValidationError(errors)
    return replace(base, **changes, options={**base.options, **values})
