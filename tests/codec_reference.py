"""The one-shot Mimi decode that streamed audio is checked against (what transformers' `generate` returns)."""

from __future__ import annotations

import numpy as np
import torch


@torch.inference_mode()
def decode_all(codec, codes: torch.Tensor) -> np.ndarray:
    """One-shot decode of [frames, num_codebooks] codes to float32 PCM."""
    audio = codec.decode(codes.T.unsqueeze(0).to(torch.long)).audio_values
    return audio[0, 0].float().cpu().numpy()
