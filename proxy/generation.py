"""One text through Triton, with voice-continuity context: `async with Generation(...) as g: async for c in g`.

The context is the voice's reference segments (a preset's or the request's clip: always sent, first) followed by the
conversation's (newest segments that fit the model's window). If the engine still finds the prompt too long (the
reason code CONTEXT_TOO_LONG, csm_tts/limits.py), the oldest conversation segment is dropped and the request
retried, down to none; only then is the error the client's.

Entering waits for the first audio chunk, so everything that fails before it is still an ordinary HTTP error. The
stream was admitted before (proxy/admission.py): its `Lease` gives each Triton request its id and hears the first
audio and the end (metrics, the key's stream slot).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from csm_tts import SAMPLE_RATE
from csm_tts.limits import CONTEXT_TOO_LONG
from csm_tts.speech.request import ContextSegment
from proxy.admission import Lease
from proxy.conversation import Conversation
from proxy.parse.job import GenerateOptions
from proxy.upstream.errors import UpstreamRejected
from proxy.upstream.pool import TritonPool
from proxy.upstream.stream import AudioChunk, TritonStream


class Generation:
    def __init__(
        self,
        pool: TritonPool,
        options: GenerateOptions,
        lease: Lease | None = None,
        watermark_default: bool | None = None,
        conversation: Conversation | None = None,
        reference: Sequence[ContextSegment] = (),
    ):
        self.pool = pool
        self.lease = lease
        self.reference = list(reference)
        self.options = options
        self.parameters = options.triton_parameters(watermark_default)
        self.context: list[ContextSegment] = (
            conversation.context_for(options.text, options.max_audio_length_ms) if conversation else []
        )
        self.started = time.perf_counter()
        self.watermarked = False
        self.key_id: str | None = None
        self.samples = 0
        self._stream: TritonStream | None = None
        self._first: AudioChunk | None = None
        self._ended = False

    async def __aenter__(self) -> Generation:
        try:
            await self._open()
        except BaseException:
            self._close(failed=True)
            raise
        if self.lease is not None:
            self.lease.first_audio(time.perf_counter() - self.started)
        return self

    async def _open(self) -> None:
        while True:
            request_id = self.lease.triton_request_id() if self.lease is not None else ""
            stream = self.pool.stream(self.options.text, self.parameters, [*self.reference, *self.context], request_id)
            await stream.__aenter__()
            try:
                self._first = await stream.__anext__()
            except UpstreamRejected as e:
                await stream.__aexit__(None, None, None)
                if self.context and e.reason == CONTEXT_TOO_LONG:
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
        if self.lease is not None:
            self.lease.closed(time.perf_counter() - self.started, self.samples / SAMPLE_RATE, failed)

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

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0


@dataclass
class Clip:
    audio: np.ndarray
    watermarked: bool
    processing_time_ms: float


async def synthesize(generation: Generation) -> Clip:
    """The whole clip of one text (non-streaming endpoints)."""
    parts = []
    async with generation:
        async for chunk in generation:
            if chunk.audio.size:
                parts.append(chunk.audio)
    audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return Clip(audio=audio, watermarked=generation.watermarked, processing_time_ms=generation.elapsed_ms())
