"""Text that arrives in pieces (an LLM's tokens) turned into speech plans: the server cuts it with the
`StreamSegmenter` (csm_tts/text/incremental.py: an early first cut, then sentence ends, `flush`, text that waited
too long), normalises each cut (`spoken_stream_segment`) and hands out one `SpeechPlan` per cut, its segments'
spans in the whole text received on this stream. Used by WS /stream's text streaming (proxy/text_session.py) and
the ElevenLabs input-streaming endpoints; plain state, no I/O.

A barge-in (`reset`) drops the text still waiting; spans keep counting from everything received, so a client can
still match each segment to what it sent.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from csm_tts.text.frontend import spoken_stream_segment
from csm_tts.text.incremental import StreamPolicy, StreamSegment, StreamSegmenter
from proxy.parse.job import GenerateOptions
from proxy.spoken import SpeechPlan


@dataclasses.dataclass(frozen=True)
class CutPlan:
    """One cut of the stream: its span of the received text, why it was cut, and what will be spoken (None: nothing
    speakable in it, e.g. a code block or emoji, which is skipped)."""

    start: int
    end: int
    reason: str
    plan: SpeechPlan | None


class TextStream:
    def __init__(
        self,
        options: GenerateOptions,
        policy: StreamPolicy | None = None,
        language: str = "en",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.options = options
        self.policy = policy or StreamPolicy()
        self.language = language
        self.clock = clock
        self.received = 0  # characters received on this stream, across resets
        self._base = 0  # where the current segmenter's text starts in everything received
        self._segmenter = StreamSegmenter(self.policy, clock)

    def feed(self, piece: str) -> list[CutPlan]:
        self.received += len(piece)
        return self._plans(self._segmenter.feed(piece))

    def flush(self) -> list[CutPlan]:
        return self._plans(self._segmenter.flush())

    def poll(self) -> list[CutPlan]:
        return self._plans(self._segmenter.poll())

    def deadline(self) -> float | None:
        return self._segmenter.deadline()

    def reset(self) -> str:
        """Barge-in: the text waiting to be cut is dropped (returned); the next piece starts a new first segment."""
        dropped = self._segmenter.pending
        self._base = self.received
        self._segmenter = StreamSegmenter(self.policy, self.clock)
        return dropped

    def _plans(self, cuts: list[StreamSegment]) -> list[CutPlan]:
        out = []
        for cut in cuts:
            segments = tuple(
                spoken_stream_segment(cut, normalized=self.options.normalize, language=self.language, base=self._base)
            )
            plan = SpeechPlan(dataclasses.replace(self.options, text=cut.text), segments) if segments else None
            out.append(CutPlan(cut.start + self._base, cut.end + self._base, cut.reason, plan))
        return out
