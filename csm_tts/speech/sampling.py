"""Sampling one code per stream from a batch of logits, without host synchronisation (CUDA-graph safe)."""

from __future__ import annotations

import math

import torch


def sample_codes(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    topks: torch.Tensor,
    uniforms: torch.Tensor,
    valid_ids: int,
    topk_bound: int | None = None,
) -> torch.Tensor:
    """Sample one id per row of [batch, vocab] logits, each row with its own temperature, top-k and uniform draw.

    Ids >= valid_ids (CSM's special codes, which the codec cannot decode) are never chosen. Temperature 0 is greedy
    (argmax, like transformers). Otherwise: temperature, top-k, softmax, then inverse-CDF sampling with the row's
    uniform number. Each stream draws its uniforms from its own generator, so what a stream samples does not depend
    on which other streams share the batch (a multinomial call over the batch would interleave their randomness).
    `topk_bound` (>= every row's top-k; default: all valid ids) is a fixed size known without reading `topks`
    back from the device, so sampling never synchronises and keeps static shapes; each row masks its own top-k.
    """
    logits = logits.float()
    logits[..., valid_ids:] = -math.inf
    greedy = logits.argmax(dim=-1)
    k = min(topk_bound or valid_ids, valid_ids)
    top_values, top_ids = torch.topk(logits / temperatures.clamp(min=1e-5)[:, None], k, dim=-1)
    ranks = torch.arange(k, device=logits.device)
    top_values = top_values.masked_fill(ranks[None, :] >= topks[:, None], -math.inf)
    cdf = torch.softmax(top_values, dim=-1).cumsum(dim=-1)
    index = (cdf < uniforms[:, None]).sum(dim=-1).clamp(max=k - 1)
    index = torch.minimum(index, topks - 1)  # rounding in the cdf must not step past the row's top-k
    sampled = top_ids.gather(-1, index[:, None]).squeeze(-1)
    return torch.where(temperatures == 0, greedy, sampled)
