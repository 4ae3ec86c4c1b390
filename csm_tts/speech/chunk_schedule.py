"""How many 80 ms frames go into each streamed audio chunk.

The first chunk is small so that first audio leaves early; later chunks grow (x`growth`, up to `max_frames`) so that
per-chunk overhead (a response, a watermark call, a network message) stays low once playback has a buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChunkSchedule:
    first_frames: int = 2
    growth: float = 2.0
    max_frames: int = 10
    # Chunks after which the cap is reached: `growth ** index` is never computed beyond it (it overflows a float
    # after ~1000 chunks of a long stream with growth 2).
    _capped_from: float = field(default=math.inf, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (
            not isinstance(self.first_frames, int)
            or not isinstance(self.max_frames, int)
            or not math.isfinite(self.growth)
            or self.first_frames < 1
            or self.max_frames < self.first_frames
            or self.growth < 1.0
        ):
            raise ValueError(
                f"invalid chunk schedule first_frames={self.first_frames!r} growth={self.growth!r} "
                f"max_frames={self.max_frames!r}: need integers 1 <= first_frames <= max_frames and a finite "
                "growth >= 1"
            )
        if self.growth > 1.0:
            steps = math.ceil(math.log(self.max_frames / self.first_frames) / math.log(self.growth))
            object.__setattr__(self, "_capped_from", steps)

    def frames_in_chunk(self, chunk_index: int) -> int:
        if chunk_index >= self._capped_from:
            return self.max_frames
        return min(self.max_frames, round(self.first_frames * self.growth**chunk_index))
