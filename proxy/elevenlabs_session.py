"""One ElevenLabs input-streaming connection (proxy/endpoints/elevenlabs.py; the protocol's values are
csm_tts/text/elevenlabs.py, its per-connection rules elevenlabs_contexts.py, docs/elevenlabs.md).

Each context (stream-input has one, `None`) has its own text stream (proxy/text_stream.py: the server cuts the
pieces) and its own speaker task, which generates the cuts in order and sends `{"audio", "contextId"}` answers in
the connection's output format, then `{"isFinal": true}` once a closed (or, on stream-input, ended) context has
been spoken. The contexts of a connection share one conversation, so the voice carries on from turn to turn.
`close_context` after unflushed text is a barge-in: the speaker task is cancelled, which cancels its Triton stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np
from aiohttp import WSMsgType, web

from csm_tts.text import elevenlabs as el
from csm_tts.text.elevenlabs_contexts import Contexts
from csm_tts.text.incremental import StreamPolicy
from proxy.appkeys import ADMISSION, OFFLOAD, SCOPE, SETTINGS, TRITON
from proxy.conversation import ContextBudget, Conversation
from proxy.errors import ApiError
from proxy.formats import AudioFormat
from proxy.parse.job import GenerateOptions
from proxy.render.audio import AudioRenderer, play
from proxy.spoken import SpokenGeneration
from proxy.text_stream import CutPlan, TextStream
from proxy.upstream.errors import UpstreamError

log = logging.getLogger("proxy.elevenlabs")
POLL_S = 0.1  # how often waiting text is checked against the segmenter's max wait
FINAL = None  # queued after a context's last cut: send isFinal


def audio_format(fmt: el.OutputFormat) -> AudioFormat:
    """The connection's output format for the shared renderer: 16-bit PCM at any rate, or MP3 (soxr resamples)."""
    if fmt.codec == "mp3":
        bit_rate = (fmt.bitrate_kbps or 128) * 1000
        return AudioFormat(fmt.name, "audio/mpeg", "mp3", "mp3", "libmp3lame", fmt.sample_rate, bit_rate)
    return AudioFormat(fmt.name, "audio/pcm", "pcm", sample_rate=fmt.sample_rate)


@dataclass
class Context:
    id: str | None
    text: TextStream
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    task: asyncio.Task | None = None


class ElevenLabsSession:
    def __init__(self, ws: web.WebSocketResponse, request: web.Request, query: el.StreamQuery, options, reference):
        app = request.app
        self.ws = ws
        self.query = query
        self.options: GenerateOptions = options
        self.reference = reference
        self.scope = request[SCOPE]
        self.settings = app[SETTINGS]
        self.pool = app[TRITON]
        self.admission = app[ADMISSION]
        self.offload = app[OFFLOAD]
        self.rules = Contexts(multi=query.multi)
        self.contexts: dict[str | None, Context] = {}
        # Voice continuity across turns, unless the operator turned it off (PROXY_CONTEXT_ENABLED=false).
        budget = ContextBudget.from_settings(self.settings)
        self.conversation = Conversation(budget) if self.settings.context_enabled else None
        self.send_lock = asyncio.Lock()
        self.last_message = time.monotonic()
        self.policy = StreamPolicy()
        self.tasks: set[asyncio.Task] = set()  # every context's speaker, closed ones still finishing included

    async def run(self) -> None:
        ticker = asyncio.create_task(self.tick(), name="elevenlabs-ticker")
        try:
            await self.read_loop()
        finally:
            ticker.cancel()
            tasks = [ticker, *self.tasks]
            for task in tasks:
                task.cancel()  # a speaker's SpokenGeneration cancels its Triton stream on the way out
            await asyncio.gather(*tasks, return_exceptions=True)

    async def read_loop(self) -> None:
        while True:
            timeout = self.query.inactivity_timeout_s - (time.monotonic() - self.last_message)
            try:
                msg = await self.ws.receive(timeout=max(0.01, timeout))
            except TimeoutError:
                await self.fail(
                    el.ProtocolError(f"no message for {self.query.inactivity_timeout_s} s", 1008, "timeout")
                )
                return
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                return  # closed, closing or an error (a message over the size limit)
            self.last_message = time.monotonic()
            try:
                message = self.rules.admit(el.parse_message(msg.data, multi=self.query.multi))
            except el.ProtocolError as problem:
                await self.fail(problem)
                return
            if isinstance(message, el.CloseSocket):
                await self.ws.close()
                return
            await self.handle(message)
            if isinstance(message, el.EndOfInput):
                await asyncio.gather(*list(self.tasks), return_exceptions=True)
                await self.ws.close()
                return

    async def handle(self, message) -> None:
        if isinstance(message, el.Text):
            context = self.context(message)
            cuts = context.text.feed(message.text)
            if message.flush:
                cuts += context.text.flush()
            self.queue(context, cuts)
        elif isinstance(message, el.Flush):
            context = self.contexts.get(message.context_id)
            if context is not None:
                self.queue(context, context.text.flush())
        elif isinstance(message, el.CloseContext):
            context = self.contexts.pop(message.context_id, None)
            if context is None:
                return
            if message.interrupt:  # barge-in: nobody will hear the rest
                self.stop(context)
            else:
                self.queue(context, context.text.flush())
                context.queue.put_nowait(FINAL)
        elif isinstance(message, el.EndOfInput):
            for context in self.contexts.values():
                self.queue(context, context.text.flush())
                context.queue.put_nowait(FINAL)

    def context(self, message: el.Text) -> Context:
        context = self.contexts.get(message.context_id)
        if context is None:
            policy = self.policy
            if message.chunk_length_schedule:  # its first number: the early first cut's length
                policy = StreamPolicy(first_max_chars=min(message.chunk_length_schedule[0], policy.max_bytes))
            # self.options has no text (the endpoint's): each cut brings its own
            context = Context(message.context_id, TextStream(self.options, policy, self.query.language_code or "en"))
            context.task = asyncio.create_task(self.speak(context), name="elevenlabs-context")
            self.tasks.add(context.task)
            context.task.add_done_callback(self.tasks.discard)
            self.contexts[message.context_id] = context
        return context

    def queue(self, context: Context, cuts: list[CutPlan]) -> None:
        for cut in cuts:
            if cut.plan is not None:
                context.queue.put_nowait(cut)

    def stop(self, context: Context) -> None:
        context.text.reset()
        if context.task is not None:
            context.task.cancel()

    async def tick(self) -> None:
        """Text that waited longer than the policy's max wait is spoken anyway."""
        while True:
            await asyncio.sleep(POLL_S)
            for context in list(self.contexts.values()):
                self.queue(context, context.text.poll())

    # -- one context's speech ----------------------------------------------------------------------------------------
    async def speak(self, context: Context) -> None:
        try:
            while True:
                cut = await context.queue.get()
                if cut is FINAL:
                    await self.send(el.final(context.id))
                    return
                await self.generate(context, cut)
        except (ConnectionError, asyncio.CancelledError):
            return

    async def generate(self, context: Context, cut: CutPlan) -> None:
        renderer = AudioRenderer(audio_format(self.query.output_format), self.offload)

        async def send(data: bytes, audio: np.ndarray) -> None:
            if data:  # an encoder may hold a chunk's audio back for its next frame
                await self.send(el.audio(data, context.id))

        try:
            with self.admission.admit(self.scope, cut.plan.options, self.pool) as lease:
                watermark = self.settings.watermark_enabled
                async with SpokenGeneration(
                    self.pool, cut.plan, lease, watermark, self.conversation, self.reference
                ) as generation:
                    await play(generation, renderer, send)
        except (UpstreamError, ApiError) as e:
            log.warning("ElevenLabs context %r: a segment failed: %s", context.id, e.message)
            fields = {"message": e.message, "error": "generation_failed"}
            await self.send(el.Answer({**fields, **({"contextId": context.id} if context.id is not None else {})}))
        finally:
            renderer.close()  # after the encode job in flight, if a barge-in cancelled this task during one

    async def send(self, answer: el.Answer) -> None:
        async with self.send_lock:
            async with asyncio.timeout(self.settings.ws_send_timeout_s):
                await self.ws.send_str(answer.as_json())

    async def fail(self, problem: el.ProtocolError) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError):
            await self.send(el.error(problem))
            await self.ws.close(code=problem.close_code, message=str(problem).encode()[:120])
