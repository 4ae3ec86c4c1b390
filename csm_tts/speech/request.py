"""What a client asks the engine for, and the cheap checks that need no model (`validate_request`).

The prompt-length checks that need the tokenizer happen in `CsmEngine.prepare`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from csm_tts import SAMPLE_RATE, limits


class InvalidRequest(ValueError):
    """Bad input; the message is meant for the client."""


class ContextTooLong(InvalidRequest):
    """The prompt (text and context) leaves the model's window no room for the audio asked for. Its message leads
    with the reason code (csm_tts/limits.py), which reaches the proxy inside Triton's error message: the proxy
    drops conversation context and retries on the code, never on the wording."""

    reason = limits.CONTEXT_TOO_LONG

    def __init__(self, detail: str):
        super().__init__(limits.with_reason(self.reason, detail))


@dataclass(frozen=True)
class ContextSegment:
    """An earlier turn: what `speaker` said (`text`) and how it sounded (24 kHz mono float32 `audio`)."""

    speaker: int
    text: str
    audio: np.ndarray


@dataclass(frozen=True)
class GenerationRequest:
    text: str
    speaker_id: int = limits.DEFAULT_SPEAKER_ID
    temperature: float = limits.DEFAULT_TEMPERATURE  # 0 = greedy
    topk: int = limits.DEFAULT_TOPK
    max_audio_length_ms: int | None = None  # None: follows the text (csm_tts/speech/length_rule.py)
    seed: int | None = None
    context: tuple[ContextSegment, ...] = ()
    ignore_eos: bool = False  # benchmarks: always generate max_audio_length_ms


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. The context bounds keep a request's prompt building (tokenizing, Mimi encoding
    of context audio) and prefill bounded: 120 s of context is ~1500 of the 2048 positions."""

    max_speaker_id: int = limits.MAX_SPEAKER_ID
    max_text_chars: int = limits.MAX_TEXT_CHARS
    max_audio_length_ms: int = limits.MAX_AUDIO_LENGTH_MS  # also caps the default limit that follows the text
    max_context_audio_s: float = limits.MAX_CONTEXT_AUDIO_S
    max_context_segments: int = limits.MAX_CONTEXT_SEGMENTS
    max_context_text_chars: int = limits.MAX_CONTEXT_TEXT_CHARS  # all context segments' texts together


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, e.g. "\ud800" from JSON
        raise InvalidRequest(f"{what} cannot be encoded as UTF-8 (character {e.start} is a lone surrogate)") from None


def validate_request(request: GenerationRequest, bounds: Limits, codebook_size: int) -> None:
    """Cheap checks that need no model; the prompt-length checks happen in `CsmEngine.prepare`."""
    if not isinstance(request.text, str) or not request.text.strip():
        raise InvalidRequest("text must be a non-empty string")
    if len(request.text) > bounds.max_text_chars:
        raise InvalidRequest(f"text has {len(request.text)} characters; the limit is {bounds.max_text_chars}")
    _check_utf8(request.text, "text")
    for name, value in (("speaker_id", request.speaker_id), *(("context speaker", s.speaker) for s in request.context)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= bounds.max_speaker_id:
            raise InvalidRequest(f"{name} must be an integer from 0 to {bounds.max_speaker_id}, got {value!r}")
    low, high = limits.ENGINE_TEMPERATURE
    if not (isinstance(request.temperature, (int, float)) and low <= request.temperature <= high):
        raise InvalidRequest(f"temperature must be between {low:g} (greedy) and {high:g}, got {request.temperature!r}")
    if not isinstance(request.topk, int) or not 1 <= request.topk <= codebook_size:
        raise InvalidRequest(f"topk must be an integer from 1 to {codebook_size}, got {request.topk!r}")
    if request.max_audio_length_ms is not None and (
        not isinstance(request.max_audio_length_ms, int)
        or isinstance(request.max_audio_length_ms, bool)
        or not limits.ENGINE_MIN_AUDIO_LENGTH_MS <= request.max_audio_length_ms <= bounds.max_audio_length_ms
    ):
        raise InvalidRequest(
            f"max_audio_length_ms must be an integer from {limits.ENGINE_MIN_AUDIO_LENGTH_MS} to "
            f"{bounds.max_audio_length_ms}, "
            f"got {request.max_audio_length_ms!r}"
        )
    if request.seed is not None and (not isinstance(request.seed, int) or not 0 <= request.seed <= limits.MAX_SEED):
        raise InvalidRequest(f"seed must be an integer from 0 to 2**63-1, got {request.seed!r}")
    if len(request.context) > bounds.max_context_segments:
        raise InvalidRequest(f"context has {len(request.context)} segments; the limit is {bounds.max_context_segments}")
    total_context = context_chars = 0
    for i, segment in enumerate(request.context):
        if not isinstance(segment.text, str) or not segment.text.strip():
            raise InvalidRequest(f"context segment {i} has empty text")
        _check_utf8(segment.text, f"context segment {i} text")
        context_chars += len(segment.text)
        if context_chars > bounds.max_context_text_chars:
            raise InvalidRequest(
                f"context texts have more than {bounds.max_context_text_chars} characters together (the limit)"
            )
        audio = segment.audio
        if not isinstance(audio, np.ndarray) or audio.ndim != 1 or audio.size == 0:
            raise InvalidRequest(f"context segment {i} audio must be a non-empty 1-D array of 24 kHz samples")
        if not np.isfinite(audio).all():
            raise InvalidRequest(f"context segment {i} audio contains NaN or infinite samples")
        total_context += audio.size
    if total_context > bounds.max_context_audio_s * SAMPLE_RATE:
        raise InvalidRequest(
            f"context audio totals {total_context / SAMPLE_RATE:.1f} s; the limit is {bounds.max_context_audio_s:.0f} s"
        )
