"""Backpressure from the watermarker to the frame loop, and the admission rule that follows from it.

Inside the `tts` ensemble csm_1b's chunks queue at the watermarker, and Triton 2.51 bounds that queue nowhere. So a
stream is held back (left out of the batched frame step: it costs nothing) while more than `max_unwatermarked_s`
of its audio has been sent but not yet taken by the watermarker; its sink says how much was taken
(`samples_done`, from csm_tts/triton/cancellation.py). A sink that cannot tell (None: a direct csm_1b client, whose
audio goes straight out, or a watermarker that has not reported yet) never holds its stream.

The watermarker is *behind* when a held stream's watermarked audio is also behind real time (less audio than the
seconds since its first chunk left): its clients' playback outruns what the stack delivers. Then no new stream
starts (it would only slow the others down) and a queued request waits at most `behind_queue_wait_s` before it is
refused, retry-able. A held stream that is ahead of real time (a fast watermarker, a slow listener) blocks nobody.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from csm_tts import SAMPLE_RATE

HOLD_POLL_S = 0.01  # how often the frame loop re-reads the progress of held streams when nothing else runs
HELD_CHECK_S = 0.25  # how often a held stream is checked for cancellation (it makes no chunk that would be)
BEHIND_MEMORY_S = 1.0  # "behind" lasts this long after the last sign, so admission does not flicker with the holds


@dataclass(eq=False)
class Hold:
    """One stream's flow-control state, kept by the frame loop's thread."""

    first_sent_at: float | None = None  # when its first chunk left (monotonic)
    since: float | None = None  # held since (monotonic); None while it runs
    checked_at: float = 0.0  # last cancellation check while held


@dataclass
class FlowControl:
    max_unwatermarked_s: float | None = 1.6  # None: never hold
    behind_queue_wait_s: float = 0.5
    behind_at: float = field(default=-math.inf)

    def __post_init__(self) -> None:
        if self.max_unwatermarked_s is not None and not self.max_unwatermarked_s > 0:
            raise ValueError(f"max_unwatermarked_s must be > 0 or None, got {self.max_unwatermarked_s!r}")
        if not self.behind_queue_wait_s >= 0:
            raise ValueError(f"behind_queue_wait_s must be >= 0, got {self.behind_queue_wait_s!r}")

    def held(self, hold: Hold, samples_sent: int, samples_done: int | None, now: float) -> bool:
        """Whether the stream waits this round (and notes when the watermarker is behind)."""
        if self.max_unwatermarked_s is None or samples_done is None:
            return False
        if samples_sent - samples_done <= self.max_unwatermarked_s * SAMPLE_RATE:
            return False
        started = hold.first_sent_at if hold.first_sent_at is not None else now
        if samples_done < (now - started) * SAMPLE_RATE:  # its listener hears audio faster than it is delivered
            self.behind_at = now
        return True

    def behind(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) - self.behind_at < BEHIND_MEMORY_S

    def queue_wait_s(self, max_queue_wait_s: float | None, now: float) -> float | None:
        """How long a queued request may wait for a slot now."""
        if not self.behind(now):
            return max_queue_wait_s
        return min(self.behind_queue_wait_s, max_queue_wait_s or math.inf)
