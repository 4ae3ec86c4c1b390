"""Signal processing shared by the streaming encoder, the whole-clip reference and the detector."""

from __future__ import annotations

import math

import numpy as np
import torch

from csm_tts.watermark.weights import AVERAGE_ENERGY_VCTK, GatedLayer, WatermarkModel

RESAMPLER_QUALITY = "HQ"  # flat to 11 kHz (the message band) at 24 kHz; librosa's default "soxr_hq"


def spectrum(model: WatermarkModel, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude and unit phasor of windowed frames (T, n_fft) -> (n_bins, T) each, as silentcipher's STFT.transform
    (a zero bin gets magnitude 0 and phase 0)."""
    spec = torch.fft.rfft(segments * model.window, dim=-1).T
    magnitude = spec.abs()
    phase = torch.atan2(spec.imag, spec.real)
    return magnitude, torch.polar(torch.ones_like(magnitude), phase)


def synthesis(model: WatermarkModel, delta: torch.Tensor) -> torch.Tensor:
    """Windowed inverse FFT of each frame's change (n_bins, T) -> (T, n_fft), ready for overlap-add."""
    return torch.fft.irfft(delta.T, n=model.n_fft, dim=-1) * model.window


def envelope(model: WatermarkModel) -> torch.Tensor:
    """Sum of squared windows of the two frames covering each sample of a hop (what torch.istft divides by)."""
    w2 = model.window**2
    return w2[: model.hop] + w2[model.hop :]


def _message_scale(model: WatermarkModel, h: torch.Tensor, message_sdr: float) -> torch.Tensor:
    """CarrierDecoder's tail for (n_bins, T): |h| (ensure_negative_message), zero above the message band, and
    each frame scaled to rms 10^(-sdr/20) over all bins."""
    c = model.config
    if c.ensure_negative_message:
        h = h.abs()
    h = h.clone()
    h[c.message_band_size :] = 0
    if not c.no_normalization:
        rms = torch.sqrt(torch.mean(h**2, dim=0, keepdim=True))
        h = torch.where(rms > 0, h / torch.where(rms > 0, rms, 1.0), torch.zeros_like(h)) / 10 ** (message_sdr / 20)
    return h


def reshape(model: WatermarkModel, magnitude: torch.Tensor, message: torch.Tensor) -> torch.Tensor:
    """The watermarked magnitude, as encode_wav's three variants (message and magnitude in the same scale)."""
    c = model.config
    if c.ensure_negative_message:
        return torch.relu(magnitude - message)
    if c.ensure_constrained_message:
        return magnitude + torch.maximum(torch.minimum(message, magnitude), -magnitude)
    return torch.abs(message + magnitude)


def layer_plan(model: WatermarkModel, lookahead_frames: int) -> list[tuple[GatedLayer, bool]]:
    """(layer, waits_for_next_frame) for encoder then decoder: the first `lookahead_frames` 3-tap layers keep their
    look-ahead tap, the others have it folded into the current one (frame t+1 replaced by frame t: no delay)."""
    plan = []
    budget = lookahead_frames
    for layer in (*model.encoder, *model.decoder):
        if layer.time_taps == 3 and budget > 0:
            plan.append((layer, True))
            budget -= 1
        else:
            plan.append((layer.folded(), False))
    return plan


def check_lookahead(model: WatermarkModel, lookahead_frames: int | None) -> int:
    limit = model.receptive_field_frames
    if lookahead_frames is None:
        return limit
    if not 0 <= lookahead_frames <= limit:
        raise ValueError(f"lookahead_frames must be 0..{limit} for this model, got {lookahead_frames}")
    return int(lookahead_frames)


def padding(n: int, n_fft: int) -> int:
    """silentcipher's STFT pads the clip with zeros to the next multiple of n_fft (a full n_fft if already one)."""
    return n_fft - n % n_fft


def frame_count(n: int, model: WatermarkModel) -> int:
    """Frames silentcipher computes for n samples: the padded clip, centred (reflect) frames every hop."""
    return 1 + (n + padding(n, model.n_fft)) // model.hop


def input_gain(power: float) -> float:
    """encode_wav scales the input to the VCTK power before the networks run (only their input depends on it)."""
    return math.sqrt(AVERAGE_ENERGY_VCTK / power) if power > 0 else 1.0


class CausalMean:
    """Running mean of per-frame sums (float64): the causal counterpart of a mean over the whole clip."""

    def __init__(self, shape=(), device="cpu"):
        self.total = torch.zeros(shape, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, sums: torch.Tensor, count_per_frame: int) -> torch.Tensor:
        """sums: (*shape, T) per-frame sums. Returns the running mean after each frame, (*shape, T)."""
        cumulative = self.total[..., None] + torch.cumsum(sums.double(), dim=-1)
        counts = self.count + count_per_frame * torch.arange(1, sums.shape[-1] + 1, device=sums.device)
        self.total = cumulative[..., -1].clone()
        self.count = int(counts[-1])
        return cumulative / counts


def batch_norm(layer: GatedLayer, pre: torch.Tensor, stats: CausalMean | None) -> torch.Tensor:
    """BatchNorm of pre-activations (1, C, F, T).

    stats None: the statistics of this call (what silentcipher does: its modules stay in training mode).
    causal: each frame is normalised with the mean and (biased) variance of every frame of the stream up to and
    including itself, over all frequency bins, so no frame's value changes once computed.
    """
    if stats is None:
        mean = pre.mean(dim=(0, 2, 3))
        var = pre.var(dim=(0, 2, 3), unbiased=False)
        return layer.normalise(pre, mean, var)
    x = pre[0].double()
    sums = torch.stack([x.sum(dim=1), (x * x).sum(dim=1)])  # (2, C, T)
    moments = stats.update(sums, pre.shape[2])
    mean, var = moments[0], torch.clamp(moments[1] - moments[0] ** 2, min=0)
    return layer.normalise(pre, mean.float(), var.float())


def scaled_message(
    model: WatermarkModel,
    h: torch.Tensor,
    magnitude: torch.Tensor,
    carrier_rms: torch.Tensor,
    gain: torch.Tensor,
    message_sdr: float,
) -> torch.Tensor:
    """The message magnitude per bin and frame, in the scale of the (unscaled) carrier magnitude."""
    message = _message_scale(model, h, message_sdr)
    c = model.config
    if c.frame_level_normalization:
        return message * torch.sqrt(torch.mean(magnitude**2, dim=0, keepdim=True))
    if c.utterance_level_normalization:
        return message * carrier_rms
    return message / gain  # not normalised: the message was added in the scaled domain


def whole_frames(model: WatermarkModel, x: np.ndarray) -> torch.Tensor:
    """All analysis windows of a clip as silentcipher frames it: (T, n_fft)."""
    half = model.n_fft // 2
    padded = np.concatenate([x, np.zeros(padding(x.size, model.n_fft), np.float32)])
    signal = np.pad(padded, (half, half), mode="reflect")
    t = frame_count(x.size, model)
    index = np.arange(t)[:, None] * model.hop + np.arange(model.n_fft)[None]
    return torch.from_numpy(np.ascontiguousarray(signal[index])).to(model.device)
