"""How many 80 ms frames go into each streamed audio chunk.

The first chunk is small so that first audio leaves early; later chunks grow (x`growth`, up to `max_frames`) so that
per-chunk overhead (a response, a watermark call, a network message) stays low once playback has a buffer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChunkSchedule:
    first_frames: int = 2
    growth: float = 2.0
    max_frames: int = 10

    def __post_init__(self) -> None:
        if self.first_frames < 1 or self.max_frames < self.first_frames or self.growth < 1.0:
            raise ValueError(
                f"invalid chunk schedule first_frames={self.first_frames} growth={self.growth} "
                f"max_frames={self.max_frames}: need 1 <= first_frames <= max_frames and growth >= 1"
            )

    def frames_in_chunk(self, chunk_index: int) -> int:
        return min(self.max_frames, round(self.first_frames * self.growth**chunk_index))
