"""A request's whole text spoken as ONE audio: normalised for speech, split into generation-sized segments
(csm_tts/text/, docs/text.md) and generated one after the other, each with the earlier ones' text and audio as
context so the voice carries on. `SpokenGeneration` reads like a `Generation` (enter it for the first audio, then
`async for chunk`), so every renderer gives one continuous file, one SSE stream, one WebSocket chunk.

`plan_speech` runs at parse time: nothing speakable is a 400 before admission. Only the first segment's start waits
for Triton; a later segment opens when the previous one has sent its last chunk (its audio is its successor's
context). The request keeps one stream slot of its key (one `Lease`); each segment is its own Triton request.

The engine does not report why a generation ended, so a segment whose audio reaches its own length limit is taken
to have ended without its end-of-speech frame: it is logged and counted (csm_proxy_text_segments_total{end=...}).
A generation that stops short of its limit because the model's window is full counts as "eos".
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np

from csm_tts import FRAME_MS, SAMPLE_RATE, SAMPLES_PER_FRAME, limits
from csm_tts.speech.length_rule import default_audio_length_ms
from csm_tts.speech.request import ContextSegment
from csm_tts.text.budget import Segment
from csm_tts.text.frontend import spoken_segments
from csm_tts.text.normalize import NothingToSpeak
from proxy.admission import Lease
from proxy.conversation import ContextBudget, Conversation
from proxy.errors import ApiError
from proxy.generation import Generation
from proxy.parse.job import GenerateOptions
from proxy.upstream.pool import TritonPool
from proxy.upstream.stream import AudioChunk

log = logging.getLogger("proxy.spoken")

# Spoken text is reported in a header only while it stays well inside common header size limits (8 KB).
MAX_SPOKEN_HEADER_BYTES = 6000


@dataclass(frozen=True)
class SpeechPlan:
    """What one text will be: its options (the client's text) and its segments (what each generation says)."""

    options: GenerateOptions
    segments: tuple[Segment, ...]

    @property
    def spoken_text(self) -> str:
        """The segments' texts joined: the normalised text exactly."""
        return "".join(s.text for s in self.segments)

    def headers(self) -> dict:
        """What is spoken, for audio answers whose body is audio: the segment count always, the text when short."""
        headers = {"X-Spoken-Segments": str(len(self.segments))}
        spoken = quote(self.spoken_text.strip(), safe=" ,.;:!?'-")
        if len(spoken) <= MAX_SPOKEN_HEADER_BYTES:
            headers["X-Spoken-Text"] = spoken
        return headers


def plan_speech(options: GenerateOptions) -> SpeechPlan:
    """The text's segments; 400 when nothing in it can be spoken."""
    try:
        segments = spoken_segments(options.text, normalized=options.normalize)
    except NothingToSpeak as e:
        raise ApiError(400, str(e)) from None
    return SpeechPlan(options, tuple(segments))


def conversation_for(settings) -> Conversation | None:
    """A request's own conversation (voice continuity between its segments), unless context is off."""
    return Conversation(ContextBudget.from_settings(settings)) if settings.context_enabled else None


def segment_audio_limit_ms(options: GenerateOptions) -> int:
    """The audio limit the engine applies to one segment: the client's, or the length rule's for its text."""
    if options.max_audio_length_ms is not None:
        return options.max_audio_length_ms
    return default_audio_length_ms(options.text, limits.MAX_AUDIO_LENGTH_MS)


@dataclass
class SpokenSegment:
    """One segment as generated: its text, its span in what the client sent, its audio, how it ended."""

    text: str
    source_start: int
    source_end: int
    samples: int = 0
    end: str | None = None  # "eos" (ended on its own), "length" (ran to its limit), None (not finished)

    def public(self) -> dict:
        return {
            "text": self.text,
            "source_start": self.source_start,
            "source_end": self.source_end,
            "samples": self.samples,
            "duration_ms": self.samples * 1000.0 / SAMPLE_RATE,
            "end": self.end,
        }


class SpokenGeneration:
    """`async with SpokenGeneration(...) as g: async for chunk in g` over every segment of a plan, in order."""

    def __init__(
        self,
        pool: TritonPool,
        plan: SpeechPlan,
        lease: Lease | None = None,
        watermark_default: bool | None = None,
        conversation: Conversation | None = None,
        reference: Sequence[ContextSegment] = (),
    ):
        self.pool = pool
        self.options = plan.options
        self.lease = lease
        self.watermark_default = watermark_default
        self.conversation = conversation
        self.reference = list(reference)
        self.segments = [SpokenSegment(s.speech, s.source_start, s.source_end) for s in plan.segments]
        self.started = time.perf_counter()
        self.watermarked = False
        self.samples = 0
        self._index = -1
        self._current: Generation | None = None
        self._audio: list = []
        self._chunks = 0
        self._failed = True

    # -- Generation's interface --------------------------------------------------------------------------------------
    async def __aenter__(self) -> SpokenGeneration:
        try:
            await self._next_segment()
        except BaseException:
            self._close()
            raise
        if self.lease is not None:
            self.lease.first_audio(time.perf_counter() - self.started)
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            await self._exit_current()
        finally:
            self._failed = exc[0] is not None or any(s.end is None for s in self.segments)
            self._close()

    def __aiter__(self) -> SpokenGeneration:
        return self

    async def __anext__(self) -> AudioChunk:
        while self._current is not None:
            try:
                chunk = await self._current.__anext__()
            except StopAsyncIteration:
                await self._finish_segment()
                if self._index + 1 >= len(self.segments):
                    raise
                await self._next_segment()
                continue
            if self.conversation is not None:  # its audio becomes the next segment's context
                self._audio.append(chunk.audio)
            self.samples += chunk.audio.size
            self.watermarked = self.watermarked or chunk.watermarked
            chunk = dataclasses.replace(
                chunk, index=self._chunks, is_last=chunk.is_last and self._index == len(self.segments) - 1
            )
            self._chunks += 1
            return chunk
        raise StopAsyncIteration

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0

    def report(self) -> list[dict]:
        return [s.public() for s in self.segments]

    # -- the segments ------------------------------------------------------------------------------------------------
    async def _next_segment(self) -> None:
        self._index += 1
        self._audio = []
        options = dataclasses.replace(self.options, text=self.segments[self._index].text)
        generation = Generation(
            self.pool,
            options,
            self.lease.triton_request_id if self.lease is not None else None,
            self.watermark_default,
            self.conversation,
            self.reference,
        )
        await generation.__aenter__()  # on failure it has closed itself
        self._current = generation
        self.watermarked = self.watermarked or generation.watermarked

    async def _finish_segment(self) -> None:
        generation, self._current = self._current, None
        await generation.__aexit__(None, None, None)
        segment = self.segments[self._index]
        segment.samples = generation.samples
        frames = math.ceil(segment.samples / SAMPLES_PER_FRAME)
        limit_ms = segment_audio_limit_ms(generation.options)
        segment.end = "length" if frames >= limit_ms // FRAME_MS else "eos"
        if segment.end == "length":
            log.warning(
                "segment %d of %d ended without its end-of-speech frame (ran to its %d ms limit)",
                self._index + 1,
                len(self.segments),
                limit_ms,
            )
        if self.lease is not None:
            self.lease.admission.metrics.text_segments.labels(segment.end).inc()
        if self.conversation is not None and self._audio:
            self.conversation.add(self.options.speaker_id, segment.text, np.concatenate(self._audio))

    async def _exit_current(self) -> None:
        """Leave the segment now generating (a client gone, a failure): its Triton stream is cancelled."""
        generation, self._current = self._current, None
        if generation is not None:
            await generation.__aexit__(None, None, None)

    def _close(self) -> None:
        if self.lease is not None:
            self.lease.closed(time.perf_counter() - self.started, self.samples / SAMPLE_RATE, self._failed)
