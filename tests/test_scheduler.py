"""The stream scheduler without Triton: a recording sink stands in for the response sender."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from conftest import wait_for

from csm_tts.speech.engine import CsmEngine
from csm_tts.speech.request import GenerationRequest, InvalidRequest
from csm_tts.speech.request_parsing import parse_parameters, parse_request
from csm_tts.speech.scheduler import ServerFull, StreamScheduler


class RecordingSink:
    def __init__(self, cancel_after_chunks: int | None = None):
        self.chunks, self.errors = [], []
        self.cancel_after_chunks = cancel_after_chunks
        self.done = threading.Event()
        self.first_chunk = threading.Event()

    def send_chunk(self, stream, chunk):
        self.chunks.append(chunk)
        self.first_chunk.set()
        if chunk.is_last:
            self.done.set()

    def send_error(self, message, code):
        self.errors.append((message, code))
        self.done.set()

    def is_cancelled(self):
        cancelled = self.cancel_after_chunks is not None and len(self.chunks) >= self.cancel_after_chunks
        if cancelled:
            self.done.set()
        return cancelled

    @property
    def audio(self):
        return np.concatenate([c.audio for c in self.chunks])


@pytest.fixture
def scheduler(engine):
    messages = []
    sched = StreamScheduler(engine, max_active=4, max_queued=4, logger=messages.append)
    sched.messages = messages
    yield sched
    sched.close()


def test_every_stream_ends_exactly_once(scheduler):
    sinks = [RecordingSink() for _ in range(3)]
    for i, sink in enumerate(sinks):
        scheduler.submit(GenerationRequest("Hello.", seed=i, max_audio_length_ms=480), sink)
    for sink in sinks:
        assert sink.done.wait(60)
        assert [c.is_last for c in sink.chunks].count(True) == 1 and sink.chunks[-1].is_last and not sink.errors


def test_batched_greedy_streams_equal_their_solo_runs(scheduler, engine):
    """Streams joining at different rounds (different prompt and cache lengths) share batched steps."""
    requests = [
        GenerationRequest(text, speaker_id=speaker, temperature=0, max_audio_length_ms=800)
        for text, speaker in (("Hello.", 0), ("How are you doing today?", 1), ("Fine, thank you very much.", 2))
    ]
    sinks = [RecordingSink() for _ in requests]
    for request, sink in zip(requests, sinks, strict=True):
        scheduler.submit(request, sink)
    assert all(sink.done.wait(60) for sink in sinks)
    for request, sink in zip(requests, sinks, strict=True):  # solo runs once nothing else runs
        solo = np.concatenate([c.audio for c in engine.generate(request)])
        # Equal but for float rounding where the output stage decoded two streams' chunks in one call (~2e-7).
        assert sink.audio.shape == solo.shape and np.abs(sink.audio - solo).max() <= 5e-6


def test_sampling_randomness_does_not_depend_on_the_batch(engine):
    """Each stream draws its own 32 uniforms a frame: its generator ends in the same state alone or batched.
    (Batched matmuls round differently in the last bit, so rare near-ties may still sample differently; the
    randomness itself never mixes between streams.)"""
    requests = [GenerationRequest("Hello.", seed=s, max_audio_length_ms=6 * 80) for s in (3, 4, 5)]
    batched = [engine.start(r) for r in requests]
    while not all(s.finished for s in batched):
        engine.step_many(batched)
    for request, stream in zip(requests, batched, strict=True):
        solo = engine.start(request)
        while not solo.finished:
            engine.step(solo)
        assert torch.equal(solo.generator.get_state(), stream.generator.get_state())
        assert torch.equal(solo.pending[0], stream.pending[0])


def test_cancel_stops_within_a_frame_and_others_continue(scheduler):
    cancelled, other = RecordingSink(cancel_after_chunks=1), RecordingSink()
    scheduler.submit(GenerationRequest("Hello.", seed=1, max_audio_length_ms=20_000), cancelled)
    scheduler.submit(GenerationRequest("Hello.", seed=2, max_audio_length_ms=800), other)
    assert other.done.wait(60) and cancelled.done.wait(60)
    deadline = time.monotonic() + 5
    while not any("Cancelling the request" in m for m in scheduler.messages) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("Cancelling the request" in m for m in scheduler.messages)
    assert len(cancelled.chunks) == 1 and not cancelled.chunks[0].is_last
    assert cancelled.errors == [("the request was cancelled", "CANCELLED")]  # its one final response
    assert other.chunks[-1].is_last
    assert wait_for(lambda: scheduler.engine.streams_active == 0)  # the cancelled stream gave its slot back


def test_full_queue_is_refused(engine):
    sched = StreamScheduler(engine, max_active=1, max_queued=1, logger=lambda m: None)
    try:
        sinks = [RecordingSink(), RecordingSink()]
        sched.submit(GenerationRequest("Hello.", max_audio_length_ms=2000), sinks[0])
        assert sinks[0].first_chunk.wait(30)  # the first stream is active now; the queue has room for one more
        sched.submit(GenerationRequest("Hello.", max_audio_length_ms=160), sinks[1])
        with pytest.raises(ServerFull, match="retry"):
            sched.submit(GenerationRequest("Hello.", max_audio_length_ms=160), RecordingSink())
        assert all(s.done.wait(60) for s in sinks)
    finally:
        sched.close()


def test_a_queued_stream_waits_a_bounded_time(engine):
    """Waiting for a slot is bounded: past max_queue_wait_s the request is refused, retry-able, instead of waiting
    for a whole clip to end."""
    messages = []
    sched = StreamScheduler(engine, max_active=1, max_queued=4, logger=messages.append, max_queue_wait_s=0.3)
    try:
        running, late = RecordingSink(), RecordingSink()
        sched.submit(GenerationRequest("Hello.", max_audio_length_ms=4000), running)
        sched.submit(GenerationRequest("Hello.", max_audio_length_ms=160), late)
        assert late.done.wait(30)
        assert not late.chunks and len(late.errors) == 1
        message, code = late.errors[0]
        assert code == "UNAVAILABLE" and "no stream slot became free within" in message and "retry" in message
        assert running.done.wait(60) and running.chunks[-1].is_last and not running.errors
        assert any("refusing a queued request" in m for m in messages)
    finally:
        sched.close()


def test_active_streams_are_capped_by_the_engine_slots(tiny_csm_dir):
    engine = CsmEngine.from_dir(tiny_csm_dir, max_streams=2)
    messages = []
    sched = StreamScheduler(engine, max_active=8, max_queued=8, logger=messages.append)
    try:
        assert sched.max_active == 2 and "lowered to the engine's 2 stream slots" in messages[0]
        sinks = [RecordingSink() for _ in range(4)]
        for i, sink in enumerate(sinks):
            sched.submit(GenerationRequest("Hello.", seed=i, max_audio_length_ms=320), sink)
        assert all(s.done.wait(60) and s.chunks[-1].is_last and not s.errors for s in sinks)
        assert engine.streams_active == 0
    finally:
        sched.close()


def test_prompt_too_long_is_reported_as_invalid_input(scheduler):
    sink = RecordingSink()
    scheduler.submit(GenerationRequest("word " * 900, max_audio_length_ms=90_000), sink)
    assert sink.done.wait(30)
    assert sink.errors and sink.errors[0][1] == "INVALID_ARG" and "2048" in sink.errors[0][0]


def test_parse_request_accepts_strings_and_numbers():
    request = parse_request(
        b"Hi", parse_parameters('{"speaker_id": "2", "temperature": 0.5, "topk": "7", "seed": 9, "ignore_eos": "true"}')
    )
    assert (request.text, request.speaker_id, request.temperature, request.topk, request.seed, request.ignore_eos) == (
        "Hi",
        2,
        0.5,
        7,
        9,
        True,
    )
    assert parse_request("Hi", {}).max_audio_length_ms is None  # the engine applies the rule that follows the text


@pytest.mark.parametrize(
    "raw", ['{"topk": "many"}', '{"temperature": "nan"}', '{"ignore_eos": 3}', '{"speaker_id": true}', "[1]", "{"]
)
def test_parse_request_rejects_bad_parameters(raw):
    with pytest.raises(InvalidRequest):
        parse_request(b"Hi", parse_parameters(raw))
