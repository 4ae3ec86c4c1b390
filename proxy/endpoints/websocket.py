"""WS /stream: an LLM's text chunks in, audio out; one session per socket (docs/api.md describes every message).

Two tasks per socket. The reader (`async for msg in ws`) only parses and queues; the worker handles the queue in
order, one text chunk at a time, so every client message gets its reply in order, and a client that hangs up is
noticed at once (its Triton stream is cancelled) even while a chunk is being generated.

Flow control: the queue holds at most `ws_max_pending` text chunks (more are refused with an error); each audio
message is written before the next Triton response is read, so a slow reader slows its own stream instead of
filling the proxy's memory; a client that accepts nothing for `ws_send_timeout_s` is disconnected (close code 1008)
and its Triton stream cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import socket
import struct
import time

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from csm_tts import SAMPLE_RATE
from proxy.api import (
    CONFIG_KEYS,
    ENCODED_FORMATS,
    NO_TEXT,
    OPTION_NAMES,
    ApiError,
    GenerateOptions,
    StreamConfig,
    parse_generate,
    parse_query,
    parse_stream_config,
)
from proxy.audio import pcm_bytes, run_sized, wav_base64
from proxy.auth import WS_PROTOCOL
from proxy.context import ContextBudget, Conversation
from proxy.cors import origin_allowed
from proxy.encoders import FORMATS, StreamEncoder
from proxy.settings import Settings
from proxy.synthesis import Generation
from proxy.triton_client import TritonPool, UpstreamError
from proxy.web import METRICS, REQUEST_ID, SETTINGS, TRITON, WEBSOCKETS

log = logging.getLogger("proxy.websocket")

# Binary audio frame header (stream mode, binary=true): seq, chunk_id, index, samples as little-endian uint32.
FRAME_HEADER = struct.Struct("<IIII")


async def stream_ws(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    origin = request.headers.get("Origin", "")
    if origin and settings.cors_origins and not origin_allowed(settings, origin):
        raise ApiError(403, f"Origin {origin!r} is not allowed (PROXY_CORS_ORIGINS)")
    # Query: the session's config and default generation options, as a first {"config": {...}} message would set.
    config = parse_stream_config(
        parse_query(request.query, (*CONFIG_KEYS, *OPTION_NAMES)), StreamConfig(context=settings.context_enabled)
    )
    # No permessage-deflate: PCM and base64 audio barely compress, and deflating costs latency and CPU.
    ws = web.WebSocketResponse(
        heartbeat=settings.ws_heartbeat_s,
        max_msg_size=settings.max_body_bytes,
        writer_limit=settings.ws_write_buffer_bytes,
        compress=False,
        # Browsers send the API key as a second subprotocol ("bearer.<key>", proxy/auth.py): select only ours.
        protocols=(WS_PROTOCOL,),
    )
    # Before the upgrade check: a plain GET then tells a browser why its handshake failed (the demo page does that).
    if len(app[WEBSOCKETS]) >= settings.max_websockets:
        app[METRICS].rejections.labels("full").inc()
        raise ApiError(
            503,
            f"Too many WebSocket connections (limit {settings.max_websockets}); retry later",
            headers={"Retry-After": "1"},
        )
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "WS /stream needs a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)")
    await ws.prepare(request)
    bound_socket_buffers(request, settings)
    app[WEBSOCKETS].add(ws)
    try:
        await StreamSession(ws, request, config, settings, app[TRITON]).run()
    finally:
        app[WEBSOCKETS].discard(ws)
    return ws


def bound_socket_buffers(request: web.Request, settings: Settings) -> None:
    """Flow control: the proxy holds at most ~ws_write_buffer_bytes (plus one message) for a client before its sends
    wait; optionally the kernel's send buffer is capped as well."""
    transport = request.transport
    if transport is None:
        return
    transport.set_write_buffer_limits(high=settings.ws_write_buffer_bytes)
    sock = transport.get_extra_info("socket")
    if settings.ws_socket_sndbuf and sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.ws_socket_sndbuf)


class SlowClient(Exception):
    pass


class ClientGone(Exception):
    pass


class StreamSession:
    def __init__(
        self, ws: web.WebSocketResponse, request: web.Request, config: StreamConfig, settings, pool: TritonPool
    ):
        self.ws = ws
        self.request = request
        self.config = config
        self.settings = settings
        self.pool = pool
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
            if worker.done() and not worker.cancelled():
                error = worker.exception()
                if error is None:  # {"done": true}: everything answered
                    await self.close(WSCloseCode.OK, b"")
                elif isinstance(error, SlowClient):
                    log.warning("closing a WebSocket whose client accepts no data: %s", error)
                    await self.close(WSCloseCode.POLICY_VIOLATION, str(error).encode()[:120])
                elif not isinstance(error, ClientGone):
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
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:  # RecursionError: deeply nested arrays or objects
            await self.enqueue(("error", {"error": f"Invalid JSON: {str(e)[:200]}"}))
            return
        if not isinstance(data, dict):
            await self.enqueue(("error", {"error": f"Each message must be a JSON object, got {type(data).__name__}"}))
            return
        if self.finishing:
            # Answered at once: the queue ends with "done", and its worker stops there.
            await self.send_reply({"error": "The session is closing: no messages are accepted after done"})
            return
        if "cancel" in data or "done" in data or "config" in data:
            key = next(k for k in ("cancel", "done", "config") if k in data)
            if len(data) != 1:
                await self.enqueue(("error", {"error": f"A {key!r} message must have no other fields"}))
            elif key == "cancel":
                await self.cancel_all(data["cancel"])
            elif key == "done":
                if data["done"] is not True:
                    await self.enqueue(("error", {"error": "done must be true"}))
                else:
                    self.finishing = True
                    await self.queue.put(("done", None))
            else:
                await self.enqueue(("config", data["config"]))
            return
        if self.pending_texts >= self.settings.ws_max_pending:
            # Refused at once (not queued): the client sends faster than audio can be generated. Pending counts the
            # chunk being generated and the queued ones.
            text = data.get("text")
            await self.send_reply(
                {
                    "error": f"Too many pending text chunks (limit {self.settings.ws_max_pending}): "
                    "wait for audio before sending more",
                    **({"text": text} if isinstance(text, str) else {}),
                }
            )
            return
        self.pending_texts += 1
        await self.queue.put(("text", data))

    async def enqueue(self, item) -> None:
        """Replies go through the queue so that they keep the order of the messages they answer; when the client
        floods the queue, they are sent at once instead."""
        if self.queue.qsize() >= self.settings.ws_max_pending * 2:
            await self.send_reply(item[1] if item[0] == "error" else {"error": "Too many pending messages"})
        else:
            await self.queue.put(item)

    async def cancel_all(self, value) -> None:
        if value is not True:
            await self.enqueue(("error", {"error": "cancel must be true"}))
            return
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
            self.queue.put_nowait(item)
        self.queue.put_nowait(("cancelled", dropped))

    async def work(self) -> None:
        while True:
            kind, payload = await self.queue.get()
            if kind == "error":
                await self.send_reply(payload)
            elif kind == "cancelled":
                await self.send_reply({"status": "cancelled", "dropped": payload}, kind="cancelled")
            elif kind == "done":
                await self.send_reply({"status": "closed"}, kind="closed")
                return
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
            elif kind == "text":
                try:
                    await self.run_text(payload)
                finally:
                    self.pending_texts -= 1

    async def run_text(self, data: dict) -> None:
        text = data.get("text")
        if text is None or (isinstance(text, str) and not text.strip()):
            await self.send_reply({"error": NO_TEXT})  # the documented reply, exactly
            return
        echo = {"text": text} if isinstance(text, str) else {}
        try:
            options = parse_generate(data, defaults=self.config.options)
        except ApiError as e:
            await self.send_reply({"error": e.message, **echo})
            return
        chunk_id = next(self.chunk_ids)
        self.current = asyncio.create_task(self.generate(options, chunk_id))
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
        where = {"chunk_id": chunk_id} if self.config.mode == "stream" else {}
        await self.send_reply({"error": "Internal error while generating this text", "text": options.text, **where})

    # -- one text chunk ----------------------------------------------------------------------------------------------
    async def generate(self, options: GenerateOptions, chunk_id: int) -> None:
        conversation = self.conversation if self.config.context else None
        streaming = self.config.mode == "stream"
        parts = []
        sent_messages = 0
        first_proxy_ms = first_audio_ms = None
        started = time.perf_counter()
        # An encoded format: the chunk's audio messages concatenate to one file of that format.
        encoded = streaming and self.config.sample_format in ENCODED_FORMATS
        encoder = StreamEncoder(FORMATS[self.config.sample_format]) if encoded else None
        try:
            async with Generation(self.pool, options, self.settings.watermark_enabled, conversation) as generation:
                async for chunk in generation:
                    if chunk.audio.size == 0:
                        continue
                    parts.append(chunk.audio)
                    if streaming:
                        received = time.perf_counter()
                        payload = encoder.encode(chunk.audio) if encoder else None
                        await self.send_audio(chunk.audio, chunk_id, sent_messages, payload)
                        if first_proxy_ms is None:
                            now = time.perf_counter()
                            first_proxy_ms = (now - received) * 1000.0
                            first_audio_ms = (now - started) * 1000.0
                        sent_messages += 1
            if encoder is not None and (tail := encoder.finish()):  # the encoder's last frames and trailer
                await self.send_audio(np.zeros(0, np.float32), chunk_id, sent_messages, tail)
                sent_messages += 1
        except (UpstreamError, ApiError) as e:
            where = {"chunk_id": chunk_id} if streaming else {}
            await self.send_reply({"error": e.message, "text": options.text, **where})
            return
        finally:
            if encoder is not None:
                encoder.close()
        audio = _concat(parts)
        processing_ms = (time.perf_counter() - started) * 1000.0
        if conversation is not None:
            conversation.add(options.speaker_id, options.text, audio)
        if streaming:
            await self.send_reply(
                {
                    "chunk_id": chunk_id,
                    "text": options.text,
                    "final": True,
                    "audio_messages": sent_messages,
                    "samples": int(audio.size),
                    "sample_rate": SAMPLE_RATE,
                    "duration_ms": audio.size * 1000.0 / SAMPLE_RATE,
                    "processing_time_ms": processing_ms,
                    "first_audio_ms": first_audio_ms,
                    "first_audio_proxy_ms": first_proxy_ms,
                    "watermarked": generation.watermarked,
                },
                kind="end",
            )
        else:
            encoded = await run_sized(wav_base64, audio, int(self.settings.wav_offload_seconds * SAMPLE_RATE))
            await self.send_reply(
                {
                    "audio_base64": encoded,
                    "sample_rate": SAMPLE_RATE,
                    "processing_time_ms": (time.perf_counter() - started) * 1000.0,
                    "text": options.text,
                }
            )

    # -- sending -----------------------------------------------------------------------------------------------------
    async def send_audio(self, audio, chunk_id: int, index: int, payload: bytes | None = None) -> None:
        """One audio message: `payload` is the encoded bytes of an encoded format, else the PCM of `audio`."""
        fmt = self.config.sample_format
        if payload is None:
            payload = pcm_bytes(audio, fmt)
        async with self.send_lock:
            seq = self._next_seq()
            if self.config.binary:
                await self._send(FRAME_HEADER.pack(seq, chunk_id, index, audio.size) + payload)
            else:
                await self._send(
                    json.dumps(
                        {
                            "type": "audio",
                            "seq": seq,
                            "chunk_id": chunk_id,
                            "index": index,
                            "samples": int(audio.size),
                            "sample_rate": SAMPLE_RATE,
                            "format": fmt,
                            "audio_base64": base64.b64encode(payload).decode(),
                        }
                    )
                )

    async def send_reply(self, body: dict, kind: str | None = None) -> None:
        """A JSON message; in stream mode it also carries `type` (error, end, config, ...), `seq` and the session's
        `request_id` (message mode keeps the documented shape exactly: the id is in the upgrade's X-Request-ID)."""
        async with self.send_lock:
            if self.config.mode == "stream":
                kind = kind or ("error" if "error" in body else "message")
                body = {"type": kind, "seq": self._next_seq(), "request_id": self.request.get(REQUEST_ID, ""), **body}
            await self._send(json.dumps(body))

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
