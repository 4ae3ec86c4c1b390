"""The text-streaming pieces that need no server: TextStream's plans and spans (proxy/text_stream.py), the
ElevenLabs output conversion, and the options that turn these on (normalize, text_stream, early_cut)."""

from __future__ import annotations

import io
from urllib.parse import unquote

import numpy as np
import pytest
import soundfile

from csm_tts.text import elevenlabs as el
from proxy.elevenlabs_session import audio_format
from proxy.errors import ApiError, ValidationError
from proxy.parse.job import GenerateOptions
from proxy.parse.native import parse_generate, parse_query
from proxy.parse.websocket import StreamConfig, parse_stream_config
from proxy.render.encoders import StreamEncoder
from proxy.spoken import plan_speech
from proxy.text_stream import TextStream


def feed_all(stream: TextStream, text: str) -> list:
    cuts = []
    for char in text:
        cuts += stream.feed(char)
    return cuts


def test_cuts_are_planned_with_spans_of_everything_received():
    stream = TextStream(GenerateOptions(text="", speaker_id=2))
    text = "Sure, the total is $12.50 today. That is all for now, thanks."
    cuts = feed_all(stream, text) + stream.flush()
    assert [c.reason for c in cuts][0] == "first"
    assert "".join(text[c.start : c.end] for c in cuts) == text
    spoken = [s for c in cuts for s in c.plan.segments]
    assert spoken[0].speech == "Sure,"
    assert "twelve dollars and fifty cents" in spoken[1].speech
    assert all(c.plan.options.speaker_id == 2 and c.plan.options.text == text[c.start : c.end] for c in cuts)


def test_reset_drops_waiting_text_and_spans_count_on():
    stream = TextStream(GenerateOptions(text=""))
    feed_all(stream, "Hello there, how are")
    assert stream.reset() == "how are"
    cuts = feed_all(stream, "Next one.") + stream.flush()
    assert cuts[0].plan.segments[0].speech == "Next one."
    assert (cuts[0].start, cuts[0].plan.segments[0].source_start) == (20, 20)


def test_a_cut_with_nothing_speakable_has_no_plan_and_normalize_false_keeps_text():
    stream = TextStream(GenerateOptions(text="", normalize=False))
    cuts = feed_all(stream, "👍🎉 ") + stream.flush() + feed_all(stream, "It is $5.") + stream.flush()
    assert cuts[0].plan is None
    assert cuts[-1].plan.segments[0].speech == "It is $5."


def test_plan_speech_refuses_nothing_speakable():
    with pytest.raises(ApiError, match="nothing to speak"):
        plan_speech(GenerateOptions(text="\u200b\u200b 🙂"))


@pytest.mark.parametrize("name,rate", [("pcm_16000", 16000), ("pcm_24000", 24000), ("pcm_44100", 44100)])
def test_pcm_output_is_resampled(name, rate):
    encoder = StreamEncoder(audio_format(el.OUTPUT_FORMATS[name]))
    audio = np.sin(np.arange(24000) / 10).astype(np.float32) * 0.5
    data = encoder.encode(audio[:12000]) + encoder.encode(audio[12000:]) + encoder.finish()
    assert abs(len(data) // 2 - rate) <= 2


def test_mp3_output_is_one_stream():
    """Two chunks and the tail: one MP3 file (one ID3 tag) of 1 s at 44.1 kHz, as an independent decoder reads it."""
    encoder = StreamEncoder(audio_format(el.OUTPUT_FORMATS["mp3_44100_128"]))
    audio = np.sin(np.arange(24000) / 10).astype(np.float32) * 0.5
    data = encoder.encode(audio[:12000]) + encoder.encode(audio[12000:]) + encoder.finish()
    assert data.count(b"ID3") == 1
    decoded, rate = soundfile.read(io.BytesIO(data))
    assert rate == 44100 and 44100 <= decoded.shape[0] <= 44100 + 2 * 1152


def test_plan_headers_report_what_is_spoken():
    plan = plan_speech(GenerateOptions(text="Meet **Dr. Lee** at 3:30 pm."))
    assert plan.spoken_text == "Meet Dr. Lee at three thirty P M."
    assert unquote(plan.headers()["X-Spoken-Text"]) == plan.spoken_text
    assert len(plan.segments) == 1


def test_options_and_config():
    assert parse_generate({"text": "x", "normalize": False}).normalize is False
    with pytest.raises(ValidationError):
        parse_generate({"text": "x", "normalize": "no"})
    query = parse_query(
        {"mode": "stream", "text_stream": "true", "early_cut": "false"}, ("mode", "text_stream", "early_cut")
    )
    config = parse_stream_config(query, StreamConfig())
    assert config.text_stream and not config.early_cut
    assert config.public()["text_stream"] is True
    with pytest.raises(ValidationError, match="text_stream"):
        parse_stream_config({"text_stream": True}, StreamConfig())
    assert "text_stream" not in StreamConfig().public()
