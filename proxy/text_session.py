"""WS /stream with `text_stream=true`: the session's messages are pieces of ONE text (an LLM's tokens), cut by the
server (proxy/text_stream.py) into segments worth one generation each; audio leaves as stream mode sends it (seq,
a chunk id per cut, an `end` message per cut with its segments: what was spoken and their spans of the received
text). The seed's message mode and whole-text stream mode are StreamSession's, unchanged.

Messages: `{"text": "Hel"}` (a piece; whitespace counts), `{"flush": true}` (cut what is waiting now; may carry
text), `{"cancel": true}` (barge-in: generation stops, waiting text and queued cuts are dropped, and the
`cancelled` reply says for each cut of the utterance how much audio was sent), `{"done": true}` (speak what is
left, then close), `{"config": {...}}` as in stream mode. A ticker releases text that waited longer than the
segmenter's `max_wait_s`.
"""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from csm_tts import SAMPLE_RATE
from csm_tts.text.incremental import StreamPolicy
from proxy.parse.job import GenerateOptions
from proxy.parse.websocket import StreamConfig
from proxy.session import StreamSession
from proxy.spoken import SpeechPlan
from proxy.text_stream import CutPlan, TextStream

PIECE_KEYS = {"text", "flush"}
NOT_A_PIECE = 'A piece is {"text": string} and/or {"flush": true}'


class TextStreamSession(StreamSession):
    def __init__(self, ws: web.WebSocketResponse, request: web.Request, config: StreamConfig):
        super().__init__(ws, request, config)
        policy = StreamPolicy(early_first_cut=config.early_cut)
        self.text = TextStream(GenerateOptions(text="", **config.options), policy)
        self.running: dict = {}
        self.dropped_text = ""
        self.fed = asyncio.Event()
        self.cuts: list[dict] = []  # the cuts of the current utterance (since the start or the last cancel)
        self.by_chunk: dict[int, dict] = {}

    async def run(self) -> None:
        ticker = asyncio.create_task(self.tick(), name="ws-text-ticker")
        try:
            await super().run()
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)

    async def tick(self) -> None:
        """Release text that waited too long (the segmenter's deadline), even when no piece arrives."""
        while True:
            due = self.text.deadline()
            if due is None:
                self.fed.clear()
                await self.fed.wait()
                continue
            await asyncio.sleep(max(0.0, due - time.monotonic()) + 0.005)
            await self.queue_cuts(self.text.poll())

    async def on_message(self, raw: str) -> None:
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data = None
        if not (isinstance(data, dict) and set(data) & PIECE_KEYS) or self.finishing:
            if data == {"done": True} and not self.finishing:
                await self.queue_cuts(self.text.flush())
            await super().on_message(raw)  # control messages, errors, and refusals after done
            return
        if extra := sorted(set(data) - PIECE_KEYS):  # options apply to a session here, not to a piece
            message = f"a piece carries only text and flush (options go in the query or a config message): {extra}"
            await self.enqueue(("error", {"error": message}))
            return
        piece, flush = data.get("text", ""), data.get("flush", False)
        if not isinstance(piece, str) or not isinstance(flush, bool):
            await self.enqueue(("error", {"error": NOT_A_PIECE}))
            return
        try:
            piece.encode("utf-8")
        except UnicodeEncodeError:
            await self.enqueue(("error", {"error": "text cannot be encoded as UTF-8 (a lone surrogate)"}))
            return
        cuts = self.text.feed(piece)
        if flush:
            cuts += self.text.flush()
        self.fed.set()
        await self.queue_cuts(cuts)

    async def queue_cuts(self, cuts: list[CutPlan]) -> None:
        for cut in cuts:
            record = {"chunk_id": None, "start": cut.start, "end": cut.end, "text": None, "samples_sent": 0}
            if cut.plan is None:
                record["skipped"] = "nothing speakable"
                self.cuts.append(record)
                continue
            record["text"] = cut.plan.spoken_text.strip()
            self.cuts.append(record)
            self.pending_texts += 1
            await self.queue.put(("text", (cut, record)))

    async def run_text(self, data) -> None:
        if isinstance(data, dict):  # a JSON object that is neither a piece nor a control message
            await self.send_reply({"error": NOT_A_PIECE})
            return
        cut, self.running = data
        await self.run_generation(cut.plan.options, cut.plan)

    async def generate(self, options: GenerateOptions, chunk_id: int, plan: SpeechPlan | None = None) -> None:
        self.running["chunk_id"] = chunk_id
        self.by_chunk[chunk_id] = self.running
        await super().generate(options, chunk_id, plan)

    async def send_audio(self, payload: bytes, samples: int, chunk_id: int, index: int) -> None:
        await super().send_audio(payload, samples, chunk_id, index)
        record = self.by_chunk.get(chunk_id)
        if record is not None:
            record["samples_sent"] += samples

    async def cancel_all(self) -> None:
        """Barge-in: stop generating, drop waiting text and queued cuts; the reply reports each cut's audio."""
        self.dropped_text = self.text.reset()
        await super().cancel_all()

    async def send_reply(self, body: dict, kind: str | None = None) -> None:
        if kind == "cancelled":
            cuts, self.cuts, self.by_chunk = self.cuts, [], {}
            for record in cuts:
                record["duration_sent_ms"] = record["samples_sent"] * 1000.0 / SAMPLE_RATE
            body = {**body, "dropped_text": self.dropped_text, "segments": cuts}
        await super().send_reply(body, kind)
