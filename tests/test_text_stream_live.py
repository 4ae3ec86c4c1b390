"""WS /stream with text_stream=true on the live stack (proxy/text_session.py): text sent as an LLM streams it, 1-3
characters a message at 40 messages/s, is cut by the server into about one generation per sentence, and the first
audio arrives before the text has finished arriving; `cancel` is a barge-in that stops generation and reports the
audio sent per cut. Each cut is kept to 1 s of audio so the test is affordable on a CPU."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest
import websockets
from live_proxy import module_proxy
from test_proxy_live import start_proxy

from csm_tts.text.normalize import normalize
from proxy.appkeys import TRITON

pytestmark = pytest.mark.live
QUERY = "?mode=stream&text_stream=true&max_audio_length_ms=1000&watermark=false"
ANSWER = (
    "Sure, here is the plan for tomorrow. We meet at 9:30 am in the main hall and review the budget of $1,200. "
    "After lunch the team visits the new site, which is about 12 km north of the city. "
    "Please bring your badge and a charged laptop."
)


def pieces(text: str, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 3)
        out.append(text[i : i + n])
        i += n
    return out


proxy = module_proxy(start_proxy)


async def send_pieces(ws, parts: list[str], rate: float = 40.0) -> float:
    """Sends the pieces at `rate` messages a second; returns when the last one left (perf_counter)."""
    start = time.perf_counter()
    for i, part in enumerate(parts):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        await ws.send(json.dumps({"text": part}))
    return time.perf_counter()


async def test_tokens_become_sentences_and_audio_starts_before_the_text_ends(proxy):
    parts = pieces(ANSWER)
    assert len(parts) > 100
    messages: list[tuple[float, dict]] = []
    async with websockets.connect(proxy.ws + QUERY) as ws:

        async def receive():
            async for raw in ws:
                message = json.loads(raw)
                messages.append((time.perf_counter(), message))
                if message.get("type") == "closed":
                    return

        receiver = asyncio.create_task(receive())
        text_ended = await send_pieces(ws, parts)
        await ws.send(json.dumps({"done": True}))
        await asyncio.wait_for(receiver, 120)
    errors = [m for _, m in messages if m.get("type") == "error"]
    assert not errors, errors
    ends = [m for _, m in messages if m.get("type") == "end"]
    audio_times = [t for t, m in messages if m.get("type") == "audio"]
    # generations ~ sentences (plus the early first cut "Sure,"), not messages
    assert 3 <= len(ends) <= 6, [e["segments"] for e in ends]
    assert len(ends) < len(parts) / 10
    assert audio_times[0] < text_ended, "no audio before the text stream ended"
    # the cuts cover the text in order; what was spoken is the normalised text
    spans = [(s["source_start"], s["source_end"]) for e in ends for s in e["segments"]]
    assert spans == sorted(spans) and spans[0][0] == 0 and spans[-1][1] == len(ANSWER)
    spoken = " ".join(s["text"] for e in ends for s in e["segments"])
    assert spoken.split() == " ".join(normalize(ANSWER[a:b]).text for a, b in spans).split()
    assert ends[0]["segments"][0]["text"] == "Sure,"
    assert all(e["samples"] > 0 for e in ends)


async def test_cancel_is_a_barge_in(proxy, triton_server):
    pool = proxy.app[TRITON]
    async with websockets.connect(proxy.ws + QUERY) as ws:
        await send_pieces(ws, pieces(ANSWER[:60]), rate=200)
        audio = 0
        while audio == 0:
            message = json.loads(await asyncio.wait_for(ws.recv(), 30))
            audio += message.get("type") == "audio"
        await ws.send(json.dumps({"text": " and some text still waiting"}))
        await ws.send(json.dumps({"cancel": True}))
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if message.get("type") == "cancelled":
                break
        assert message["segments"][0]["start"] == 0 and message["segments"][0]["samples_sent"] > 0
        assert message["dropped_text"].endswith("still waiting")
        for _ in range(50):
            if pool.active_streams == 0:
                break
            await asyncio.sleep(0.1)
        assert pool.active_streams == 0  # no Triton stream left running
        # the session goes on: a new utterance starts with a new first cut, spans counting on
        await ws.send(json.dumps({"text": "Next one.", "flush": True}))
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if message.get("type") == "end":
                break
        assert message["segments"][0]["text"] == "Next one."
        assert message["segments"][0]["source_start"] > 60


async def test_bad_pieces_get_errors_and_the_session_goes_on(proxy):
    async with websockets.connect(proxy.ws + QUERY) as ws:
        for bad in ({"speaker_id": 2}, {"text": "x", "speaker_id": 1}, {"text": 5}, {"flush": 1}):
            await ws.send(json.dumps(bad))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert reply["type"] == "error", (bad, reply)
        await ws.send(json.dumps({"text": "Still here.", "flush": True}))
        while (message := json.loads(await asyncio.wait_for(ws.recv(), 30)))["type"] != "end":
            assert message["type"] == "audio"
        assert message["segments"][0]["text"] == "Still here."
