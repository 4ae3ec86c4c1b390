"""The checks of single fields, each returning the clean value or raising ValueError with the user-facing message,
and the glue that runs them inside pydantic models and reads their errors back in the API's order and words.

pydantic (v2, strict models) gives each surface one declared shape and collects every bad field in one pass; the
checks below keep the messages exactly as documented, since pydantic's own wording ("Input should be ...") is not
the API's. A check raises `Refusal` when the API answers with more than a message (a status, an OpenAI code).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any

import pydantic
from pydantic import BeforeValidator, ConfigDict, WithJsonSchema

from csm_tts import limits
from csm_tts.parsing import shown
from csm_tts.watermark.options import KEY_FORMAT, InvalidWatermarkOption, parse_key

OPTION_NAMES = (
    "speaker_id",
    "max_audio_length_ms",
    "temperature",
    "topk",
    "watermark",
    "watermark_key",
    "seed",
    "normalize",
)
STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


class Refusal(ValueError):
    """A field error with its own status (e.g. 404 for an unknown model) and OpenAI code."""

    def __init__(self, message: str, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


def checked(check: Callable[[Any], Any]) -> BeforeValidator:
    """A pydantic validator that runs `check` on the raw JSON value (pydantic's strict type check follows)."""
    return BeforeValidator(check)


# -- numbers -----------------------------------------------------------------------------------------------------
def integer(value: object, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be an integer, got {shown(value)}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"must be an integer, got {value!r}")
        value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(range_message(low, high, shown(value)))
    return value


def number(value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, got {shown(value)}")
    if isinstance(value, int) and not low <= value <= high:  # float() of a huge JSON integer would overflow
        raise ValueError(range_message(low, high, shown(value)))
    value = float(value)
    if not low <= value <= high:  # also rejects NaN
        raise ValueError(range_message(low, high, value))
    return value


def range_message(low, high, value) -> str:
    value = value if isinstance(value, str) else repr(value)
    if high is None:
        return f"must be >= {low}, got {value}"
    if low is None:
        return f"must be <= {high}, got {value}"
    return f"must be between {low} and {high}, got {value}"


# -- the fields --------------------------------------------------------------------------------------------------
def check_text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {shown(value)}")
    if not value.strip():
        raise ValueError("must not be empty")
    if len(value) > limits.MAX_TEXT_CHARS:
        raise ValueError(f"has {len(value)} characters; the limit is {limits.MAX_TEXT_CHARS}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800" is valid JSON but not text
        raise ValueError(f"cannot be encoded as UTF-8 (character {e.start} is a lone surrogate)") from None
    return value


def check_watermark(value: object) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise ValueError(f"must be true, false or null, got {shown(value)}")


def check_watermark_key(value: object) -> tuple[int, ...] | None:
    """A list of 5 integers, or "a,b,c,d,e" as CSM_WATERMARK_KEY spells it; the error never echoes the key."""
    if value is None:
        return None
    try:
        return parse_key(value)
    except InvalidWatermarkOption:
        raise ValueError(f"must be {KEY_FORMAT}") from None


def check_seed(value: object) -> int | None:
    return None if value is None else integer(value, 0, limits.MAX_SEED)


def check_flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"must be true or false, got {shown(value)}")


CHECKS = {
    "speaker_id": lambda v: integer(v, 0, limits.MAX_SPEAKER_ID),
    "max_audio_length_ms": lambda v: integer(v, limits.API_MIN_AUDIO_LENGTH_MS, limits.MAX_AUDIO_LENGTH_MS),
    "temperature": lambda v: number(v, *limits.API_TEMPERATURE),
    "topk": lambda v: integer(v, *limits.API_TOPK),
    "watermark": check_watermark,
    "watermark_key": check_watermark_key,
    "seed": check_seed,
    "normalize": check_flag,
}


def described(schema: dict) -> WithJsonSchema:
    """What the check beside it accepts, as JSON Schema (the OpenAPI description, proxy/parse/openapi.py): the checks
    run as before-validators, which pydantic cannot describe by itself."""
    return WithJsonSchema(schema)


def _int(low: int, high: int) -> dict:
    return {"type": "integer", "minimum": low, "maximum": high}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


# Annotated types of the generation options, shared by every surface's model.
SpeakerId = Annotated[int, checked(CHECKS["speaker_id"]), described(_int(0, limits.MAX_SPEAKER_ID))]
AudioLengthMs = Annotated[
    int | None,
    checked(CHECKS["max_audio_length_ms"]),
    described(_int(limits.API_MIN_AUDIO_LENGTH_MS, limits.MAX_AUDIO_LENGTH_MS)),  # null is refused: omit it
]
Temperature = Annotated[
    float,
    checked(CHECKS["temperature"]),
    described({"type": "number", "minimum": limits.API_TEMPERATURE[0], "maximum": limits.API_TEMPERATURE[1]}),
]
TopK = Annotated[int, checked(CHECKS["topk"]), described(_int(*limits.API_TOPK))]
Watermark = Annotated[bool | None, checked(check_watermark), described({"type": ["boolean", "null"]})]
WatermarkKey = Annotated[
    tuple[int, ...] | None,
    checked(check_watermark_key),
    described(_nullable({"type": "array", "items": _int(0, 255), "minItems": 5, "maxItems": 5})),
]
Seed = Annotated[int | None, checked(check_seed), described(_nullable(_int(0, limits.MAX_SEED)))]
TEXT_SCHEMA = {"type": "string", "minLength": 1, "maxLength": limits.MAX_TEXT_CHARS, "pattern": "\\S"}
Text = Annotated[str, checked(check_text), described(TEXT_SCHEMA)]


class SamplingOptions(pydantic.BaseModel):
    """The generation options every surface spells the same way (absent: the job's defaults)."""

    model_config = STRICT

    max_audio_length_ms: AudioLengthMs = None
    temperature: Temperature = limits.DEFAULT_TEMPERATURE
    topk: TopK = limits.DEFAULT_TOPK
    watermark: Watermark = None
    watermark_key: WatermarkKey = None
    seed: Seed = None
    normalize: Annotated[bool, checked(check_flag)] = True  # text normalised for speech (docs/text.md)


class Options(SamplingOptions):
    """The native API's generation options: the sampling options and a speaker id (OpenAI's surface has a voice)."""

    speaker_id: SpeakerId = limits.DEFAULT_SPEAKER_ID


def given(model: pydantic.BaseModel, names: Sequence[str] = OPTION_NAMES) -> dict:
    """The values of the fields among `names` that the client sent (the rest keep their defaults elsewhere)."""
    return {name: getattr(model, name) for name in names if name in model.model_fields_set}


# -- pydantic's errors, read back -------------------------------------------------------------------------------
def unknown_fields(names, what: str = "field(s)", listed: int = 10) -> list[dict]:
    """One entry naming the unknown fields: at most `listed` of them, each cut short (a client may send thousands of
    long names, and the error would echo them all)."""
    unknown = sorted(str(k) for k in names)
    if not unknown:
        return []
    shown_names = [name if len(name) <= 40 else name[:37] + "..." for name in unknown[:listed]]
    more = f" and {len(unknown) - listed} more" if len(unknown) > listed else ""
    return [{"field": None, "message": f"unknown {what}: {', '.join(shown_names)}{more}"}]


def field_errors(error: pydantic.ValidationError, order: Sequence[str]) -> list[dict]:
    """One `{"field", "message"}` per bad field in the API's order: unknown fields first (one entry), then the
    fields in `order`."""
    problems = error.errors()
    entries = unknown_fields(p["loc"][0] for p in problems if p["type"] == "extra_forbidden")
    rest = [p for p in problems if p["type"] != "extra_forbidden"]
    rest.sort(key=lambda p: order.index(p["loc"][0]) if p["loc"][0] in order else len(order))
    entries += [{"field": str(p["loc"][0]), "message": message(p)} for p in rest]
    return entries


def first_problem(error: pydantic.ValidationError, order: Sequence[str]) -> tuple[str, str, str, object]:
    """(kind, field, message, the check's exception or None) of the first problem in `order`; kind is "unknown",
    "missing" or "invalid"."""
    problems = error.errors()
    unknown = sorted(str(p["loc"][0]) for p in problems if p["type"] == "extra_forbidden")
    if unknown:
        return "unknown", ", ".join(unknown), "", None
    problems = sorted(problems, key=lambda p: order.index(p["loc"][0]) if p["loc"][0] in order else len(order))
    missing = [p for p in problems if p["type"] == "missing"]
    if missing:
        return "missing", str(missing[0]["loc"][0]), "", None
    p = problems[0]
    return "invalid", str(p["loc"][0]), message(p), (p.get("ctx") or {}).get("error")


def message(problem: dict) -> str:
    if problem["type"] == "missing":
        return "is required"
    error = (problem.get("ctx") or {}).get("error")
    return str(error) if isinstance(error, ValueError) else problem["msg"]
