"""Long texts spoken whole (proxy/spoken.py) on the live stack: a 4,000-character /v1/audio/speech request is split
into segments that reach Triton in order, each with the earlier ones as context, and come back as ONE decodable
file whose length is the sum of the segments' audio. Segments are kept to 1 s of audio each
(`max_audio_length_ms` applies per segment and does not change the split) so the test stays affordable on a CPU.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from urllib.parse import unquote

import pytest
import soundfile
from audio_checks import ffprobe
from live_proxy import module_proxy
from test_proxy_live import start_proxy

from csm_tts.text.frontend import spoken_segments
from csm_tts.text.normalize import normalize
from proxy.appkeys import TRITON

pytestmark = pytest.mark.live
FAST = {"max_audio_length_ms": 1000, "watermark": False}
SAMPLES_1S = 12 * 1920

SENTENCES = (
    "The quarterly report covers **three regions** and 12 product lines.",
    "Revenue rose by 4.5% to $1,250,000, driven mostly by the new subscription plans.",
    "Dr. Lee presented the findings on March 3rd at 10:30 am, e.g. the churn analysis.",
    "Support tickets fell sharply after the redesign; customers found answers on their own.",
    "Shipping times in the north averaged 3 days, while the south still needed nearly 5.",
    "Next year the team plans to open two offices and hire about 40 engineers.",
)


def long_text(chars: int = 4000) -> str:
    words, i = [], 0
    while len(" ".join(words)) < chars:
        words.append(SENTENCES[i % len(SENTENCES)] + (f" Point {i + 1} is done." if i % 3 == 0 else ""))
        i += 1
    return " ".join(words)[:chars]


class Recorder:
    """Wraps the proxy's pool: what each Triton request was given (text, context texts) and the audio it returned."""

    def __init__(self, pool):
        self.pool = pool
        self.requests: list[dict] = []

    def __enter__(self) -> Recorder:
        original = self.pool.stream

        def stream(text, parameters, context=(), request_id=""):
            record = {"text": text, "context": [s.text for s in context], "samples": 0, "parameters": parameters}
            self.requests.append(record)
            triton_stream = original(text, parameters, context, request_id)
            read = triton_stream.__anext__

            async def counted():
                chunk = await read()
                record["samples"] += chunk.audio.size
                return chunk

            triton_stream.__anext__ = counted
            return triton_stream

        self.pool.stream = stream
        return self

    def __exit__(self, *exc) -> None:
        del self.pool.stream


proxy = module_proxy(start_proxy)


def speech_body(text: str, **extra) -> dict:
    return {"model": "csm-1b", "voice": "alloy", "input": text, **FAST, **extra}


async def test_4000_characters_spoken_whole_as_one_file(proxy, http):
    text = long_text(4000)
    assert len(text) == 4000
    expected = spoken_segments(text)
    assert len(expected) >= 8
    with Recorder(proxy.app[TRITON]) as recorder:
        async with http.post("/v1/audio/speech", json=speech_body(text, response_format="wav")) as response:
            assert response.status == 200, await response.text()
            body = await response.read()
            headers = response.headers
    requests = [r for r in recorder.requests if r["samples"]]  # a CONTEXT_TOO_LONG retry returns no audio
    # the segments reach Triton in order: their texts joined are the normalised input
    assert [r["text"] for r in requests] == [s.speech for s in expected]
    assert " ".join(r["text"] for r in requests).split() == normalize(text).text.split()
    assert unquote(headers["X-Spoken-Text"]) == normalize(text).text.strip()
    assert headers["X-Spoken-Segments"] == str(len(expected))
    # each segment after the first has the ones before it as context: the newest of them, in order, ending with
    # its predecessor (the context budget drops the oldest first)
    assert requests[0]["context"] == []
    for i, request in enumerate(requests[1:], start=1):
        earlier = [r["text"] for r in requests[:i]]
        assert request["context"], f"segment {i} had no context"
        assert request["context"] == earlier[-len(request["context"]) :]
        assert request["parameters"]["max_audio_length_ms"] == 1000
    # one decodable file, as long as the segments' audio together
    total = sum(r["samples"] for r in requests)
    assert total == len(expected) * SAMPLES_1S  # the tiny model runs each segment to its limit
    audio, rate = soundfile.read(io.BytesIO(body), dtype="int16")
    assert rate == 24000 and audio.shape == (total,)
    stream = ffprobe(body, "wav")
    assert stream["codec_name"] == "pcm_s16le" and int(stream["sample_rate"]) == 24000
    metrics = await (await http.get("/metrics")).text()
    assert 'csm_proxy_text_segments_total{end="length"}' in metrics


async def test_sse_reports_each_segment(proxy, http):
    text = "First part of the story. " * 20 + "Second part, which is different. " * 12
    expected = spoken_segments(text)
    assert len(expected) >= 2
    body = speech_body(text, response_format="pcm", stream_format="sse")
    async with http.post("/v1/audio/speech", json=body) as response:
        assert response.status == 200
        events = [json.loads(line[6:]) for line in (await response.text()).splitlines() if line.startswith("data: ")]
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    assert [s["text"] for s in done["segments"]] == [s.speech for s in expected]
    assert [(s["source_start"], s["source_end"]) for s in done["segments"]] == [
        (s.source_start, s.source_end) for s in expected
    ]
    assert all(s["samples"] == SAMPLES_1S and s["end"] == "length" for s in done["segments"])
    audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert len(audio) == 2 * SAMPLES_1S * len(expected)  # 16-bit samples


async def test_generate_speaks_a_long_text_as_one_clip(proxy, http):
    text = "A sentence that keeps the model busy for a while. " * 18
    segments = spoken_segments(text)
    assert len(segments) == 3
    async with http.post("/generate", json={"text": text, **FAST}) as response:
        assert response.status == 200
        body = await response.json()
        assert response.headers["X-Spoken-Segments"] == "3"
    assert body["duration_ms"] == pytest.approx(3 * SAMPLES_1S / 24.0)  # 12 frames of 80 ms each


async def test_normalize_false_sends_the_text_as_written(proxy, http):
    text = "It costs $5 at 3:30 pm."
    with Recorder(proxy.app[TRITON]) as recorder:
        for normalized in (True, False):
            body = {"text": text, "normalize": normalized, **FAST}
            async with http.post("/generate/wav", json=body) as response:
                assert response.status == 200
                await response.read()
    assert [r["text"] for r in recorder.requests] == ["It costs five dollars at three thirty P M.", text]


@pytest.mark.parametrize("path", ["/v1/audio/speech", "/generate"])
async def test_nothing_speakable_is_a_400(proxy, http, path):
    text = "\u200b" * 100 + "👍🎉"
    body = speech_body(text) if path.startswith("/v1") else {"text": text}
    async with http.post(path, json=body) as response:
        assert response.status == 400
        answer = await response.json()
    message = answer["error"]["message"] if path.startswith("/v1") else answer["error"]
    assert "nothing to speak" in message


async def test_over_the_limit_is_a_400_that_names_it(proxy, http):
    async with http.post("/v1/audio/speech", json=speech_body("word " * 1001)) as response:
        assert response.status == 400
        assert "the limit is 5000" in (await response.json())["error"]["message"]


async def test_websocket_message_mode_and_stream_chunks_speak_long_texts_whole(proxy, http):
    import websockets

    text = "A sentence that keeps the model busy for a while. " * 18
    expected = len(spoken_segments(text)) * SAMPLES_1S
    async with websockets.connect(proxy.ws) as ws:  # the seed's message mode: one reply, its documented shape
        await ws.send(json.dumps({"text": text, **FAST}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 120))
    assert set(reply) == {"audio_base64", "sample_rate", "processing_time_ms", "text"} and reply["text"] == text
    audio, _ = soundfile.read(io.BytesIO(base64.b64decode(reply["audio_base64"])), dtype="int16")
    assert audio.size == expected
    params = {k: str(v).lower() for k, v in FAST.items()}
    async with http.post("/stream/chunks", params=params, json=[text, "Short."]) as response:
        lines = [json.loads(line) for line in (await response.text()).splitlines()]
    audio, _ = soundfile.read(io.BytesIO(base64.b64decode(lines[0]["audio_base64"])), dtype="int16")
    assert audio.size == expected and lines[1]["text"] == "Short."
