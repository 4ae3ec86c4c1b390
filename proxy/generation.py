"""One text through Triton, with voice-continuity context: `async with Generation(...) as g: async for c in g`.

The context is the voice's reference segments (a preset's or the request's clip: always sent, first) followed by the
conversation's (newest segments that fit the model's window). If the engine still finds the prompt too long (the
reason code CONTEXT_TOO_LONG, csm_tts/limits.py), the oldest conversation segment is dropped and the request
retried, down to none; only then is the error the client's.

Entering waits for the first audio chunk, so everything that fails before it is still an ordinary HTTP error. The
stream was admitted before (proxy/admission.py): `request_ids` (its `Lease`'s) gives each Triton request its id; the
whole text's `SpokenGeneration` (proxy/spoken.py) reports its first audio and its end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from csm_tts.limits import CONTEXT_TOO_LONG
from csm_tts.speech.request import ContextSegment
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
        request_ids: Callable[[], str] | None = None,
        watermark_default: bool | None = None,
        conversation: Conversation | None = None,
        reference: Sequence[ContextSegment] = (),
    ):
        self.pool = pool
        self.request_ids = request_ids
        self.reference = list(reference)
        self.options = options
        self.parameters = options.triton_parameters(watermark_default)
        self.context: list[ContextSegment] = (
            conversation.context_for(options.text, options.max_audio_length_ms) if conversation else []
        )
        self.started = time.perf_counter()
        self.watermarked = False
        self.samples = 0
        self._stream: TritonStream | None = None
        self._first: AudioChunk | None = None
        self._ended = False

    async def __aenter__(self) -> Generation:
        while True:
            request_id = self.request_ids() if self.request_ids is not None else ""
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
            return self

    async def __aexit__(self, *exc) -> None:
        if self._stream is not None:
            await self._stream.__aexit__(*exc)
            self._stream = None

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
