"""Backpressure from the watermarker to the frame loop, and the admission rule that follows from it.

Inside the `tts` ensemble csm_1b's chunks queue at the watermarker, and Triton 2.51 bounds that queue nowhere. So a
stream is held back (left out of the batched frame step: it costs nothing) when one more frame would put more than
`max_unwatermarked_s` of its audio ahead of the watermarker: sent but not yet taken, or generated for the next chunk.
Its sink says how much the watermarker took (`samples_done`, from csm_tts/triton/cancellation.py). A sink that
cannot tell (None: a direct csm_1b client, whose audio goes straight out, or a watermarker that has not reported
yet) never holds its stream. The bound is raised to the largest chunk, or a stream could never finish one.

A client that leaves a `tts` stream is noticed by csm_1b only when the watermarker reaches that stream's next chunk
(cancellation.py): the bound is also how much audio a cancelled stream may still cost the watermarker.

The watermarker is *behind* when a held stream's watermarked audio is also behind real time (less audio than the
seconds since its first chunk left): its clients' playback outruns what the stack delivers. Then no new stream
starts (it would only slow the others down) and a queued request waits at most `behind_queue_wait_s` before it is
refused, retry-able. A held stream that is ahead of real time (a fast watermarker, a slow listener) blocks nobody.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from csm_tts import FRAME_MS, SAMPLE_RATE, SAMPLES_PER_FRAME

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

    def fit(self, max_chunk_frames: int) -> str | None:
        """Raise the bound to the largest chunk (a held stream could never finish a larger one); says so, or None."""
        chunk_s = max_chunk_frames * FRAME_MS / 1000
        if self.max_unwatermarked_s is None or self.max_unwatermarked_s >= chunk_s:
            return None
        low, self.max_unwatermarked_s = self.max_unwatermarked_s, chunk_s
        return f"max_unwatermarked_ms {low * 1000:.0f} raised to {chunk_s * 1000:.0f}: the largest chunk must fit"

    def held(self, hold: Hold, samples_made: int, samples_done: int | None, now: float) -> bool:
        """Whether the stream waits this round (and notes when the watermarker is behind). `samples_made`: sent,
        plus the frames generated for the next chunk."""
        if self.max_unwatermarked_s is None or samples_done is None:
            return False
        if samples_made + SAMPLES_PER_FRAME - samples_done <= self.max_unwatermarked_s * SAMPLE_RATE:
            return False
        started = hold.first_sent_at if hold.first_sent_at is not None else now
        if samples_done < (now - started) * SAMPLE_RATE:  # its listener hears audio faster than it is delivered
            self.behind_at = now
        return True

    def sort(self, jobs: list, now: float, log_error) -> tuple[list, list, list[float]]:
        """The scheduler's jobs (each with `stream`, `hold`, `samples_done()`) that run this round, the held ones due
        for a cancellation check (they make no chunk that would be checked), and how long the holds that ended now
        lasted. Reading a held stream's progress is one small file read, not a frame step."""
        stepping, checks, ended = [], [], []
        for job in jobs:
            try:
                stream = job.stream  # sent, being decoded, and generated for the next chunk
                # `due` first: the output stage clears it only after counting the chunk in `samples_sent`.
                due = len(stream.due or ())
                made = stream.samples_sent + (due + len(stream.pending)) * SAMPLES_PER_FRAME
                held = self.held(job.hold, made, job.samples_done(), now)
            except Exception as e:  # a sink that cannot report must not hold (or fail) its stream
                log_error(f"stream {job.name}: its watermark progress could not be read: {e}")
                held = False
            if not held:
                if job.hold.since is not None:
                    ended.append(now - job.hold.since)
                    job.hold.since = None
                stepping.append(job)
            elif job.hold.since is None:
                job.hold.since = job.hold.checked_at = now
            elif now - job.hold.checked_at >= HELD_CHECK_S:
                job.hold.checked_at = now
                checks.append(job)
        return stepping, checks, ended

    def behind(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) - self.behind_at < BEHIND_MEMORY_S

    def queue_wait_s(self, max_queue_wait_s: float | None, behind: bool) -> float | None:
        """How long a queued request may wait for a slot now (`behind`: the scheduler's view of `behind`)."""
        if not behind:
            return max_queue_wait_s
        return min(self.behind_queue_wait_s, max_queue_wait_s or math.inf)
