"""Detection: the message symbols and key read back from audio (silentcipher's `decode_wav`), and the SDR."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import soxr
import torch
import torch.nn.functional as F

from csm_tts import SAMPLE_RATE
from csm_tts.watermark.dsp import RESAMPLER_QUALITY, batch_norm, spectrum, whole_frames
from csm_tts.watermark.weights import AVERAGE_ENERGY_VCTK, WatermarkModel


def message_symbols(model: WatermarkModel, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The message symbol the decoder reads in each STFT frame (silentcipher's `decode_wav` up to its argmax)."""
    m = model
    audio = np.ascontiguousarray(np.asarray(audio, dtype=np.float32).reshape(-1))
    x = soxr.resample(audio, sample_rate, m.sample_rate, RESAMPLER_QUALITY) if sample_rate != m.sample_rate else audio
    power = float(np.mean(x.astype(np.float64) ** 2)) if x.size else 0.0
    if power == 0:
        return np.zeros(0, np.int64)
    x = (x * np.sqrt(AVERAGE_ENERGY_VCTK / power)).astype(np.float32)
    with torch.inference_mode():
        magnitude, _ = spectrum(m, whole_frames(m, x))
        h = magnitude[None, None, : m.config.message_band_size]
        for layer in m.message_decoder:
            h = batch_norm(layer, layer.gated(F.pad(h, (1, 1))), None)
        weight, bias = m.message_decoder_linear
        scores = torch.einsum("bcft,f->bct", h, weight[0]) + bias[0]  # (1, message_dim, T)
        return scores[0].argmax(dim=0).cpu().numpy()


def key_from_symbols(symbols: np.ndarray, message_len: int, message_dim: int) -> tuple[tuple[int, ...] | None, float]:
    """The key read from per-frame symbols: the majority symbol of each position over whole message periods, rotated
    to start after the end symbol (0). Returns (key or None, confidence = share of symbols agreeing with it)."""
    periods = symbols.size // message_len
    if periods == 0:
        return None, 0.0
    values = symbols[: periods * message_len].reshape(periods, message_len)
    # Majority per position; ties go to the smallest symbol, as scipy.stats.mode does in silentcipher.
    mode = np.array([np.bincount(column, minlength=message_dim).argmax() for column in values.T])
    confidence = float(np.mean(values == mode[None]))
    ends = np.flatnonzero(mode == 0)
    if ends.size != 1:  # no end symbol, or several: no message
        return None, confidence
    end = int(ends[0])
    data = np.concatenate([mode[end + 1 :], mode[:end]]) - 1
    bits = "".join(f"{int(v):02b}" for v in data)
    return tuple(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)), confidence


@dataclass(frozen=True)
class Detection:
    key: tuple[int, ...] | None  # the decoded key, None when no message could be read
    confidence: float  # share of symbols agreeing with the majority over the message periods


def decode(model: WatermarkModel, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Detection:
    """silentcipher's `decode_wav` without its phase-shift search: the audio must start on the encoder's frame grid
    (a multiple of the hop at 44.1 kHz from the start of the stream), which is where the service's output starts."""
    symbols = message_symbols(model, audio, sample_rate)
    key, confidence = key_from_symbols(symbols, model.config.message_len, model.config.message_dim)
    return Detection(key, confidence)


def sdr_db(reference: np.ndarray, processed: np.ndarray) -> float:
    """Signal-to-distortion ratio in dB (silentcipher's definition)."""
    reference = np.asarray(reference, dtype=np.float64)
    noise = reference - np.asarray(processed, dtype=np.float64)
    noise_power = float(np.mean(noise**2))
    return math.inf if noise_power == 0 else 10 * math.log10(float(np.mean(reference**2)) / noise_power)
