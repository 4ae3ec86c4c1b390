"""One WS /stream session: its message queue and the two tasks that serve it (the socket's protocol is parsed by
proxy/parse/websocket.py; audio is rendered and framed by proxy/render/).

The reader (`async for msg in ws`) parses and queues; the worker handles the queue in order, one text chunk at a
time, so every client message gets its reply in order, and a client that hangs up is noticed at once (its Triton
stream is cancelled) even while a chunk is being generated. A cancel is answered by the reader itself, at once: it
never waits for the cancelled generation to unwind, so the reply leaves before a close that follows is read.
Each text is admitted on its own (proxy/admission.py) before its context is built: a key's limits and the drain
apply per text.

Flow control: the queue holds at most `ws_max_pending` text chunks (more are refused with an error); each audio
message is written before the next Triton response is read, so a slow reader slows its own stream instead of
filling the proxy's memory; a client that accepts nothing for `ws_send_timeout_s` is disconnected (close code 1008)
and its Triton stream cancelled.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from csm_tts import SAMPLE_RATE
from proxy.appkeys import ADMISSION, OFFLOAD, SCOPE, SETTINGS, TRITON
from proxy.conversation import ContextBudget, Conversation
from proxy.errors import ApiError
from proxy.parse.job import GenerateOptions
from proxy.parse.native import NO_TEXT, parse_generate
from proxy.parse.websocket import StreamConfig, is_blank, parse_stream_config, read_message, text_of
from proxy.render.audio import AudioRenderer, play
from proxy.render.frames import wav_message, ws_audio, ws_reply
from proxy.spoken import SpeechPlan, SpokenGeneration, plan_speech
from proxy.upstream.errors import UpstreamError

log = logging.getLogger("proxy.websocket")


class SlowClient(Exception):
    pass


class ClientGone(Exception):
    pass


class StreamSession:
    def __init__(self, ws: web.WebSocketResponse, request: web.Request, config: StreamConfig):
        app = request.app
        self.ws = ws
        self.request = request
        self.scope = request[SCOPE]
        self.config = config
        self.settings = settings = app[SETTINGS]
        self.pool = app[TRITON]
        self.admission = app[ADMISSION]
        self.offload = app[OFFLOAD]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending_texts = 0
        self.send_lock = asyncio.Lock()
        self.seq = 0
        self.chunk_ids = itertools.count()
        self.conversation = Conversation(ContextBudget.from_settings(settings))
        self.current: asyncio.Task | None = None
        self.finishing = False

    # -- the two tasks -----------------------------------------------------------------------------------------------
    async def run(self) -> None:
        reader = asyncio.create_task(self.read_loop(), name="ws-reader")
        worker = asyncio.create_task(self.work(), name="ws-worker")
        try:
            await asyncio.wait({reader, worker}, return_when=asyncio.FIRST_COMPLETED)
            # The reader also sends (the cancelled reply, refusals): a slow client may stop either task.
            ended = worker if worker.done() else reader
            if not ended.cancelled():
                error = ended.exception()
                if error is None and ended is worker:  # {"done": true}: everything answered
                    await self.close(WSCloseCode.OK, b"")
                elif isinstance(error, SlowClient):
                    log.warning("closing a WebSocket whose client accepts no data: %s", error)
                    await self.close(WSCloseCode.POLICY_VIOLATION, str(error).encode()[:120])
                elif error is not None and not isinstance(error, ClientGone):
                    log.error("WebSocket session failed", exc_info=error)
                    await self.close(WSCloseCode.INTERNAL_ERROR, b"internal error")
        finally:
            for task in (worker, reader):
                task.cancel()  # the worker's Generation cancels its Triton stream on the way out
            await asyncio.gather(worker, reader, return_exceptions=True)

    async def close(self, code: int, message: bytes) -> None:
        try:
            async with asyncio.timeout(1.0):
                await self.ws.close(code=code, message=message)
        except (TimeoutError, ConnectionError):
            if self.request.transport is not None:
                self.request.transport.abort()  # the client reads nothing, not even our close frame

    async def read_loop(self) -> None:
        async for msg in self.ws:
            if msg.type == WSMsgType.TEXT:
                try:
                    await self.on_message(msg.data)
                except (ClientGone, SlowClient):
                    raise
                except Exception:  # a bug must cost one message its reply, never the session its reader
                    log.exception("WebSocket message failed")
                    await self.send_reply({"error": "Internal error while reading the message"})
            elif msg.type == WSMsgType.BINARY:
                await self.enqueue(("error", {"error": "Binary frames are not accepted: send JSON text messages"}))
            else:  # ERROR (e.g. a message over the size limit): aiohttp closes the socket
                break

    async def on_message(self, raw: str) -> None:
        message = read_message(raw)  # the protocol: proxy/parse/websocket.py
        if message.kind == "malformed":
            await self.enqueue(("error", message.payload))  # answered in order, even after done
            return
        if self.finishing:
            # Answered at once: the queue ends with "done", and its worker stops there.
            await self.send_reply({"error": "The session is closing: no messages are accepted after done"})
            return
        if message.kind == "invalid":
            await self.enqueue(("error", message.payload))
        elif message.kind == "cancel":
            await self.cancel_all()
        elif message.kind == "done":
            self.finishing = True
            await self.queue.put(("done", None))
        elif message.kind == "config":
            await self.enqueue(("config", message.payload))
        elif self.pending_texts >= self.settings.ws_max_pending:
            # Refused at once (not queued): the client sends faster than audio can be generated. Pending counts the
            # chunk being generated and the queued ones.
            text = text_of(message.payload)
            await self.send_reply(
                {
                    "error": f"Too many pending text chunks (limit {self.settings.ws_max_pending}): "
                    "wait for audio before sending more",
                    **({"text": text} if text is not None else {}),
                }
            )
        else:
            self.pending_texts += 1
            await self.queue.put(("text", message.payload))

    async def enqueue(self, item) -> None:
        """Replies go through the queue so that they keep the order of the messages they answer; when the client
        floods the queue, they are sent at once instead."""
        if self.queue.qsize() >= self.settings.ws_max_pending * 2:
            await self.send_reply(item[1] if item[0] == "error" else {"error": "Too many pending messages"})
        else:
            await self.queue.put(item)

    async def cancel_all(self) -> None:
        """Answered by the reader itself, before it reads the next message: a client that sends cancel, done and
        then closes at once (the demo's Stop) gets its reply before the close is read (aiohttp answers a close
        frame at once, and nothing can be sent after it). The cancelled generation unwinds (its Triton stream is
        cancelled) meanwhile; it sends nothing more. Replies still queued answer earlier messages: sent first."""
        kept, dropped = [], 0
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item[0] == "text":
                dropped += 1
                self.pending_texts -= 1
            else:
                kept.append(item)
        if self.current is not None and not self.current.done():
            self.current.cancel()
            dropped += 1
        for item in kept:
            await self.handle(item)
        await self.send_reply({"status": "cancelled", "dropped": dropped}, kind="cancelled")

    async def work(self) -> None:
        while True:
            kind, payload = item = await self.queue.get()
            if kind == "done":
                await self.send_reply({"status": "closed"}, kind="closed")
                return
            if kind == "text":
                try:
                    await self.run_text(payload)
                finally:
                    self.pending_texts -= 1
            else:
                await self.handle(item)

    async def handle(self, item) -> None:
        """A queued reply that generates nothing (an error, a config)."""
        kind, payload = item
        if kind == "error":
            await self.send_reply(payload)
        elif kind == "config":
            try:
                self.config = parse_stream_config(payload, self.config)
            except ApiError as e:
                await self.send_reply({"error": e.message})
            else:
                await self.send_reply(
                    {"status": "configured", "config": self.config.public(), "sample_rate": SAMPLE_RATE},
                    kind="config",
                )

    async def run_text(self, data: dict) -> None:
        if is_blank(data):
            await self.send_reply({"error": NO_TEXT})  # the documented reply, exactly
            return
        text = text_of(data)
        echo = {"text": text} if text is not None else {}
        try:
            options = parse_generate(data, defaults=self.config.options)
        except ApiError as e:
            await self.send_reply({"error": e.message, **echo})
            return
        await self.run_generation(options)

    async def run_generation(self, options: GenerateOptions, plan: SpeechPlan | None = None) -> None:
        """One text (or one planned cut of a text stream) generated as the current task, cancellable."""
        chunk_id = next(self.chunk_ids)
        self.current = asyncio.create_task(self.generate(options, chunk_id, plan))
        try:
            await asyncio.wait({self.current})
        finally:
            if not self.current.done():  # the worker itself is being cancelled (client gone)
                self.current.cancel()
                await asyncio.gather(self.current, return_exceptions=True)
        task, self.current = self.current, None
        if task.cancelled() or task.exception() is None:
            return
        if isinstance(task.exception(), (ClientGone, SlowClient)):
            raise task.exception()
        # A bug or an unexpected failure: this chunk gets an error reply, the session goes on.
        log.error("WebSocket text chunk failed", exc_info=task.exception())
        where = {"chunk_id": chunk_id} if self.config.streaming else {}
        await self.send_reply({"error": "Internal error while generating this text", "text": options.text, **where})

    # -- one text chunk ----------------------------------------------------------------------------------------------
    async def generate(self, options: GenerateOptions, chunk_id: int, plan: SpeechPlan | None = None) -> None:
        conversation = self.conversation if self.config.context else None
        streaming = self.config.streaming
        where = {"chunk_id": chunk_id} if streaming else {}
        parts = []
        sent = 0
        first_proxy_ms = first_audio_ms = None
        started = time.perf_counter()
        # Stream mode: each chunk as it comes (PCM, or pieces of one encoded file); message mode: one WAV at the end
        # (`parts`: only message mode keeps the audio).
        renderer = AudioRenderer(self.config.sample_format, self.offload) if streaming else None

        async def send(payload: bytes, audio: np.ndarray) -> None:
            nonlocal sent, first_proxy_ms, first_audio_ms
            received = time.perf_counter()
            await self.send_audio(payload, audio.size, chunk_id, sent)
            if first_proxy_ms is None:
                now = time.perf_counter()
                first_proxy_ms = (now - received) * 1000.0
                first_audio_ms = (now - started) * 1000.0
            sent += 1

        try:
            # Admission of this text (policy, key limits, drain, full) before its context is built.
            plan = plan or plan_speech(options)  # long texts: several segments, spoken as one
            with self.admission.admit(self.scope, options, self.pool) as lease:
                watermark = self.settings.watermark_enabled
                async with SpokenGeneration(self.pool, plan, lease, watermark, conversation) as generation:
                    if renderer is not None:
                        await play(generation, renderer, send)
                    else:
                        parts.extend([c.audio async for c in generation if c.audio.size])
        except (UpstreamError, ApiError) as e:
            await self.send_reply({"error": e.message, "text": options.text, **where})
            return
        finally:
            if renderer is not None:
                renderer.close()
        processing_ms = (time.perf_counter() - started) * 1000.0
        if streaming:  # the audio has gone out chunk by chunk: only its size is reported
            samples = generation.samples
            await self.send_reply(
                {
                    "chunk_id": chunk_id,
                    "text": options.text,
                    "final": True,
                    "audio_messages": sent,
                    "samples": samples,
                    "sample_rate": SAMPLE_RATE,
                    "duration_ms": samples * 1000.0 / SAMPLE_RATE,
                    "processing_time_ms": processing_ms,
                    "first_audio_ms": first_audio_ms,
                    "first_audio_proxy_ms": first_proxy_ms,
                    "watermarked": generation.watermarked,
                    "segments": generation.report(),  # what was spoken, with spans of the text
                },
                kind="end",
            )
        else:
            fields = {
                "audio_base64": None,
                "sample_rate": SAMPLE_RATE,
                "processing_time_ms": processing_ms,
                "text": options.text,
            }
            # The documented shape, built in the pool.
            reply = await self.offload.run(wav_message, fields, _concat(parts))
            async with self.send_lock:
                await self._send(reply)

    # -- sending -----------------------------------------------------------------------------------------------------
    async def send_audio(self, payload: bytes, samples: int, chunk_id: int, index: int) -> None:
        """One audio message (proxy/render/frames.py): the PCM or encoded bytes of one chunk."""
        async with self.send_lock:
            frame = ws_audio(
                payload, samples, self._next_seq(), chunk_id, index, self.config.sample_format, self.config.binary
            )
            await self._send(frame)

    async def send_reply(self, body: dict, kind: str | None = None) -> None:
        async with self.send_lock:
            seq = self._next_seq() if self.config.streaming else 0
            await self._send(ws_reply(body, self.config.streaming, seq, self.scope.request_id, kind))

    def _next_seq(self) -> int:
        seq = self.seq
        self.seq += 1
        return seq

    async def _send(self, data: str | bytes) -> None:
        if self.ws.closed:
            raise ClientGone("the socket is closed")
        try:
            async with asyncio.timeout(self.settings.ws_send_timeout_s):
                if isinstance(data, bytes):
                    await self.ws.send_bytes(data)
                else:
                    await self.ws.send_str(data)
        except TimeoutError:
            raise SlowClient(f"client accepted no data for {self.settings.ws_send_timeout_s:g} s") from None
        except ConnectionError as e:  # aiohttp's ClientConnectionResetError is one
            raise ClientGone(str(e)) from None


def _concat(parts: list) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
