"""Whole-clip reference encoder (the tests' oracle): the streaming algorithm computed at once over a complete clip."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import soxr
import torch
import torch.nn.functional as F

from csm_tts import SAMPLE_RATE
from csm_tts.watermark.dsp import (
    RESAMPLER_QUALITY,
    CausalMean,
    batch_norm,
    check_lookahead,
    envelope,
    input_gain,
    layer_plan,
    reshape,
    scaled_message,
    spectrum,
    synthesis,
    whole_frames,
)
from csm_tts.watermark.streaming import StreamingWatermarker
from csm_tts.watermark.weights import DEFAULT_MESSAGE_SDR, WatermarkModel


def _whole_network(
    model: WatermarkModel, plan, x: torch.Tensor, extra: torch.Tensor, n_encoder: int, statistics: str
) -> torch.Tensor:
    for i, (layer, waits) in enumerate(plan):
        if i == n_encoder:
            x = torch.cat([x, extra], dim=1)
        pad = (1, 1) if waits else ((1, 0) if layer.time_taps == 2 else (0, 0))
        pre = layer.gated(F.pad(x, pad))
        x = batch_norm(
            layer, pre, CausalMean((2, layer.bn_weight.shape[0]), model.device) if statistics == "causal" else None
        )
    return x


def encode_clip(
    model: WatermarkModel,
    audio: np.ndarray,
    key: Sequence[int],
    *,
    lookahead_frames: int | None = None,
    message_sdr: float = DEFAULT_MESSAGE_SDR,
    sample_rate: int = SAMPLE_RATE,
    statistics: str = "causal",
) -> np.ndarray:
    """Whole-clip reference: the same algorithm as StreamingWatermarker, computed at once over a complete clip.

    lookahead_frames None: every layer sees the real next frame (the network's full receptive field).
    statistics "causal": the streaming encoder's running statistics; "clip": silentcipher's whole-clip statistics
    (then, at the model's own rate, this equals `encode_wav` of the library).
    """
    if statistics not in ("causal", "clip"):
        raise ValueError("statistics must be 'causal' or 'clip'")
    m = model
    audio = np.ascontiguousarray(np.asarray(audio, dtype=np.float32).reshape(-1))
    if audio.size == 0:
        return audio.copy()
    resample = sample_rate != m.sample_rate
    if resample:
        x = soxr.ResampleStream(
            sample_rate, m.sample_rate, 1, dtype="float32", quality=RESAMPLER_QUALITY
        ).resample_chunk(audio, last=True)
    else:
        x = audio
    n = x.size
    half = m.n_fft // 2
    with torch.inference_mode():
        magnitude, phasor = spectrum(m, whole_frames(m, x))
        t_frames = magnitude.shape[1]
        ends = np.minimum(np.arange(t_frames) * m.hop + half, n)
        squares = np.concatenate([[0.0], np.cumsum(x.astype(np.float64) ** 2)])
        if statistics == "causal":
            powers = squares[ends] / ends
            carrier_power = torch.cumsum((magnitude.double() ** 2).sum(0), 0) / (
                magnitude.shape[0] * torch.arange(1, t_frames + 1, device=m.device)
            )
        else:
            powers = np.full(t_frames, squares[-1] / n)
            carrier_power = torch.full(
                (t_frames,), float((magnitude.double() ** 2).mean()), dtype=torch.float64, device=m.device
            )
        if statistics == "clip" and squares[-1] == 0:
            return audio.copy()  # encode_wav skips silent clips
        gains = torch.tensor([input_gain(p) for p in powers], dtype=torch.float32, device=m.device)
        carrier = (magnitude * gains)[None, None]
        symbols = torch.arange(t_frames, device=m.device) % m.config.message_len
        extra = torch.cat([carrier, model.message_frames(key)[symbols].T[None, None]], dim=1)
        plan = layer_plan(m, check_lookahead(m, lookahead_frames))
        h = _whole_network(m, plan, carrier, extra, len(m.encoder), statistics)[0, 0]
        message = scaled_message(m, h, magnitude, torch.sqrt(carrier_power).float(), gains, message_sdr)
        reshaped = reshape(m, magnitude, message)
        frames = synthesis(m, (reshaped - magnitude) * phasor)
        total = (t_frames - 1) * m.hop + m.n_fft
        ola = torch.zeros(total, device=m.device)
        for t in range(t_frames):
            ola[t * m.hop : t * m.hop + m.n_fft] += frames[t]
        positions = torch.arange(n, device=m.device) % m.hop
        delta = (ola[half : half + n] / envelope(m)[positions]).cpu().numpy()
    if resample:
        delta = soxr.ResampleStream(
            m.sample_rate, sample_rate, 1, dtype="float32", quality=RESAMPLER_QUALITY
        ).resample_chunk(delta.astype(np.float32), last=True)
    delta = np.concatenate([delta, np.zeros(max(audio.size - delta.size, 0), np.float32)])[: audio.size]
    return audio + delta


def encode_stream(model: WatermarkModel, chunks, key: Sequence[int], **options) -> np.ndarray:
    """Convenience: watermark an iterable of chunks with one StreamingWatermarker and return the whole output."""
    watermarker = StreamingWatermarker(model, key, **options)
    parts = [watermarker.push(chunk) for chunk in chunks]
    parts.append(watermarker.flush())
    return np.concatenate(parts)
