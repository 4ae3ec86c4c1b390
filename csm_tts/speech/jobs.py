"""What the scheduler holds per request (`Job`), and what it talks to: the request's sink and an observer."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from csm_tts.speech.flow_control import Hold
from csm_tts.speech.request import GenerationRequest
from csm_tts.speech.stream import AudioChunk, Prompt, Stream


class ServerFull(RuntimeError):
    pass


class EngineBroken(RuntimeError):
    """The engine cannot serve any more (its device failed); the message says why."""


class StreamSink(Protocol):
    """Where one request's output goes (a Triton response sender in production, a list in tests). A sink may also
    have `samples_done() -> int | None`: how much of the audio sent the watermarker has taken (flow_control.py)."""

    def send_chunk(self, stream: Stream, chunk: AudioChunk) -> None: ...

    def send_error(
        self, message: str, code: str
    ) -> None: ...  # code: INVALID_ARG, UNAVAILABLE, INTERNAL or CANCELLED; ends the request

    def is_cancelled(self) -> bool: ...


@dataclass(eq=False)
class Job:
    request: GenerationRequest
    sink: StreamSink
    stream_id: str | None = None
    prompt: Prompt | None = None
    stream: Stream | None = None
    ended: bool = False  # its final response was sent (or could not be): nothing more goes to its sink
    queued_at: float = field(default_factory=time.monotonic)
    handed_over: bool = False  # with the output stage (a due chunk, or a check): still stepped, no new chunk cut
    hold: Hold = field(default_factory=Hold)
    _ending: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.stream.stream_id if self.stream is not None else (self.stream_id or "(queued)")

    def claim_end(self) -> bool:
        """The one final response of a job: True for the caller that may send it (any thread)."""
        with self._ending:
            first, self.ended = not self.ended, True
        return first

    def samples_done(self) -> int | None:
        report = getattr(self.sink, "samples_done", None)
        return None if report is None else report()


class SchedulerObserver(Protocol):
    def occupancy(self, active: int, queued: int, held: int = 0, behind: bool = False) -> None: ...

    def frame_step(self, seconds: float, streams: int) -> None: ...

    def chunks_decoded(self, seconds: float, chunks: int) -> None: ...

    def chunk_sent(self, seconds: float) -> None: ...

    def hold_ended(self, seconds: float) -> None: ...
