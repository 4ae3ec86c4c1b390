"""Audio encodings the API returns: WAV (PCM_16, via soundfile) and raw PCM frames (s16le / f32le).

The model's float samples can exceed [-1, 1] (random weights peak around 3); PCM_16 clips them rather than letting
the integer conversion wrap around. Callers run these through the bounded thread pool (proxy/render/offload.py):
a 90 s clip is ~4 MB of WAV and ~6 MB of base64.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile

from csm_tts import SAMPLE_RATE

# Samples converted per numpy call: a 90 s chunk in one call held the GIL for ~10 ms.
PCM_SLICE = 1 << 16


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    samples = np.asarray(audio, dtype=np.float32).reshape(-1)
    out = np.empty(samples.size, "<i2")
    for i in range(0, samples.size, PCM_SLICE):
        part = samples[i : i + PCM_SLICE]
        out[i : i + PCM_SLICE] = np.round(np.clip(part, -1.0, 1.0) * 32767.0)
    return out


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
