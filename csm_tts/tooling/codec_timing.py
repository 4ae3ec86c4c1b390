"""Timing of the codec stage: output rounds of many streams decoded in one batched call vs one stream at a time.

Shared by scripts/bench_codec.py (CPU, tiny and real-size Mimi) and scripts/bench_gpu.py (the GPU table). Both ways
use the same `CodecSlots` code with their own slots; they alternate round by round, so a noisy machine slows both.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from csm_tts import SAMPLE_RATE
from csm_tts.speech.codec_stream import CodecSlots


class _Owner:
    """Stands in for a stream as a slot's owner."""


def time_codec_rounds(codec, streams: int, frames: int, rounds: int, seed: int = 0, cuda_graphs: bool = False) -> dict:
    """Each of `rounds` output rounds (after one untimed warm-up round) decodes `frames` new frames of every stream:
    "batched" in one `decode` call, "in_turn" in one call per stream. Returns the median ms per round of each, their
    ratio, audio seconds decoded per second batched, and the largest difference between the two ways' samples. With
    `cuda_graphs` both ways replay CUDA graphs (captured in the warm-up round)."""
    generator = torch.Generator().manual_seed(seed)
    codebook_size, num_codebooks = codec.config.codebook_size, codec.config.num_quantizers
    codes = torch.randint(0, codebook_size, (rounds + 1, streams, frames, num_codebooks), generator=generator)
    decoders, owners, audio, times = {}, [], {}, {}
    for way in ("batched", "in_turn"):
        decoders[way] = CodecSlots(codec, streams, frames, cuda_graphs=cuda_graphs)
        owners += [[_Owner() for _ in range(streams)]]
        for owner in owners[-1]:
            decoders[way].claim(owner)
        audio[way], times[way] = [[] for _ in range(streams)], []
    for round_ in range(rounds + 1):
        ways = ("batched", "in_turn") if round_ % 2 else ("in_turn", "batched")
        for way in ways:
            work = [(slot, codes[round_, slot]) for slot in range(streams)]
            started = time.perf_counter()
            batched = way == "batched"
            out = decoders[way].decode(work) if batched else [decoders[way].decode([one])[0] for one in work]
            if round_:
                times[way].append((time.perf_counter() - started) * 1000)
            for slot, samples in enumerate(out):
                audio[way][slot].append(samples)
    batched, in_turn = (statistics.median(times[way]) for way in ("batched", "in_turn"))
    difference = max(
        float(np.abs(np.concatenate(a) - np.concatenate(b)).max())
        for a, b in zip(audio["batched"], audio["in_turn"], strict=True)
    )
    audio_s = sum(parts[-1].size for parts in audio["batched"]) / SAMPLE_RATE  # one round's audio
    return {
        "streams": streams,
        "frames": frames,
        "rounds": rounds,
        "cuda_graphs": cuda_graphs,
        "batched_ms": batched,
        "in_turn_ms": in_turn,
        "speedup": in_turn / batched,
        "audio_s_per_s_batched": audio_s / (batched / 1000),
        "max_difference": difference,
    }
