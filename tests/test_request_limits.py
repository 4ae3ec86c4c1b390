"""Bounded work per request: the default length follows the text, cheap checks run before expensive ones, context
and parameters are bounded, the chunk schedule never overflows."""

from __future__ import annotations

import time

import numpy as np
import pytest

from csm_tts import FRAME_MS, SAMPLE_RATE
from csm_tts.speech.chunk_schedule import ChunkSchedule
from csm_tts.speech.length_rule import BASE_MS, MS_PER_BYTE, default_audio_length_ms
from csm_tts.speech.request import ContextSegment, GenerationRequest, InvalidRequest
from csm_tts.speech.request_parsing import parse_request


def noise(seconds: float) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(int(seconds * SAMPLE_RATE)) * 0.1).astype(np.float32)


# -- the default length ----------------------------------------------------------------------------------------------
def test_the_rule_gives_a_few_seconds_plus_an_allowance_per_byte_capped_by_the_maximum():
    assert default_audio_length_ms("Hi.", 90_000) == 2_400  # 2000 + 3 x 150 = 2450, down to whole 80 ms frames
    assert default_audio_length_ms("Hello,", 90_000) == (BASE_MS + 6 * MS_PER_BYTE) // FRAME_MS * FRAME_MS == 2_880
    assert default_audio_length_ms("x" * 1000, 90_000) == 90_000
    assert default_audio_length_ms("日本語", 90_000) == 3_280  # 9 UTF-8 bytes: more time per character
    assert default_audio_length_ms("Hi.", 1_000) == 960 and default_audio_length_ms("Hi.", 10) == FRAME_MS


def test_without_a_limit_generation_stops_where_the_rule_says(engine):
    """The tiny random checkpoint never emits its end frame, so the stream runs exactly to its limit."""
    request = GenerationRequest("Hello,", seed=1)
    chunks = list(engine.generate(request))
    frames = sum(c.audio.size for c in chunks) // (SAMPLE_RATE * FRAME_MS // 1000)
    assert frames == default_audio_length_ms("Hello,", engine.limits.max_audio_length_ms) // FRAME_MS == 36
    assert chunks[-1].finish_reason == "length"


def test_an_explicit_limit_is_honoured_as_given(engine):
    assert engine.prepare(GenerationRequest("Hello,", max_audio_length_ms=800)).max_frames == 10
    assert engine.prepare(GenerationRequest("Hi.", max_audio_length_ms=60_000)).max_frames == 750


def test_the_default_shrinks_to_what_the_context_window_has_left(engine):
    text = "Hello there, how are you doing today? " * 120  # ~4600 characters: the rule says 90 s (1125 frames)
    prompt = engine.prepare(GenerationRequest(text))
    assert prompt.length + prompt.max_frames == engine.max_positions and prompt.max_frames < 1125
    with pytest.raises(InvalidRequest, match="context holds 2048"):  # an explicit length must fit
        engine.prepare(GenerationRequest(text, max_audio_length_ms=90_000))


# -- cheap checks first ----------------------------------------------------------------------------------------------
def test_a_prompt_that_cannot_fit_is_refused_before_its_context_is_encoded(engine, monkeypatch):
    encoded = []
    monkeypatch.setattr(engine, "prompt_embeds", lambda request: encoded.append(request) or 1 / 0)
    request = GenerationRequest(
        "Hello.", max_audio_length_ms=90_000, context=(ContextSegment(0, "Earlier words.", noise(100)),)
    )
    started = time.perf_counter()
    with pytest.raises(InvalidRequest, match="takes at least 1"):
        engine.prepare(request)
    assert not encoded and time.perf_counter() - started < 0.5  # 100 s of Mimi encoding takes ~1 s here


def test_the_positions_estimate_never_exceeds_the_real_prompt(engine):
    for seconds in (0.01, 0.08, 1.0, 7.3):
        request = GenerationRequest("Hello there.", context=(ContextSegment(1, "Earlier words.", noise(seconds)),))
        assert engine.min_prompt_positions(request) <= engine.prepare(request).length


@pytest.mark.parametrize(
    "context, message",
    [
        (tuple(ContextSegment(0, "Hi.", noise(0.1)) for _ in range(33)), "33 segments; the limit is 32"),
        ((ContextSegment(0, "word " * 2000, noise(0.1)), ContextSegment(0, "word " * 2001, noise(0.1))), "20000"),
        ((ContextSegment(0, "Hi.", noise(121)),), "limit is 120 s"),
        ((ContextSegment(0, "bad \ud800 text", noise(0.1)),), "UTF-8"),
    ],
    ids=["segments", "context text", "context audio", "surrogate"],
)
def test_context_is_bounded(engine, context, message):
    with pytest.raises(InvalidRequest, match=message):
        engine.validate(GenerationRequest("Hello.", context=context))


def test_text_must_encode_as_utf8(engine):
    with pytest.raises(InvalidRequest, match="cannot be encoded as UTF-8"):
        engine.validate(GenerationRequest("lone \ud800 surrogate"))


@pytest.mark.parametrize(
    "parameters",
    [
        {"speaker_id": 2**63},
        {"speaker_id": "9" * 5000},
        {"temperature": 10**400},
        {"seed": 2**63},
        {"max_audio_length_ms": -(2**70)},
        {"topk": 1e300},
    ],
    ids=["speaker 2^63", "5000 digits", "temperature 1e400", "seed 2^63", "length -2^70", "topk 1e300"],
)
def test_huge_numbers_are_invalid_requests(engine, parameters):
    with pytest.raises(InvalidRequest):
        engine.validate(parse_request("Hello.", parameters))


# -- the chunk schedule ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("first, growth, largest", [(1, 2.0, 1), (2, 2.0, 10), (3, 1.5, 10), (1, 16.0, 1125)])
def test_the_chunk_schedule_never_overflows(first, growth, largest):
    schedule = ChunkSchedule(first, growth, largest)
    assert schedule.frames_in_chunk(0) == first
    assert schedule.frames_in_chunk(5_000) == schedule.frames_in_chunk(10**9) == largest


@pytest.mark.parametrize(
    "first, growth, largest", [(0, 2.0, 10), (4, 2.0, 2), (1, 0.5, 10), (1, float("nan"), 10), (1.5, 2.0, 10)]
)
def test_an_impossible_chunk_schedule_is_refused(first, growth, largest):
    with pytest.raises(ValueError, match="invalid chunk schedule"):
        ChunkSchedule(first, growth, largest)
