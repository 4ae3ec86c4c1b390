"""One text chunk through Triton, with voice-continuity context: `async with Generation(...) as g: async for c in g`.

The context is the voice's reference segments (a preset's or the request's clip: always sent, first) followed by the
conversation's (newest segments that fit the model's window). If Triton still finds the prompt too long
(INVALID_ARG "... context holds ..."), the oldest conversation segment is dropped and the request retried, down to
none; only then is the error the client's.

Every endpoint generates through here, so this is where the request's scope (proxy/scope.py) admits a stream
(watermark policy, API key limits, drain) and hears its time to first audio and its end (metrics).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from csm_tts import SAMPLE_RATE
from proxy.api import GenerateOptions
from proxy.context import Conversation, Segment
from proxy.scope import current_scope
from proxy.triton_client import AudioChunk, TritonPool, TritonStream, UpstreamRejected

CONTEXT_TOO_LONG = "context holds"


class Generation:
    def __init__(
        self,
        pool: TritonPool,
        options: GenerateOptions,
        watermark_default: bool | None = None,
        conversation: Conversation | None = None,
        reference: Sequence[Segment] = (),
    ):
        self.pool = pool
        self.reference = list(reference)
        self.options = options
        self.parameters = options.triton_parameters(watermark_default)
        self.context: list[Segment] = (
            conversation.context_for(options.text, options.max_audio_length_ms) if conversation else []
        )
        self.started = time.perf_counter()
        self.watermarked = False
        self.key_id: str | None = None
        self.samples = 0
        self.scope = current_scope()
        self._stream: TritonStream | None = None
        self._first: AudioChunk | None = None
        self._ended = False
        self._admitted = False

    async def __aenter__(self) -> Generation:
        hooks = self.scope.hooks if self.scope is not None else None
        if hooks is not None:
            hooks.admit(self.scope, self.options)  # may refuse: 403 policy, 429 key limit, 503 draining
            self._admitted = True
        try:
            await self._open()
        except BaseException:
            self._close(failed=True)
            raise
        if hooks is not None:
            hooks.first_audio(self.scope, time.perf_counter() - self.started)
        return self

    async def _open(self) -> None:
        while True:
            stream = self.pool.stream(self.options.text, self.parameters, [*self.reference, *self.context])
            await stream.__aenter__()
            try:
                self._first = await stream.__anext__()
            except UpstreamRejected as e:
                await stream.__aexit__(None, None, None)
                if self.context and CONTEXT_TOO_LONG in e.message:
                    self.context = self.context[1:]
                    continue
                raise
            except BaseException:
                await stream.__aexit__(None, None, None)
                raise
            self._stream = stream
            self._note(self._first)
            return

    async def __aexit__(self, *exc) -> None:
        try:
            if self._stream is not None:
                await self._stream.__aexit__(*exc)
                self._stream = None
        finally:
            self._close(failed=exc[0] is not None or not self._ended)

    def _close(self, failed: bool) -> None:
        if self._admitted:
            self._admitted = False
            seconds = time.perf_counter() - self.started
            self.scope.hooks.closed(self.scope, seconds, self.samples / SAMPLE_RATE, failed)

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> AudioChunk:
        if self._first is not None:
            chunk, self._first = self._first, None
            return chunk
        if self._stream is None or self._ended:
            raise StopAsyncIteration
        chunk = await self._stream.__anext__()
        self._note(chunk)
        return chunk

    def _note(self, chunk: AudioChunk) -> None:
        self._ended = chunk.is_last
        self.samples += chunk.audio.size
        self.watermarked = self.watermarked or chunk.watermarked
        self.key_id = chunk.key_id or self.key_id

    def elapsed_ms(self, since: float | None = None) -> float:
        return (time.perf_counter() - (self.started if since is None else since)) * 1000.0


@dataclass
class Clip:
    audio: np.ndarray
    watermarked: bool
    processing_time_ms: float


async def synthesize(
    pool: TritonPool,
    options: GenerateOptions,
    watermark_default: bool | None = None,
    conversation: Conversation | None = None,
    reference: Sequence[Segment] = (),
) -> Clip:
    """The whole clip of one text (non-streaming endpoints)."""
    parts = []
    async with Generation(pool, options, watermark_default, conversation, reference) as generation:
        async for chunk in generation:
            if chunk.audio.size:
                parts.append(chunk.audio)
    audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return Clip(audio=audio, watermarked=generation.watermarked, processing_time_ms=generation.elapsed_ms())
