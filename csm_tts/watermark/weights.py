"""silentcipher's 44.1 kHz model: constants, loading its weights, and random weights in its layout for tests.

Weights load from a local directory only: the library's hub fallback (`get_model`) is never called, and its
`server.py` (which also imports pydub at module level) is never imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

DEFAULT_MESSAGE_SDR = 36.0  # Sesame's setting (the checkpoint's own hparams say 47)
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
    # Deliberately lazy (on first load, not at import): silentcipher is only needed to build the networks.
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
    enc_c = sc.Encoder(
        n_layers=config.enc_n_layers,
        message_dim=config.message_dim,
        out_dim=32,
        message_band_size=config.message_band_size,
        n_fft=config.N_FFT,
    )
    dec_c = sc.CarrierDecoder(
        config=config, conv_dim=32 * 3, n_layers=config.dec_c_n_layers, message_band_size=config.message_band_size
    )
    dec_m = [
        sc.MsgDecoder(message_dim=config.message_dim, message_band_size=config.message_band_size)
        for _ in range(config.n_messages)
    ]
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


@dataclass(frozen=True)
class GatedLayer:
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
    def from_module(layer) -> GatedLayer:
        return GatedLayer(
            weight=torch.cat([layer.conv.weight, layer.gate.weight]).detach().float(),
            bias=torch.cat([layer.conv.bias, layer.gate.bias]).detach().float(),
            bn_weight=layer.bn.weight.detach().float(),
            bn_bias=layer.bn.bias.detach().float(),
            eps=float(layer.bn.eps),
        )

    def folded(self) -> GatedLayer:
        """The same layer without its look-ahead tap: frame t+1 is replaced by frame t (taps t and t+1 summed)."""
        if self.time_taps != 3:
            return self
        w = self.weight
        weight = torch.cat([w[..., 0:1], w[..., 1:2] + w[..., 2:3]], dim=-1).contiguous()
        return GatedLayer(weight, self.bias, self.bn_weight, self.bn_bias, self.eps)

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
    encoder: tuple[GatedLayer, ...]  # enc_c.main
    decoder: tuple[GatedLayer, ...]  # dec_c.main; the first layer's input channels are folded (see load)
    message_weight: torch.Tensor  # enc_c.linear: (band, message_dim)
    message_bias: torch.Tensor
    message_decoder: tuple[GatedLayer, ...]  # dec_m[0].main (detection only)
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
        symbols = [int(bits[i : i + 2], 2) + 1 for i in range(0, len(bits), 2)] + [0]
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
        raise ValueError(
            f"{root}: the streaming STFT needs HOP_LENGTH = N_FFT / 2 (got {config.HOP_LENGTH}, {config.N_FFT})"
        )
    enc_c, dec_c, dec_m = _networks(config)

    def state(name: str) -> dict:
        raw = torch.load(root / name, map_location="cpu", weights_only=True)
        return {k.removeprefix("module."): v for k, v in raw.items()}

    enc_c.load_state_dict(state("enc_c.ckpt"))
    dec_c.load_state_dict(state("dec_c.ckpt"))
    dec_m[0].load_state_dict(state("dec_m_0.ckpt"))
    dev = torch.device(device)

    encoder = [GatedLayer.from_module(layer) for layer in enc_c.main]
    decoder = [GatedLayer.from_module(layer) for layer in dec_c.main]
    # dec_c's input is [carrier features (32), carrier repeated 32 times, message repeated 32 times]: a convolution
    # over identical channels equals one over a single channel with their weights summed, so fold 96 inputs to 34.
    first = decoder[0]
    feature_dim = first.weight.shape[1] - 64
    w = first.weight
    folded = torch.cat(
        [
            w[:, :feature_dim],
            w[:, feature_dim : feature_dim + 32].sum(1, keepdim=True),
            w[:, feature_dim + 32 :].sum(1, keepdim=True),
        ],
        dim=1,
    )
    decoder[0] = GatedLayer(folded.contiguous(), first.bias, first.bn_weight, first.bn_bias, first.eps)

    def to(layer: GatedLayer) -> GatedLayer:
        return GatedLayer(
            layer.weight.to(dev), layer.bias.to(dev), layer.bn_weight.to(dev), layer.bn_bias.to(dev), layer.eps
        )

    message_layers = [m for m in dec_m[0].main if not isinstance(m, torch.nn.Dropout)]
    return WatermarkModel(
        config=config,
        model_dir=root,
        device=dev,
        encoder=tuple(to(layer) for layer in encoder),
        decoder=tuple(to(layer) for layer in decoder),
        message_weight=enc_c.linear.weight.detach().float().to(dev),
        message_bias=enc_c.linear.bias.detach().float().to(dev),
        message_decoder=tuple(to(GatedLayer.from_module(layer)) for layer in message_layers),
        message_decoder_linear=(
            dec_m[0].linear.weight.detach().float().to(dev),
            dec_m[0].linear.bias.detach().float().to(dev),
        ),
        window=torch.hann_window(int(config.N_FFT), device=dev),
    )
