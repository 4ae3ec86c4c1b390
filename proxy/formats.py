"""The audio formats the API answers in (OpenAI's `response_format` names), as data: content type, FFmpeg muxer and
codec, rate. The encoders (proxy/render/encoders.py) read them; the parse layer checks names against them."""

from __future__ import annotations

from dataclasses import dataclass

from csm_tts import SAMPLE_RATE


@dataclass(frozen=True)
class AudioFormat:
    name: str
    content_type: str
    extension: str
    container: str | None = None  # FFmpeg muxer; None: raw PCM
    codec: str | None = None
    sample_rate: int = SAMPLE_RATE
    bit_rate: int | None = None
    container_options: tuple[tuple[str, str], ...] = ()


# OpenAI's `response_format` values. Bit rates suit 24 kHz mono speech.
FORMATS = {
    f.name: f
    for f in (
        AudioFormat("mp3", "audio/mpeg", "mp3", "mp3", "libmp3lame", bit_rate=64_000),
        # Ogg pages are flushed every 20 ms of audio instead of FFmpeg's default 1 s, so Opus streams too.
        AudioFormat(
            "opus",
            "audio/ogg; codecs=opus",
            "opus",
            "ogg",
            "libopus",
            sample_rate=48_000,
            bit_rate=32_000,
            container_options=(("page_duration", "20000"),),
        ),
        AudioFormat("aac", "audio/aac", "aac", "adts", "aac", bit_rate=64_000),
        AudioFormat("flac", "audio/flac", "flac", "flac", "flac"),
        AudioFormat("wav", "audio/wav", "wav", "wav", "pcm_s16le"),
        AudioFormat("pcm", "audio/pcm", "pcm"),
    )
}
RESPONSE_FORMATS = tuple(FORMATS)  # mp3, opus, aac, flac, wav, pcm (OpenAI's order)
# Raw PCM frames of the WebSocket stream (little-endian 16-bit integers or 32-bit floats), beside the encoded formats.
SAMPLE_FORMATS = ("s16le", "f32le")
