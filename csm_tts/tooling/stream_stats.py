"""Statistics of streamed audio shared by the benchmarks (numpy only, so bench_gpu.py runs from a bare Python)."""

from __future__ import annotations

import numpy as np


def percentile(values, q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def playback_stalls(arrivals_s: list[float], durations_s: list[float]) -> tuple[int, float]:
    """Audible stalls of one stream played from its first chunk's arrival: (count, seconds of silence).

    A chunk stalls playback when it arrives after all audio delivered before it has finished playing (the gap since
    the previous chunk exceeded the audio still buffered); playback then resumes when it arrives."""
    stalls, silence = 0, 0.0
    runs_out = None
    for arrival, duration in zip(arrivals_s, durations_s, strict=True):
        if runs_out is None:
            runs_out = arrival + duration
            continue
        if arrival > runs_out + 1e-9:
            stalls += 1
            silence += arrival - runs_out
            runs_out = arrival
        runs_out += duration
    return stalls, silence
