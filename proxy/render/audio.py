"""The ONE audio renderer: a generation's float chunks -> the bytes of the answer's form, chunk by chunk, in the
bounded thread pool. Forms: the API's response formats (mp3, opus, aac, flac, wav, pcm: proxy/formats.py) and the
WebSocket's raw sample formats (s16le, f32le). The bytes of one generation concatenate to one complete file.

`play` is the one "generate -> render -> send -> finish" loop every streaming endpoint runs (HTTP file, SSE,
WebSocket stream mode, the ElevenLabs socket at its own rates); each piece is sent before the next chunk is read, so a
slow reader slows its own stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable
from concurrent.futures import Future

import numpy as np

from proxy.formats import FORMATS, SAMPLE_FORMATS, AudioFormat
from proxy.render.encoders import StreamEncoder
from proxy.render.offload import Offload
from proxy.render.pcm import pcm_bytes


class AudioRenderer:
    def __init__(self, form: str | AudioFormat, offload: Offload):
        """`form`: a response format's or a sample format's name, or an `AudioFormat` of the caller's own (the
        ElevenLabs socket's rates and bit rates)."""
        self.form = form
        self.offload = offload
        self.samples_in = 0
        if isinstance(form, AudioFormat):
            self._encoder = StreamEncoder(form)
        else:
            self._encoder = StreamEncoder(FORMATS[form]) if form not in SAMPLE_FORMATS else None
        self._job: Future | None = None  # the pool's job now running on the encoder

    async def chunk(self, audio: np.ndarray) -> bytes:
        self.samples_in += audio.size
        if self._encoder is None:
            return await self._run(pcm_bytes, audio, self.form)
        return await self._run(self._encoder.encode, audio)

    async def finish(self) -> bytes:
        """The encoder's last frames and its trailer (b"" for raw PCM)."""
        return b"" if self._encoder is None else await self._run(self._encoder.finish)

    def close(self) -> None:
        """Release FFmpeg's state (a client that went away); after the job in flight, if one is."""
        if self._encoder is None:
            return
        if self._job is not None and not self._job.done():
            self._job.add_done_callback(lambda _: self._encoder.close())
        else:
            self._encoder.close()

    async def _run(self, function, *args) -> bytes:
        self._job = self.offload.submit(function, *args)
        return await self.offload.wait(self._job)


async def play(
    chunks: AsyncIterable,
    renderer: AudioRenderer,
    send: Callable[[bytes, np.ndarray], Awaitable[None]],
) -> None:
    """Each audio chunk rendered and sent (`send(data, audio)`), then the renderer's tail (`send(tail, empty)`)."""
    async for chunk in chunks:
        if chunk.audio.size:
            await send(await renderer.chunk(chunk.audio), chunk.audio)
    tail = await renderer.finish()
    if tail:
        await send(tail, np.zeros(0, np.float32))
