"""Exact streaming decode of Mimi codes to 24 kHz PCM.

transformers' `MimiModel.decode(..., decoder_cache=...)` carries only the codec transformer's KV cache; its causal
convolutions and transposed-convolution upsamplers keep no state, so decoding chunk by chunk with it clicks at every
chunk border (up to ~1.4 on a signal peaking at 3.0 with the tiny codec). The codec is causal end to end, so
instead of patching every layer with state we keep a short history and recompute:

    codes -> quantizer (per frame) -> upsample (ConvTranspose, needs the previous frame's latent)
          -> decoder transformer (KV cache, including its sliding window)
          -> SEANet decoder (causal convs: needs `left_context_steps` earlier transformer outputs)

Each call decodes only the new frames plus that fixed left context and keeps the output samples of the new frames,
so the concatenation of all chunks equals a one-shot decode of all frames (tests/test_engine.py checks it to
~2e-6), for any chunk schedule. The left context is computed from the SEANet layer shapes, so it holds for the
real and the tiny codec.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers.cache_utils import DynamicCache
from transformers.models.mimi.modeling_mimi import MimiConv1d, MimiConvTranspose1d, MimiResnetBlock


def seanet_left_context_steps(seanet: torch.nn.Module) -> int:
    """How many earlier input steps one output step of the causal SEANet decoder depends on."""
    rate = 1  # output samples per input step at the current layer
    context = 0.0  # in input steps

    def conv_context(conv: MimiConv1d) -> float:
        return (conv.conv.kernel_size[0] - 1) * conv.conv.dilation[0] / rate

    for layer in seanet.layers:
        if isinstance(layer, MimiConv1d):
            context += conv_context(layer)
        elif isinstance(layer, MimiConvTranspose1d):
            stride = layer.conv.stride[0]
            if layer.conv.kernel_size[0] > 2 * stride:
                raise ValueError("transposed convolutions wider than 2x their stride are not supported")
            context += 1 / rate  # each output sample also depends on the previous input sample
            rate *= stride
        elif isinstance(layer, MimiResnetBlock):
            context += sum(conv_context(c) for c in layer.block if isinstance(c, MimiConv1d))
    return math.ceil(context) + 1  # +1: margin against rounding in the fractional sums


class StreamingCodecDecoder:
    """Decode one stream's frames incrementally. One instance per stream; not thread-safe."""

    def __init__(self, codec, left_context_steps: int | None = None):
        decoder = codec.decoder
        self.quantizer = codec.quantizer
        self.upsample = decoder.upsample
        self.transformer = decoder.decoder_transformer
        self.seanet = decoder.decoder_seanet
        self.left_context = left_context_steps or seanet_left_context_steps(self.seanet)
        self.cache = DynamicCache(config=decoder.config)
        self.prev_latent: torch.Tensor | None = None  # [1, D, 1]
        self.history: torch.Tensor | None = None  # last `left_context` transformer outputs, [1, C, T]

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """codes: [frames, num_codebooks] ints. Returns float32 PCM for exactly those frames."""
        if codes.numel() == 0:
            return np.zeros(0, dtype=np.float32)
        latents = self.quantizer.decode(codes.T.unsqueeze(0).to(torch.long))  # [1, D, n]
        hidden = latents
        if self.upsample is not None:
            stride = self.upsample.conv.stride[0]
            if self.prev_latent is not None:
                hidden = self.upsample(torch.cat([self.prev_latent, latents], dim=-1))[..., stride:]
            else:
                hidden = self.upsample(latents)
            self.prev_latent = latents[..., -1:]
        new_steps = hidden.shape[-1]
        out = self.transformer(hidden.transpose(1, 2), cache=self.cache, use_cache=True).last_hidden_state
        out = out.transpose(1, 2)
        window = out if self.history is None else torch.cat([self.history, out], dim=-1)
        self.history = window[..., -self.left_context :]
        audio = self.seanet(window)
        samples_per_step = audio.shape[-1] // window.shape[-1]
        return audio[0, 0, -new_steps * samples_per_step :].float().cpu().numpy()


@torch.inference_mode()
def decode_all(codec, codes: torch.Tensor) -> np.ndarray:
    """One-shot reference decode of [frames, num_codebooks] codes (what transformers' generate does)."""
    audio = codec.decode(codes.T.unsqueeze(0).to(torch.long)).audio_values
    return audio[0, 0].float().cpu().numpy()
