"""Audio encodings the API returns: WAV (PCM_16, via soundfile) and raw PCM frames (s16le / f32le).

The model's float samples can exceed [-1, 1] (random weights peak around 3); PCM_16 clips them rather than letting
the integer conversion wrap around. WAV/base64 encoding of long clips runs in a worker thread so the event loop keeps
serving other streams.
"""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import soundfile

from csm_tts import SAMPLE_RATE


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    samples = np.asarray(audio, dtype=np.float32).reshape(-1)
    return np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")


def pcm_bytes(audio: np.ndarray, sample_format: str) -> bytes:
    if sample_format == "s16le":
        return to_pcm16(audio).tobytes()
    if sample_format == "f32le":
        return np.asarray(audio, dtype="<f4").reshape(-1).tobytes()
    raise ValueError(f"unknown sample format {sample_format!r}")


def wav_bytes(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, to_pcm16(audio), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def wav_base64(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> str:
    return base64.b64encode(wav_bytes(audio, sample_rate)).decode("ascii")


async def run_sized(function, audio: np.ndarray, offload_samples: int):
    """`function(audio)` inline for short clips, in the default executor for long ones."""
    if audio.size <= offload_samples:
        return function(audio)
    return await asyncio.get_running_loop().run_in_executor(None, function, audio)
