"""Streaming audio encoders: float chunks in, encoded bytes out, chunk by chunk, so an HTTP answer keeps streaming.

`pcm` is OpenAI's raw format (24 kHz, 16-bit little-endian, mono, no header). Every other format goes through PyAV
(FFmpeg's libraries) into a write-only sink: FFmpeg's muxers then work in their non-seekable mode, which is exactly
a live stream (WAV's sizes are 0xFFFFFFFF "unknown", FLAC's STREAMINFO has 0 total samples, MP3 has no Xing
header), and `encode(chunk)` returns whatever the muxer has written so far. Opus runs at 48 kHz (what Ogg/Opus
decoders play back at); the 24 kHz chunks are resampled with soxr's streaming resampler, so chunk borders leave no
seam. Nothing is written before the first chunk is encoded, so the first bytes a client gets carry sound.

Encoding one chunk (at most 800 ms) costs a few milliseconds, so callers run it inline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from csm_tts import SAMPLE_RATE
from proxy.audio import to_pcm16


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


class _Sink:
    """A write-only file for FFmpeg: no seek, so every muxer streams."""

    def __init__(self):
        self.buffer = bytearray()

    def write(self, data) -> int:
        self.buffer += data
        return len(data)

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


class StreamEncoder:
    """`encode(chunk)` -> bytes for each 24 kHz float chunk, then `finish()` -> the tail. The bytes of one stream
    concatenate to one complete file. `close()` releases FFmpeg's state early (a client that went away)."""

    def __init__(self, fmt: AudioFormat):
        self.format = fmt
        self.samples_in = 0
        self._resampler = None
        self._container = self._stream = self._sink = None
        if fmt.container is None:
            return
        import av  # only the compressed formats need FFmpeg

        self._sink = _Sink()
        # bitexact: no encoder tag and a fixed Ogg serial, so the same audio always gives the same bytes.
        options = {"fflags": "+bitexact", **dict(fmt.container_options)}
        self._container = av.open(self._sink, mode="w", format=fmt.container, options=options)
        self._stream = self._container.add_stream(fmt.codec, rate=fmt.sample_rate, layout="mono")
        if fmt.bit_rate:
            self._stream.bit_rate = fmt.bit_rate
        if fmt.sample_rate != SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(SAMPLE_RATE, fmt.sample_rate, 1, dtype="float32", quality="HQ")

    def encode(self, audio: np.ndarray) -> bytes:
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        self.samples_in += audio.size
        if self._container is None:
            return to_pcm16(audio).tobytes()
        if self._resampler is not None:
            audio = self._resampler.resample_chunk(audio)
        self._write(audio)
        return self._sink.take()

    def finish(self) -> bytes:
        if self._container is None:
            return b""
        if self._resampler is not None:
            self._write(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        for packet in self._stream.encode(None):  # flush the encoder's delay
            self._container.mux(packet)
        self._container.close()
        self._container = None
        return self._sink.take()

    def close(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            finally:
                self._container = None

    def _write(self, audio: np.ndarray) -> None:
        if audio.size == 0:
            return
        import av

        frame = av.AudioFrame.from_ndarray(to_pcm16(audio).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.format.sample_rate
        # PyAV re-frames to the codec's frame size (1152 for MP3, 1024 for AAC, 960 for Opus) itself.
        for packet in self._stream.encode(frame):
            self._container.mux(packet)


def encode_whole(audio: np.ndarray, fmt: AudioFormat) -> bytes:
    """One complete file of `audio` (tests, non-streaming callers)."""
    encoder = StreamEncoder(fmt)
    return encoder.encode(audio) + encoder.finish()
