"""Streaming audio encoders: float chunks in, encoded bytes out, chunk by chunk, so an HTTP answer keeps streaming.

`pcm` is OpenAI's raw format (24 kHz, 16-bit little-endian, mono, no header). Every other format goes through PyAV
(FFmpeg's libraries) into a write-only sink: FFmpeg's muxers then work in their non-seekable mode, which is exactly
a live stream (WAV's sizes are 0xFFFFFFFF "unknown", FLAC's STREAMINFO has 0 total samples, MP3 has no Xing
header), and `encode(chunk)` returns whatever the muxer has written so far. Opus runs at 48 kHz (what Ogg/Opus
decoders play back at); the 24 kHz chunks are resampled with soxr's streaming resampler, so chunk borders leave no
seam. Nothing is written before the first chunk is encoded, so the first bytes a client gets carry sound.

A chunk may hold up to 90 s of audio (max_chunk_frames), so callers run `encode` in the bounded thread pool
(proxy/render/audio.py); PyAV is imported with this module, at start-up, not on the first request.
"""

from __future__ import annotations

import av
import numpy as np
import soxr

from csm_tts import SAMPLE_RATE
from proxy.formats import AudioFormat
from proxy.render.pcm import to_pcm16

# Samples per frame handed to the encoder (~0.2 s at 24 kHz).
ENCODE_PIECE = 4608


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
        self._resampler = None
        if fmt.sample_rate != SAMPLE_RATE:  # raw PCM or an encoded format at another rate (ElevenLabs' formats)
            self._resampler = soxr.ResampleStream(SAMPLE_RATE, fmt.sample_rate, 1, dtype="float32", quality="HQ")
        self._container = self._stream = self._sink = None
        if fmt.container is None:
            return
        self._sink = _Sink()
        # bitexact: no encoder tag and a fixed Ogg serial, so the same audio always gives the same bytes.
        options = {"fflags": "+bitexact", **dict(fmt.container_options)}
        self._container = av.open(self._sink, mode="w", format=fmt.container, options=options)
        self._stream = self._container.add_stream(fmt.codec, rate=fmt.sample_rate, layout="mono")
        if fmt.bit_rate:
            self._stream.bit_rate = fmt.bit_rate

    def encode(self, audio: np.ndarray) -> bytes:
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if self._resampler is not None:
            audio = self._resampler.resample_chunk(audio)
        if self._container is None:
            return to_pcm16(audio).tobytes()
        self._write(audio)
        return self._sink.take()

    def finish(self) -> bytes:
        tail = np.zeros(0, np.float32)
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(tail, last=True)
        if self._container is None:
            return to_pcm16(tail).tobytes()
        if tail.size:
            self._write(tail)
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
        # PyAV re-frames to the codec's frame size (1152 for MP3, 1024 for AAC, 960 for Opus) itself, so the pieces
        # change no byte of the output; they let the GIL change hands (one 90 s frame held it for ~40 ms).
        pcm = to_pcm16(audio)
        for start in range(0, pcm.size, ENCODE_PIECE):
            frame = av.AudioFrame.from_ndarray(
                pcm[start : start + ENCODE_PIECE].reshape(1, -1), format="s16", layout="mono"
            )
            frame.sample_rate = self.format.sample_rate
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
