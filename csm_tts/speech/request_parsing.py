"""Turn a Triton request's tensors and parameters into a `GenerationRequest` (plain Python, testable without Triton).

Text and context segments travel as tensors; generation options travel as request parameters (they pass through
the `tts` ensemble to every step unchanged). Parameters arrive as JSON values; gRPC clients may send numbers as
strings, so both are accepted, and anything else is an `InvalidRequest` naming the parameter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from csm_tts import limits
from csm_tts.parsing import parse_bool, shown
from csm_tts.speech.request import ContextSegment, GenerationRequest, InvalidRequest

# name -> (type, default); the defaults are the API's (csm_tts/limits.py). Without max_audio_length_ms the limit
# follows the text (csm_tts/speech/length_rule.py).
GENERATION_PARAMETERS: dict[str, tuple[type, object]] = {
    "speaker_id": (int, limits.DEFAULT_SPEAKER_ID),
    "temperature": (float, limits.DEFAULT_TEMPERATURE),
    "topk": (int, limits.DEFAULT_TOPK),
    "max_audio_length_ms": (int, None),
    "seed": (int, None),
    "ignore_eos": (bool, False),
}
CONTEXT_INPUTS = ("context_text", "context_speaker", "context_audio", "context_audio_lengths")


def parse_parameters(raw: str | Mapping | None) -> dict:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, Mapping):
        return dict(raw)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"request parameters are not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidRequest("request parameters must be a JSON object")
    return value


def coerce(name: str, value: object, kind: type) -> object:
    """Accept the value as its type, or as a string spelling it; reject everything else with a clear message."""
    try:
        if kind is bool:
            return parse_bool(value, name)
        if kind is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                return int(value.strip())
            raise ValueError
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)  # int, float or numeric string
            if not np.isfinite(number):
                raise ValueError
            return number
    except (TypeError, ValueError, OverflowError):  # OverflowError: float() of an integer beyond 1e308
        pass
    raise InvalidRequest(f"parameter {name!r} must be {kind.__name__}, got {shown(value)}")


def decode_text(raw: bytes | str, what: str = "text") -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{what} is not valid UTF-8") from None


def parse_context(inputs: Mapping[str, np.ndarray | None]) -> tuple[ContextSegment, ...]:
    present = [name for name in CONTEXT_INPUTS if inputs.get(name) is not None]
    if not present:
        return ()
    if len(present) != len(CONTEXT_INPUTS):
        missing = sorted(set(CONTEXT_INPUTS) - set(present))
        raise InvalidRequest(f"context needs all of {', '.join(CONTEXT_INPUTS)}; missing {', '.join(missing)}")
    texts = [decode_text(t, "context_text") for t in np.asarray(inputs["context_text"]).reshape(-1)]
    speakers = np.asarray(inputs["context_speaker"]).reshape(-1)
    lengths = np.asarray(inputs["context_audio_lengths"]).reshape(-1)
    audio = np.asarray(inputs["context_audio"], dtype=np.float32).reshape(-1)
    if not len(texts) == len(speakers) == len(lengths):
        raise InvalidRequest(
            f"context_text, context_speaker and context_audio_lengths must have one entry per segment "
            f"(got {len(texts)}, {len(speakers)}, {len(lengths)})"
        )
    if (lengths <= 0).any() or int(lengths.sum()) != audio.size:
        raise InvalidRequest(
            f"context_audio_lengths must be positive and sum to the {audio.size} samples of context_audio "
            f"(they sum to {int(lengths.sum())})"
        )
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return tuple(
        ContextSegment(speaker=int(s), text=t, audio=audio[bounds[i] : bounds[i + 1]])
        for i, (t, s) in enumerate(zip(texts, speakers, strict=True))
    )


def parse_request(text: bytes | str, parameters: Mapping, context_inputs: Mapping | None = None) -> GenerationRequest:
    options = {}
    for name, (kind, default) in GENERATION_PARAMETERS.items():
        value = parameters.get(name)
        options[name] = default if value is None else coerce(name, value, kind)
    return GenerationRequest(text=decode_text(text), context=parse_context(context_inputs or {}), **options)
