"""The decoupled watermarker adapter (model_repository/watermarker/1/model.py) with tests/fake_pb_utils.py and real
cancellation markers: every request gets exactly one final response, a cancelled stream's queued chunks are answered
without audio and csm_1b is told how far the stream got, and the queue gauges come back to zero."""

from __future__ import annotations

import fake_pb_utils as pb
import numpy as np
import pytest
from test_production_unit import load_watermarker

from csm_tts.triton import cancellation

STREAM = "0123456789abcdef0123456789abcdef"
FRAME = 1920


@pytest.fixture
def markers(tmp_path, monkeypatch):
    monkeypatch.setenv("CSM_CANCEL_DIR", str(tmp_path / "markers"))
    yield
    cancellation.close_all()


@pytest.fixture
def watermarker(tiny_watermark_dir, monkeypatch, markers):
    monkeypatch.delenv("CSM_WATERMARK_KEY", raising=False)
    monkeypatch.delenv("CSM_WATERMARK_ENABLED", raising=False)
    pb.MetricFamily.families.clear()
    model = load_watermarker(tiny_watermark_dir)
    yield model
    model.finalize()


class Request(pb.InferenceRequest):
    def __init__(self, index, audio, is_last=False, cancelled=False, parameters=None):
        super().__init__(
            {
                "audio": audio,
                "stream_id": np.array([STREAM.encode()], dtype=np.object_),
                "chunk_index": np.array([index], np.int32),
                "sample_offset": np.array([index * FRAME * 2], np.int64),
                "is_last": np.array([is_last]),
            },
            parameters if parameters is not None else {"watermark": True},
            request_id=f"rid-{index}",
        )
        self.cancelled = cancelled

    def is_cancelled(self):
        return self.cancelled

    def answer(self, timeout=60.0):
        assert self.sender.final.wait(timeout), "no final response"
        assert len(self.sender.sent) == 1 and self.sender.final_flags == 1
        return self.sender.sent[0][0]


def chunk(seed):
    return (np.random.default_rng(seed).standard_normal(2 * FRAME) * 0.05).astype(np.float32)


def test_each_chunk_gets_one_final_response_and_progress_reaches_csm_1b(watermarker):
    assert cancellation.open_marker(STREAM)
    requests = [Request(i, chunk(i), is_last=i == 4) for i in range(5)]
    assert watermarker.execute(requests) is None  # decoupled: answers come from the batching thread
    responses = [r.answer() for r in requests]
    audio = [r.output("audio").size for r in responses]
    assert sum(audio) == 5 * 2 * FRAME and all(n == 0 or n >= 2400 for n in audio[:-1])
    assert [bool(r.output("is_last")[0]) for r in responses] == [False] * 4 + [True]
    assert cancellation.samples_done(STREAM) == 5 * 2 * FRAME
    watermarker.metrics.flush()
    families = pb.MetricFamily.families
    assert len(families["csm_tts_watermark_chunk_seconds"].metrics[0].observations) == 5
    assert families["csm_tts_watermark_pass_seconds"].metrics[0].observations
    assert families["csm_tts_watermark_queued_chunks"].metrics[0].value() == 0
    assert families["csm_tts_watermark_queued_audio_seconds"].metrics[0].value() == 0


def test_a_cancelled_streams_queued_chunks_are_answered_without_audio(watermarker):
    """Triton marks only the chunk that arrives after the client's cancel; it stops csm_1b (the marker goes) and
    every chunk of the stream still queued is answered at once without being watermarked."""
    assert cancellation.open_marker(STREAM)
    requests = [Request(i, chunk(i)) for i in range(40)] + [Request(40, chunk(40), cancelled=True)]
    watermarker.execute(requests)
    responses = [r.answer() for r in requests]
    watermarked = [i for i, r in enumerate(responses) if r.output("audio").size]
    assert len(watermarked) <= 3, watermarked  # at most the passes that ran before the cancelled chunk was queued
    assert not any(r.has_error() for r in responses)  # never an error for a running csm_1b stream
    assert cancellation.stop_reason(STREAM) == ""  # csm_1b ends the stream
    assert cancellation.samples_done(STREAM) is None or cancellation.samples_done(STREAM) == 41 * 2 * FRAME
    assert any(f"cancelled stream {STREAM}: dropped its watermark state and" in line for line in pb.Logger.lines)


def test_a_stream_failed_by_a_bad_option_is_stopped_with_its_error(watermarker):
    assert cancellation.open_marker(STREAM)
    bad = [Request(i, chunk(i), parameters={"watermark_key": "1,2"}) for i in range(3)]
    watermarker.execute(bad)
    responses = [r.answer() for r in bad]
    assert not any(r.has_error() for r in responses)  # csm_1b sends the error as the stream's last response
    assert cancellation.stop_reason(STREAM).startswith("INVALID_ARG: watermark_key")


def test_unload_answers_what_is_still_queued(watermarker):
    requests = [Request(i, chunk(i)) for i in range(30)]
    watermarker.execute(requests)
    watermarker.finalize()
    assert all(r.sender.final_flags == 1 for r in requests)
    late = Request(30, chunk(30))
    watermarker.execute([late])  # after unload: refused, still with exactly one final response
    assert late.answer(timeout=1).error().code() == "UNAVAILABLE"
