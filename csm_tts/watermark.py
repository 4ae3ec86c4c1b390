"""Streaming silentcipher watermarking (Sony's 44.1 kHz model) for 24 kHz TTS audio.

silentcipher's `encode_wav` works on whole clips: it normalises the power over the clip, its BatchNorm layers use the
statistics of each call, its message framing restarts at every call and its STFT is a process-wide singleton with
mutable state. `StreamingWatermarker` runs the same networks (silentcipher's own `Encoder` / `CarrierDecoder`
modules and weights) frame by frame over an unbounded stream instead:

* 24 kHz -> 44.1 kHz with a streaming soxr resampler (HQ, the quality librosa uses for Sesame's pipeline).
* Our own STFT (n_fft 4096, hop 2048, periodic Hann, reflect padding at the start and the library's zero + reflect
  padding at the end), computed one frame at a time as soon as its window is complete; the library's singleton STFT
  is never used, so watermarkers on many threads share nothing mutable.
* The message position follows the global STFT frame index of the stream (frame t carries symbol t mod 21), so the
  message phase never restarts at a chunk border.
* Every whole-clip statistic has a causal counterpart, computed over everything the stream has produced so far
  (see `_CausalMean` and the comments marked "causal:").
* The 3x3 convolutions look one frame ahead. `lookahead_frames` (0-6 for the 44.1 kHz model) says how many of them
  wait for the real next frame; the others use the current frame in its place (their future tap is folded into the
  current one), which adds no delay. With lookahead_frames = receptive field the output equals `encode_clip`, the
  whole-clip reference with the same causal statistics.
* Only the watermark is resampled back: the output is `input + resample_24k(marked_44k - input_44k)`, so the
  original samples pass untouched (no round-trip low-pass) and silence stays exactly silent.

Everything a frame's output depends on is fixed when that frame is computed, so the output does not depend on how
the input is chunked. Weights load from a local directory only: the library's hub fallback (`get_model`) is never
called, and its `server.py` (which also imports pydub at module level) is never imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr
import torch
import torch.nn.functional as F
import yaml

SAMPLE_RATE = 24000
DEFAULT_MESSAGE_SDR = 36.0  # Sesame's setting (the checkpoint's own hparams say 47)
DEFAULT_LOOKAHEAD_FRAMES = 0
RESAMPLER_QUALITY = "HQ"  # flat to 11 kHz (the message band) at 24 kHz; librosa's default "soxr_hq"
CHECKPOINT_FILES = ("hparams.yaml", "enc_c.ckpt", "dec_c.ckpt", "dec_m_0.ckpt")
# Power of the VCTK corpus silentcipher was trained on; input is scaled to it before the networks run.
AVERAGE_ENERGY_VCTK = 0.002837200844477648
HOW_TO_GET_WEIGHTS = (
    "get the real weights with `python scripts/download_weights.py` (sony/silentcipher, 44_1_khz/73999_iteration) "
    "or write random test weights with `python scripts/make_tiny_watermark_checkpoint.py DIR`"
)

# The hparams of sony/silentcipher 44_1_khz/73999_iteration that inference reads (the file has training keys too).
HPARAMS_44K: dict[str, object] = {
    "model_type": "n_msg",
    "SR": 44100,
    "N_FFT": 4096,
    "HOP_LENGTH": 2048,
    "message_band_size": 1024,
    "message_dim": 5,
    "message_len": 21,
    "message_sdr": 47,
    "n_messages": 1,
    "enc_n_layers": 3,
    "dec_c_n_layers": 4,
    "ensure_negative_message": True,
    "ensure_constrained_message": False,
    "no_normalization": False,
    "frame_level_normalization": False,
    "utterance_level_normalization": True,
}


class WatermarkWeightsMissing(FileNotFoundError):
    pass


def _silentcipher_networks():
    """silentcipher's network definitions (silentcipher/model.py), without running the package's __init__.

    `import silentcipher` imports server.py, which needs pydub (+ ffmpeg, warns at import) and whose `get_model`
    downloads from the hub when a path is missing. model.py needs only torch, so it is loaded on its own.
    """
    name = "csm_tts._silentcipher_model"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("silentcipher")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("silentcipher is not installed: pip install -c constraints.txt --no-deps silentcipher")
    path = Path(list(spec.submodule_search_locations)[0]) / "model.py"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def _networks(config: argparse.Namespace):
    sc = _silentcipher_networks()
    enc_c = sc.Encoder(n_layers=config.enc_n_layers, message_dim=config.message_dim, out_dim=32,
                       message_band_size=config.message_band_size, n_fft=config.N_FFT)
    dec_c = sc.CarrierDecoder(config=config, conv_dim=32 * 3, n_layers=config.dec_c_n_layers,
                              message_band_size=config.message_band_size)
    dec_m = [sc.MsgDecoder(message_dim=config.message_dim, message_band_size=config.message_band_size)
             for _ in range(config.n_messages)]
    return enc_c, dec_c, dec_m


def write_random_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Random weights in silentcipher's exact layout (44.1 kHz model): for tests and the demo, never for detection.

    Deterministic for a seed. The caller writes its own completion stamp.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = argparse.Namespace(**HPARAMS_44K)
    torch.manual_seed(seed)
    enc_c, dec_c, dec_m = _networks(config)
    with torch.no_grad():  # BatchNorm affine parameters are 1/0 by default; vary them so tests exercise them
        for module in [enc_c, dec_c, *dec_m]:
            for sub in module.modules():
                if isinstance(sub, torch.nn.BatchNorm2d):
                    sub.weight.uniform_(0.5, 1.5)
                    sub.bias.uniform_(-0.2, 0.2)
    header = "# Random weights in the layout of sony/silentcipher 44_1_khz/73999_iteration (not for detection).\n"
    (out / "hparams.yaml").write_text(header + yaml.safe_dump(HPARAMS_44K, sort_keys=True))
    # The released checkpoints were saved from DataParallel: keys carry a `module.` prefix, which loading strips.
    torch.save({f"module.{k}": v for k, v in enc_c.state_dict().items()}, out / "enc_c.ckpt")
    torch.save({f"module.{k}": v for k, v in dec_c.state_dict().items()}, out / "dec_c.ckpt")
    for i, m in enumerate(dec_m):
        torch.save({f"module.{k}": v for k, v in m.state_dict().items()}, out / f"dec_m_{i}.ckpt")
    return out


# --------------------------------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class _GatedLayer:
    """silentcipher's `Layer`: BatchNorm(conv(x) * sigmoid(gate(x))), conv and gate stacked into one convolution."""

    weight: torch.Tensor  # (2 * out, in, 3 or 1 (freq), time taps)
    bias: torch.Tensor  # (2 * out,)
    bn_weight: torch.Tensor
    bn_bias: torch.Tensor
    eps: float

    @property
    def time_taps(self) -> int:
        return self.weight.shape[-1]

    @property
    def freq_pad(self) -> int:
        return self.weight.shape[-2] // 2

    @staticmethod
    def from_module(layer) -> "_GatedLayer":
        return _GatedLayer(
            weight=torch.cat([layer.conv.weight, layer.gate.weight]).detach().float(),
            bias=torch.cat([layer.conv.bias, layer.gate.bias]).detach().float(),
            bn_weight=layer.bn.weight.detach().float(),
            bn_bias=layer.bn.bias.detach().float(),
            eps=float(layer.bn.eps),
        )

    def folded(self) -> "_GatedLayer":
        """The same layer without its look-ahead tap: frame t+1 is replaced by frame t (taps t and t+1 summed)."""
        if self.time_taps != 3:
            return self
        w = self.weight
        weight = torch.cat([w[..., 0:1], w[..., 1:2] + w[..., 2:3]], dim=-1).contiguous()
        return _GatedLayer(weight, self.bias, self.bn_weight, self.bn_bias, self.eps)

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-BatchNorm activations of every complete window of x (1, in, F, T): no time padding here."""
        y = F.conv2d(x, self.weight, self.bias, padding=(self.freq_pad, 0))
        out = y.shape[1] // 2
        return y[:, :out] * torch.sigmoid(y[:, out:])

    def normalise(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """BatchNorm with given per-channel statistics: mean/var are (C,) or (C, T) (per frame)."""
        if mean.dim() == 1:
            mean, var = mean[:, None], var[:, None]
        scale = self.bn_weight[:, None, None] / torch.sqrt(var[:, None, :] + self.eps)
        return (x - mean[None, :, None, :]) * scale[None] + self.bn_bias[None, :, None, None]


@dataclass(frozen=True)
class WatermarkModel:
    """Loaded weights and hparams: read-only, shared by every stream (and thread) of a process."""

    config: argparse.Namespace
    model_dir: Path
    device: torch.device
    encoder: tuple[_GatedLayer, ...]  # enc_c.main
    decoder: tuple[_GatedLayer, ...]  # dec_c.main; the first layer's input channels are folded (see load)
    message_weight: torch.Tensor  # enc_c.linear: (band, message_dim)
    message_bias: torch.Tensor
    message_decoder: tuple[_GatedLayer, ...]  # dec_m[0].main (detection only)
    message_decoder_linear: tuple[torch.Tensor, torch.Tensor]
    window: torch.Tensor

    @property
    def sample_rate(self) -> int:
        return int(self.config.SR)

    @property
    def n_fft(self) -> int:
        return int(self.config.N_FFT)

    @property
    def hop(self) -> int:
        return int(self.config.HOP_LENGTH)

    @property
    def receptive_field_frames(self) -> int:
        """How many layers look one frame ahead: the look-ahead that reproduces the whole-clip network exactly."""
        return sum(1 for layer in (*self.encoder, *self.decoder) if layer.time_taps == 3)

    def message_frames(self, key: Sequence[int]) -> torch.Tensor:
        """The encoded message for each position of a message period: (message_len, n_bins).

        silentcipher's `letters_encoding`: the 5 bytes as 20 two-bit symbols (+1), then the end symbol 0, one-hot;
        `Encoder.transform_message` maps each one-hot column to the message band and zero-pads to n_fft/2+1 bins.
        """
        key = [int(v) for v in key]
        if len(key) * 4 != self.config.message_len - 1 or not all(0 <= v <= 255 for v in key):
            raise ValueError(f"a key is {(self.config.message_len - 1) // 4} integers from 0 to 255")
        bits = "".join(f"{v:08b}" for v in key)
        symbols = [int(bits[i:i + 2], 2) + 1 for i in range(0, len(bits), 2)] + [0]
        one_hot = torch.eye(self.config.message_dim, device=self.device)[symbols]  # (message_len, message_dim)
        band = one_hot @ self.message_weight.T + self.message_bias  # (message_len, band)
        return F.pad(band, (0, self.n_fft // 2 + 1 - band.shape[1]))


def _find_model_dir(model_dir: Path) -> Path:
    """The folder holding hparams.yaml: `model_dir` itself, or the 44.1 kHz model inside a sony/silentcipher copy."""
    for candidate in (model_dir, model_dir / "44_1_khz" / "73999_iteration"):
        if (candidate / "hparams.yaml").is_file():
            return candidate
    return model_dir


def load_watermark_model(model_dir: str | Path, device: str = "cpu") -> WatermarkModel:
    """silentcipher's 44.1 kHz model from a local directory (never from the hub).

    The directory holds hparams.yaml, enc_c.ckpt, dec_c.ckpt, dec_m_0.ckpt (a copy of sony/silentcipher's
    `44_1_khz/73999_iteration`, or the repository root that contains it).
    """
    root = _find_model_dir(Path(model_dir).expanduser())
    missing = [name for name in CHECKPOINT_FILES if not (root / name).is_file()]
    if missing:
        raise WatermarkWeightsMissing(
            f"silentcipher weights not found in {root} (missing {', '.join(missing)}): {HOW_TO_GET_WEIGHTS}"
        )
    config = argparse.Namespace(**yaml.safe_load((root / "hparams.yaml").read_text()))
    if config.n_messages != 1:
        raise ValueError(f"{root}: only single-message models are supported (n_messages={config.n_messages})")
    if config.N_FFT != 2 * config.HOP_LENGTH:
        raise ValueError(f"{root}: the streaming STFT needs HOP_LENGTH = N_FFT / 2 (got {config.HOP_LENGTH}, "
                         f"{config.N_FFT})")
    enc_c, dec_c, dec_m = _networks(config)

    def state(name: str) -> dict:
        raw = torch.load(root / name, map_location="cpu", weights_only=True)
        return {k.removeprefix("module."): v for k, v in raw.items()}

    enc_c.load_state_dict(state("enc_c.ckpt"))
    dec_c.load_state_dict(state("dec_c.ckpt"))
    dec_m[0].load_state_dict(state("dec_m_0.ckpt"))
    dev = torch.device(device)

    encoder = [_GatedLayer.from_module(layer) for layer in enc_c.main]
    decoder = [_GatedLayer.from_module(layer) for layer in dec_c.main]
    # dec_c's input is [carrier features (32), carrier repeated 32 times, message repeated 32 times]: a convolution
    # over identical channels equals one over a single channel with their weights summed, so fold 96 inputs to 34.
    first = decoder[0]
    feature_dim = first.weight.shape[1] - 64
    w = first.weight
    folded = torch.cat([w[:, :feature_dim], w[:, feature_dim:feature_dim + 32].sum(1, keepdim=True),
                        w[:, feature_dim + 32:].sum(1, keepdim=True)], dim=1)
    decoder[0] = _GatedLayer(folded.contiguous(), first.bias, first.bn_weight, first.bn_bias, first.eps)

    def to(layer: _GatedLayer) -> _GatedLayer:
        return _GatedLayer(layer.weight.to(dev), layer.bias.to(dev), layer.bn_weight.to(dev), layer.bn_bias.to(dev),
                           layer.eps)

    message_layers = [m for m in dec_m[0].main if not isinstance(m, torch.nn.Dropout)]
    return WatermarkModel(
        config=config,
        model_dir=root,
        device=dev,
        encoder=tuple(to(layer) for layer in encoder),
        decoder=tuple(to(layer) for layer in decoder),
        message_weight=enc_c.linear.weight.detach().float().to(dev),
        message_bias=enc_c.linear.bias.detach().float().to(dev),
        message_decoder=tuple(to(_GatedLayer.from_module(layer)) for layer in message_layers),
        message_decoder_linear=(dec_m[0].linear.weight.detach().float().to(dev),
                                dec_m[0].linear.bias.detach().float().to(dev)),
        window=torch.hann_window(int(config.N_FFT), device=dev),
    )


# --------------------------------------------------------------------------------------------------------------
# Signal processing shared by the streaming encoder and the whole-clip reference


def _spectrum(model: WatermarkModel, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude and unit phasor of windowed frames (T, n_fft) -> (n_bins, T) each, as silentcipher's STFT.transform
    (a zero bin gets magnitude 0 and phase 0)."""
    spec = torch.fft.rfft(segments * model.window, dim=-1).T
    magnitude = spec.abs()
    phase = torch.atan2(spec.imag, spec.real)
    return magnitude, torch.polar(torch.ones_like(magnitude), phase)


def _synthesis(model: WatermarkModel, delta: torch.Tensor) -> torch.Tensor:
    """Windowed inverse FFT of each frame's change (n_bins, T) -> (T, n_fft), ready for overlap-add."""
    return torch.fft.irfft(delta.T, n=model.n_fft, dim=-1) * model.window


def _envelope(model: WatermarkModel) -> torch.Tensor:
    """Sum of squared windows of the two frames covering each sample of a hop (what torch.istft divides by)."""
    w2 = model.window ** 2
    return w2[: model.hop] + w2[model.hop:]


def _message_scale(model: WatermarkModel, h: torch.Tensor, message_sdr: float) -> torch.Tensor:
    """CarrierDecoder's tail for (n_bins, T): |h| (ensure_negative_message), zero above the message band, and
    each frame scaled to rms 10^(-sdr/20) over all bins."""
    c = model.config
    if c.ensure_negative_message:
        h = h.abs()
    h = h.clone()
    h[c.message_band_size:] = 0
    if not c.no_normalization:
        rms = torch.sqrt(torch.mean(h ** 2, dim=0, keepdim=True))
        h = torch.where(rms > 0, h / torch.where(rms > 0, rms, 1.0), torch.zeros_like(h)) / 10 ** (message_sdr / 20)
    return h


def _reshape(model: WatermarkModel, magnitude: torch.Tensor, message: torch.Tensor) -> torch.Tensor:
    """The watermarked magnitude, as encode_wav's three variants (message and magnitude in the same scale)."""
    c = model.config
    if c.ensure_negative_message:
        return torch.relu(magnitude - message)
    if c.ensure_constrained_message:
        return magnitude + torch.maximum(torch.minimum(message, magnitude), -magnitude)
    return torch.abs(message + magnitude)


def _layer_plan(model: WatermarkModel, lookahead_frames: int) -> list[tuple[_GatedLayer, bool]]:
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


def _check_lookahead(model: WatermarkModel, lookahead_frames: int | None) -> int:
    limit = model.receptive_field_frames
    if lookahead_frames is None:
        return limit
    if not 0 <= lookahead_frames <= limit:
        raise ValueError(f"lookahead_frames must be 0..{limit} for this model, got {lookahead_frames}")
    return int(lookahead_frames)


def _padding(n: int, n_fft: int) -> int:
    """silentcipher's STFT pads the clip with zeros to the next multiple of n_fft (a full n_fft if already one)."""
    return n_fft - n % n_fft


def _frame_count(n: int, model: WatermarkModel) -> int:
    """Frames silentcipher computes for n samples: the padded clip, centred (reflect) frames every hop."""
    return 1 + (n + _padding(n, model.n_fft)) // model.hop


def _gain(power: float) -> float:
    """encode_wav scales the input to the VCTK power before the networks run (only their input depends on it)."""
    return math.sqrt(AVERAGE_ENERGY_VCTK / power) if power > 0 else 1.0


class _CausalMean:
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


def _batch_norm(layer: _GatedLayer, pre: torch.Tensor, stats: _CausalMean | None) -> torch.Tensor:
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


# --------------------------------------------------------------------------------------------------------------
# Streaming encoder


class _LayerStream:
    """One gated layer over a growing sequence of frames, with its causal BatchNorm statistics."""

    def __init__(self, layer: _GatedLayer, waits: bool, device: torch.device):
        self.layer = layer
        self.waits = waits  # uses the real frame t+1 (computes frame t only once t+1 has arrived)
        self.context = 1 if layer.time_taps > 1 else 0  # frames kept from before the next output frame
        self.inputs: torch.Tensor | None = None  # (1, C, F, k): frames next_out - context .. received - 1
        self.next_out = 0
        self.stats = _CausalMean((2, layer.bn_weight.shape[0]), device)

    def push(self, frames: torch.Tensor, final: bool) -> torch.Tensor:
        """New input frames (1, C, F, n) -> newly completed output frames (1, C', F, m), m possibly 0."""
        if self.inputs is None:  # zero frame before the first one (the convolution's padding)
            zero = frames.new_zeros(*frames.shape[:-1], self.context)
            self.inputs = torch.cat([zero, frames], dim=-1)
        elif frames.shape[-1]:
            self.inputs = torch.cat([self.inputs, frames], dim=-1)
        x = self.inputs
        if self.waits and final:
            x = torch.cat([x, x.new_zeros(*x.shape[:-1], 1)], dim=-1)  # zero frame after the last one
        n_out = x.shape[-1] - self.layer.time_taps + 1
        if n_out <= 0:
            return torch.zeros(1, self.layer.bn_weight.shape[0], x.shape[2], 0, device=x.device)
        pre = self.layer.gated(x)
        self.next_out += n_out
        keep = self.inputs.shape[-1] - n_out
        self.inputs = self.inputs[..., self.inputs.shape[-1] - keep:] if keep > 0 else self.inputs[..., :0]
        return _batch_norm(self.layer, pre, self.stats)


class StreamingWatermarker:
    """Watermarks one stream of 24 kHz audio chunk by chunk; one instance per stream. Instances share only the
    read-only weights, so streams may run on different threads.

    push() returns the watermarked audio completed so far (it may be shorter than what came in: the STFT needs the
    next hop, soxr its filter length); flush() returns the rest. Concatenated, the output has the input's length
    and does not depend on how the input was chunked.
    """

    def __init__(self, model: WatermarkModel, key: Sequence[int], lookahead_frames: int = DEFAULT_LOOKAHEAD_FRAMES,
                 message_sdr: float = DEFAULT_MESSAGE_SDR, sample_rate: int = SAMPLE_RATE):
        m = self.model = model
        self.message_sdr = float(message_sdr)
        self.sample_rate = int(sample_rate)
        self.lookahead_frames = _check_lookahead(model, lookahead_frames)
        self._messages = model.message_frames(key)
        plan = _layer_plan(model, self.lookahead_frames)
        self._encoder = [_LayerStream(layer, waits, m.device) for layer, waits in plan[: len(m.encoder)]]
        self._decoder = [_LayerStream(layer, waits, m.device) for layer, waits in plan[len(m.encoder):]]
        self._bins = m.n_fft // 2 + 1
        resample = self.sample_rate != m.sample_rate
        self._up = soxr.ResampleStream(self.sample_rate, m.sample_rate, 1, dtype="float32",
                                       quality=RESAMPLER_QUALITY) if resample else None
        self._down = soxr.ResampleStream(m.sample_rate, self.sample_rate, 1, dtype="float32",
                                         quality=RESAMPLER_QUALITY) if resample else None
        # Input side (stream rate): samples received and not yet returned, and the watermark waiting for them.
        self._input = np.zeros(0, np.float32)
        self._delta = np.zeros(0, np.float32)
        self._received = 0
        self._returned = 0
        # Analysis (model rate): the signal from absolute sample _x_start on, and its first n_fft/2 + 1 samples
        # (frame 0 reflects them).
        self._x = np.zeros(0, np.float32)
        self._x_start = 0
        self._x_total = 0
        self._head = np.zeros(0, np.float32)
        self._power_sum = 0.0  # sum of squares of model-rate samples [0, _power_n)
        self._power_n = 0
        self._carrier_power = _CausalMean((), m.device)
        self._frames = 0  # STFT frames analysed
        # Per analysed frame, until the decoder has produced its message: (n_bins, k) / (k,) tensors.
        self._magnitude = torch.zeros(self._bins, 0, device=m.device)
        self._phasor = torch.zeros(self._bins, 0, dtype=torch.complex64, device=m.device)
        self._carrier_rms = torch.zeros(0, device=m.device)
        self._gain = torch.zeros(0, device=m.device)
        self._decoder_extra = torch.zeros(1, 2, self._bins, 0, device=m.device)  # scaled carrier, message
        # Synthesis (model rate): overlap-add buffer from absolute sample _ola_start on.
        self._ola = torch.zeros(m.n_fft, device=m.device)
        self._ola_start = -(m.n_fft // 2)
        self._synthesised = 0
        self._finished = False

    # ---- public

    def push(self, audio: np.ndarray) -> np.ndarray:
        if self._finished:
            raise RuntimeError("push() after flush(): this stream has ended")
        audio = np.ascontiguousarray(np.asarray(audio, dtype=np.float32).reshape(-1))
        self._input = np.concatenate([self._input, audio])
        self._received += audio.size
        x = self._up.resample_chunk(audio) if self._up is not None else audio
        return self._advance(x, final=False)

    def flush(self) -> np.ndarray:
        """The rest of the stream; after it the watermarker is finished (a second flush returns nothing)."""
        if self._finished:
            return np.zeros(0, np.float32)
        empty = np.zeros(0, np.float32)
        x = self._up.resample_chunk(empty, last=True) if self._up is not None else empty
        out = self._advance(x, final=True)
        self._finished = True
        return out

    @property
    def pending_samples(self) -> int:
        """Input samples received but not yet returned: the delay this stage adds right now."""
        return self._received - self._returned

    # ---- internals

    def _advance(self, x: np.ndarray, final: bool) -> np.ndarray:
        with torch.inference_mode():
            self._append_signal(x)
            if self._x_total:
                self._run_networks(self._analyse(final), final)
            delta = self._complete_samples(final)
        if self._down is not None:
            delta = self._down.resample_chunk(delta, last=final)
        self._delta = np.concatenate([self._delta, delta])
        if final:  # the resampler may end a sample short of (or past) the input length
            ready = self._input.size
            self._delta = np.concatenate([self._delta, np.zeros(max(ready - self._delta.size, 0), np.float32)])
        else:
            ready = min(self._input.size, self._delta.size)
        out = self._input[:ready] + self._delta[:ready]
        self._input = self._input[ready:]
        self._delta = self._delta[ready:] if not final else np.zeros(0, np.float32)
        self._returned += ready
        return out

    def _append_signal(self, x: np.ndarray) -> None:
        half = self.model.n_fft // 2
        self._x = np.concatenate([self._x, x])
        self._x_total += x.size
        if self._head.size <= half:
            self._head = np.concatenate([self._head, x[: half + 1 - self._head.size]])

    def _analyse(self, final: bool) -> torch.Tensor:
        """STFT of every frame whose window became complete; frame t covers model-rate samples
        [t*hop - n_fft/2, t*hop + n_fft/2) (silentcipher's centred frames)."""
        m = self.model
        half = m.n_fft // 2
        n = self._x_total
        signal, head = self._x, self._head
        if final:
            # silentcipher pads the clip with zeros to a multiple of n_fft, then reflects n_fft/2 at both ends.
            pad = _padding(n, m.n_fft)
            padded = np.concatenate([self._x, np.zeros(pad, np.float32)])
            signal = np.concatenate([padded, padded[-half - 1:-1][::-1]])
            head = np.concatenate([self._head, np.zeros(pad, np.float32)])[: half + 1]
            last = _frame_count(n, m)
        else:
            last = 0 if n <= half else (n - half) // m.hop + 1
        if last <= self._frames:
            return torch.zeros(1, 1, self._bins, 0, device=m.device)
        segments, gains = [], []
        for t in range(self._frames, last):
            start = t * m.hop - half
            if start < 0:  # only frame 0, while _x_start is still 0
                segments.append(np.concatenate([head[1: 1 - start][::-1], signal[: m.n_fft + start]]))
            else:
                segments.append(signal[start - self._x_start: start - self._x_start + m.n_fft])
            # causal: the networks' input gain uses the power of every sample up to the end of the frame's window
            # (encode_wav: the power of the whole clip).
            end = min(t * m.hop + half, n)
            if end > self._power_n:
                chunk = self._x[self._power_n - self._x_start: end - self._x_start].astype(np.float64)
                self._power_sum += float(np.dot(chunk, chunk))
                self._power_n = end
            gains.append(_gain(self._power_sum / self._power_n))
        first = self._frames
        self._frames = last
        if not final:  # drop the samples no later frame (nor the power sum) needs
            keep_from = max(min(last * m.hop - half, self._power_n), 0)
            if keep_from > self._x_start:
                self._x = self._x[keep_from - self._x_start:]
                self._x_start = keep_from
        magnitude, phasor = _spectrum(m, torch.from_numpy(np.stack(segments)).to(m.device))
        gain = torch.tensor(gains, dtype=torch.float32, device=m.device)
        # causal: utterance-level normalisation uses the mean carrier power over every frame so far
        # (encode_wav: over the whole clip). Frame-level normalisation is causal already.
        power = self._carrier_power.update((magnitude.double() ** 2).sum(dim=0), magnitude.shape[0])
        carrier = magnitude * gain  # encode_wav scales the signal before its STFT: same thing
        symbols = torch.arange(first, last, device=m.device) % m.config.message_len  # global frame index
        extra = torch.stack([carrier, self._messages[symbols].T])[None]
        self._magnitude = torch.cat([self._magnitude, magnitude], dim=-1)
        self._phasor = torch.cat([self._phasor, phasor], dim=-1)
        self._carrier_rms = torch.cat([self._carrier_rms, torch.sqrt(power).float()])
        self._gain = torch.cat([self._gain, gain])
        self._decoder_extra = torch.cat([self._decoder_extra, extra], dim=-1)
        return carrier[None, None]

    def _run_networks(self, carrier: torch.Tensor, final: bool) -> None:
        """Feed newly analysed frames (1, 1, n_bins, k) through the layers; overlap-add every finished frame."""
        m = self.model
        x = carrier
        for stream in self._encoder:
            x = stream.push(x, final)
        # dec_c's input: encoder features with the (scaled) carrier and the message of the same frames.
        n = x.shape[-1]
        x = torch.cat([x, self._decoder_extra[..., :n]], dim=1)
        self._decoder_extra = self._decoder_extra[..., n:]
        for stream in self._decoder:
            x = stream.push(x, final)
        n = x.shape[-1]
        if n == 0:
            return
        magnitude, phasor = self._magnitude[:, :n], self._phasor[:, :n]
        message = _scaled_message(m, x[0, 0], magnitude, self._carrier_rms[:n], self._gain[:n], self.message_sdr)
        frames = _synthesis(m, (_reshape(m, magnitude, message) - magnitude) * phasor)
        self._magnitude, self._phasor = self._magnitude[:, n:], self._phasor[:, n:]
        self._carrier_rms, self._gain = self._carrier_rms[n:], self._gain[n:]
        # Overlap-add: frame t covers [t*hop - n_fft/2, t*hop + n_fft/2).
        begin = self._synthesised * m.hop - m.n_fft // 2 - self._ola_start
        need = begin + (n - 1) * m.hop + m.n_fft
        if need > self._ola.shape[0]:
            self._ola = torch.cat([self._ola, torch.zeros(need - self._ola.shape[0], device=m.device)])
        for i, frame in enumerate(frames):
            self._ola[begin + i * m.hop: begin + i * m.hop + m.n_fft] += frame
        self._synthesised += n

    def _complete_samples(self, final: bool) -> np.ndarray:
        """Model-rate watermark samples that no later frame changes: those before (frames synthesised - 1) * hop,
        or at the end everything up to the signal's length."""
        m = self.model
        done = self._x_total if final else (self._synthesised - 1) * m.hop
        begin = max(self._ola_start, 0)
        if done <= begin:
            return np.zeros(0, np.float32)
        lo, hi = begin - self._ola_start, done - self._ola_start
        positions = torch.arange(begin, done, device=m.device) % m.hop
        samples = self._ola[lo:hi] / _envelope(m)[positions]
        self._ola = self._ola[hi:]
        self._ola_start = done
        return samples.cpu().numpy().astype(np.float32)


def _scaled_message(model: WatermarkModel, h: torch.Tensor, magnitude: torch.Tensor, carrier_rms: torch.Tensor,
                    gain: torch.Tensor, message_sdr: float) -> torch.Tensor:
    """The message magnitude per bin and frame, in the scale of the (unscaled) carrier magnitude."""
    message = _message_scale(model, h, message_sdr)
    c = model.config
    if c.frame_level_normalization:
        return message * torch.sqrt(torch.mean(magnitude ** 2, dim=0, keepdim=True))
    if c.utterance_level_normalization:
        return message * carrier_rms
    return message / gain  # not normalised: the message was added in the scaled domain


# --------------------------------------------------------------------------------------------------------------
# Whole-clip reference and detection


def _whole_frames(model: WatermarkModel, x: np.ndarray) -> torch.Tensor:
    """All analysis windows of a clip as silentcipher frames it: (T, n_fft)."""
    half = model.n_fft // 2
    padded = np.concatenate([x, np.zeros(_padding(x.size, model.n_fft), np.float32)])
    signal = np.pad(padded, (half, half), mode="reflect")
    t = _frame_count(x.size, model)
    index = np.arange(t)[:, None] * model.hop + np.arange(model.n_fft)[None]
    return torch.from_numpy(np.ascontiguousarray(signal[index])).to(model.device)


def _whole_network(model: WatermarkModel, plan, x: torch.Tensor, extra: torch.Tensor, n_encoder: int,
                   statistics: str) -> torch.Tensor:
    for i, (layer, waits) in enumerate(plan):
        if i == n_encoder:
            x = torch.cat([x, extra], dim=1)
        pad = (1, 1) if waits else ((1, 0) if layer.time_taps == 2 else (0, 0))
        pre = layer.gated(F.pad(x, pad))
        x = _batch_norm(layer, pre, _CausalMean((2, layer.bn_weight.shape[0]), model.device)
                        if statistics == "causal" else None)
    return x


def encode_clip(model: WatermarkModel, audio: np.ndarray, key: Sequence[int], *, lookahead_frames: int | None = None,
                message_sdr: float = DEFAULT_MESSAGE_SDR, sample_rate: int = SAMPLE_RATE,
                statistics: str = "causal") -> np.ndarray:
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
        x = soxr.ResampleStream(sample_rate, m.sample_rate, 1, dtype="float32",
                                quality=RESAMPLER_QUALITY).resample_chunk(audio, last=True)
    else:
        x = audio
    n = x.size
    half = m.n_fft // 2
    with torch.inference_mode():
        magnitude, phasor = _spectrum(m, _whole_frames(m, x))
        t_frames = magnitude.shape[1]
        ends = np.minimum(np.arange(t_frames) * m.hop + half, n)
        squares = np.concatenate([[0.0], np.cumsum(x.astype(np.float64) ** 2)])
        if statistics == "causal":
            powers = squares[ends] / ends
            carrier_power = torch.cumsum((magnitude.double() ** 2).sum(0), 0) / (
                magnitude.shape[0] * torch.arange(1, t_frames + 1, device=m.device))
        else:
            powers = np.full(t_frames, squares[-1] / n)
            carrier_power = torch.full((t_frames,), float((magnitude.double() ** 2).mean()), dtype=torch.float64,
                                       device=m.device)
        if statistics == "clip" and squares[-1] == 0:
            return audio.copy()  # encode_wav skips silent clips
        gains = torch.tensor([_gain(p) for p in powers], dtype=torch.float32, device=m.device)
        carrier = (magnitude * gains)[None, None]
        symbols = torch.arange(t_frames, device=m.device) % m.config.message_len
        extra = torch.cat([carrier, model.message_frames(key)[symbols].T[None, None]], dim=1)
        plan = _layer_plan(m, _check_lookahead(m, lookahead_frames))
        h = _whole_network(m, plan, carrier, extra, len(m.encoder), statistics)[0, 0]
        message = _scaled_message(m, h, magnitude, torch.sqrt(carrier_power).float(), gains, message_sdr)
        reshaped = _reshape(m, magnitude, message)
        frames = _synthesis(m, (reshaped - magnitude) * phasor)
        total = (t_frames - 1) * m.hop + m.n_fft
        ola = torch.zeros(total, device=m.device)
        for t in range(t_frames):
            ola[t * m.hop: t * m.hop + m.n_fft] += frames[t]
        positions = torch.arange(n, device=m.device) % m.hop
        delta = (ola[half: half + n] / _envelope(m)[positions]).cpu().numpy()
    if resample:
        delta = soxr.ResampleStream(m.sample_rate, sample_rate, 1, dtype="float32",
                                    quality=RESAMPLER_QUALITY).resample_chunk(delta.astype(np.float32), last=True)
    delta = np.concatenate([delta, np.zeros(max(audio.size - delta.size, 0), np.float32)])[: audio.size]
    return audio + delta


def encode_stream(model: WatermarkModel, chunks, key: Sequence[int], **options) -> np.ndarray:
    """Convenience: watermark an iterable of chunks with one StreamingWatermarker and return the whole output."""
    watermarker = StreamingWatermarker(model, key, **options)
    parts = [watermarker.push(chunk) for chunk in chunks]
    parts.append(watermarker.flush())
    return np.concatenate(parts)


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
        magnitude, _ = _spectrum(m, _whole_frames(m, x))
        h = magnitude[None, None, : m.config.message_band_size]
        for layer in m.message_decoder:
            h = _batch_norm(layer, layer.gated(F.pad(h, (1, 1))), None)
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
    data = np.concatenate([mode[end + 1:], mode[:end]]) - 1
    bits = "".join(f"{int(v):02b}" for v in data)
    return tuple(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)), confidence


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
    noise_power = float(np.mean(noise ** 2))
    return math.inf if noise_power == 0 else 10 * math.log10(float(np.mean(reference ** 2)) / noise_power)


def model_dir_from_env(env=os.environ) -> Path | None:
    value = env.get("CSM_WATERMARK_MODEL_DIR", "").strip()
    return Path(value) if value else None


# --------------------------------------------------------------------------------------------------------------
# Many streams: what the Triton `watermarker` model keeps between requests


class StreamError(ValueError):
    """A chunk that does not fit its stream (the message is user-facing)."""


class TooManyStreams(RuntimeError):
    pass


class StreamGone(RuntimeError):
    """A chunk of a stream whose state was dropped (evicted while idle, or cancelled)."""


@dataclass
class ChunkResult:
    audio: np.ndarray
    chunk_index: int  # responses sent for this stream before this one
    is_last: bool
    watermarked: bool
    key_id: str


@dataclass
class EvictedStream:
    stream_id: str
    chunks: int
    idle_s: float


@dataclass
class _StreamState:
    watermarker: StreamingWatermarker | None  # None: watermark off for this stream (audio passes unchanged)
    key_id: str
    last_seen: float
    next_index: int = 0  # chunk_index expected next
    samples: int = 0  # samples received in order so far (the next chunk's sample_offset)
    held: dict[int, tuple[np.ndarray, int, bool]] | None = None  # chunks that arrived early, by chunk_index
    sent: int = 0


class WatermarkStreams:
    """Per-stream watermark state keyed by stream id; chunks of a stream are applied in chunk_index order.

    A stream starts at chunk 0. A later chunk that arrives before its predecessor is held (its response carries no
    audio) and applied when the gap is filled; the response that applies the last chunk flushes the watermarker and
    says is_last. Streams that stop sending (abandoned) are dropped by `evict_idle`, cancelled ones by `drop`; a
    chunk that arrives for a dropped stream gets `StreamGone` instead of silently starting a broken stream.
    Thread-safe: one lock around every operation.
    """

    REMEMBER_DROPPED = 4096

    def __init__(self, model: WatermarkModel, lookahead_frames: int = DEFAULT_LOOKAHEAD_FRAMES,
                 message_sdr: float = DEFAULT_MESSAGE_SDR, idle_timeout_s: float = 30.0, max_streams: int = 256,
                 clock=None):
        import threading
        import time

        self.model = model
        self.lookahead_frames = _check_lookahead(model, lookahead_frames)
        self.message_sdr = message_sdr
        self.idle_timeout_s = idle_timeout_s
        self.max_streams = max_streams
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._streams: dict[str, _StreamState] = {}
        self._dropped: dict[str, str] = {}  # recently dropped stream id -> why (insertion-ordered, bounded)

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def __contains__(self, stream_id: str) -> bool:
        with self._lock:
            return stream_id in self._streams

    def process(self, stream_id: str, key: Sequence[int] | None, key_id: str, audio: np.ndarray, chunk_index: int,
                sample_offset: int, is_last: bool) -> ChunkResult:
        """Apply one chunk. key None: watermark off for this stream. Raises StreamError / TooManyStreams."""
        audio = np.ascontiguousarray(np.asarray(audio, dtype=np.float32).reshape(-1))
        with self._lock:
            state = self._streams.get(stream_id)
            if state is None:
                if stream_id in self._dropped:
                    raise StreamGone(f"stream {stream_id} was {self._dropped[stream_id]}")
                if chunk_index != 0 or sample_offset != 0:
                    raise StreamError(f"stream {stream_id} is unknown here: its first chunk must be chunk 0 at "
                                      f"sample 0, got chunk {chunk_index} at sample {sample_offset}")
                if len(self._streams) >= self.max_streams:
                    raise TooManyStreams(f"the watermarker holds {self.max_streams} streams already")
                watermarker = None if key is None else StreamingWatermarker(
                    self.model, key, lookahead_frames=self.lookahead_frames, message_sdr=self.message_sdr)
                state = self._streams[stream_id] = _StreamState(watermarker, key_id, self._clock(), held={})
            state.last_seen = self._clock()
            try:
                return self._apply(stream_id, state, audio, chunk_index, sample_offset, is_last)
            except Exception:
                self._streams.pop(stream_id, None)  # a broken stream keeps nothing
                raise

    def _apply(self, stream_id, state, audio, chunk_index, sample_offset, is_last) -> ChunkResult:
        if chunk_index < state.next_index or chunk_index in state.held:
            raise StreamError(f"stream {stream_id}: chunk {chunk_index} arrived twice")
        state.held[chunk_index] = (audio, sample_offset, is_last)
        parts, finished = [], False
        while state.next_index in state.held:
            chunk, offset, last = state.held.pop(state.next_index)
            if offset != state.samples:
                raise StreamError(f"stream {stream_id}: chunk {state.next_index} starts at sample {offset}, "
                                  f"expected {state.samples}")
            state.samples += chunk.size
            state.next_index += 1
            w = state.watermarker
            parts.append(chunk if w is None else w.push(chunk))
            if last:
                if state.held:
                    raise StreamError(f"stream {stream_id}: chunks after the last one")
                if w is not None:
                    parts.append(w.flush())
                finished = True
        result = ChunkResult(
            audio=np.concatenate(parts) if parts else np.zeros(0, np.float32),
            chunk_index=state.sent,
            is_last=finished,
            watermarked=state.watermarker is not None,
            key_id=state.key_id,
        )
        state.sent += 1
        if finished:
            del self._streams[stream_id]
        return result

    def drop(self, stream_id: str, why: str = "cancelled") -> bool:
        with self._lock:
            found = self._streams.pop(stream_id, None) is not None
            self._remember(stream_id, why)
            return found

    def _remember(self, stream_id: str, why: str) -> None:
        self._dropped.pop(stream_id, None)
        self._dropped[stream_id] = why
        while len(self._dropped) > self.REMEMBER_DROPPED:
            del self._dropped[next(iter(self._dropped))]

    def evict_idle(self) -> list[EvictedStream]:
        """Drop every stream that received nothing for idle_timeout_s; returns what was dropped (for the log)."""
        now = self._clock()
        with self._lock:
            idle = [(sid, s) for sid, s in self._streams.items() if now - s.last_seen > self.idle_timeout_s]
            for sid, s in idle:
                del self._streams[sid]
                self._remember(sid, f"dropped after {now - s.last_seen:.1f} s without chunks (idle timeout "
                                    f"{self.idle_timeout_s:g} s)")
        return [EvictedStream(sid, s.next_index, now - s.last_seen) for sid, s in idle]
