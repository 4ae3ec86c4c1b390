"""ElevenLabs' input-streaming WebSockets on the live stack (proxy/endpoints/elevenlabs.py): a plain WebSocket
client, then pipecat's real ElevenLabsTTSService (installed with --no-deps, docs/elevenlabs.md) fed token by token,
an interruption included, after which no Triton stream is left running."""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp
import pytest
import websockets
from audio_checks import ffprobe
from test_proxy_live import cancellations, start_proxy, wait_for_cancellation, wait_idle

from proxy.appkeys import TRITON
from proxy.auth import generate_key, hash_key

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def key() -> str:
    return generate_key()


@pytest.fixture(scope="module")
async def proxy(triton_server, tmp_path_factory, key):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    keys_file.write_text(json.dumps({"keys": [{"name": "agent", "sha256": hash_key(key)}]}))
    proxy = await start_proxy(triton_server.grpc_url, api_keys_file=str(keys_file))
    yield proxy
    await proxy.runner.cleanup()


def url(proxy, path: str, **query) -> str:
    base = proxy.http.replace("http://", "ws://") + path
    return base + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")


async def collect(ws) -> list[dict]:
    out = []
    async for raw in ws:
        out.append(json.loads(raw))
    return out


async def test_multi_stream_input_pcm_16000(proxy, key):
    path = url(proxy, "/v1/text-to-speech/alloy/multi-stream-input", output_format="pcm_16000")
    async with websockets.connect(path, additional_headers={"xi-api-key": key}) as ws:
        await ws.send(json.dumps({"text": " ", "context_id": "a"}))
        for token in ["Hi", " there", ",", " how", " are", " you", "?"]:
            await ws.send(json.dumps({"text": token, "context_id": "a"}))
        await ws.send(json.dumps({"context_id": "a", "flush": True}))
        await ws.send(json.dumps({"context_id": "a", "close_context": True}))
        answers = []
        while not answers or not answers[-1].get("isFinal"):
            answers.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
        await ws.send(json.dumps({"close_socket": True}))
    audio = b"".join(base64.b64decode(a["audio"]) for a in answers if "audio" in a)
    assert all(a.get("contextId") == "a" for a in answers)
    assert all("alignment" not in a for a in answers)
    # two cuts ("Hi there," and "how are you?"), each its length rule's audio at 24 kHz, resampled to 16 kHz
    seconds = len(audio) / 2 / 16000
    assert 4.0 < seconds < 8.0, seconds


async def test_stream_input_mp3_ends_with_is_final(proxy, key):
    path = url(proxy, "/v1/text-to-speech/1/stream-input", output_format="mp3_44100_128")
    async with websockets.connect(path, additional_headers={"xi-api-key": key}) as ws:
        await ws.send(json.dumps({"text": " "}))
        await ws.send(json.dumps({"text": "Short one."}))
        await ws.send(json.dumps({"text": ""}))  # end of input: speak, isFinal, close
        answers = await asyncio.wait_for(collect(ws), 60)
    assert answers[-1] == {"isFinal": True}
    mp3 = b"".join(base64.b64decode(a["audio"]) for a in answers if "audio" in a)
    stream = ffprobe(mp3, "mp3")
    assert stream["codec_name"] == "mp3" and int(stream["sample_rate"]) == 44100


async def test_refusals_before_the_upgrade(proxy, key):
    async with aiohttp.ClientSession() as session:
        base = proxy.http + "/v1/text-to-speech"
        async with session.get(base + "/nobody/stream-input", headers={"xi-api-key": key}) as response:
            assert response.status == 400 and "nobody" in (await response.json())["error"]["message"]
        async with session.get(base + "/alloy/stream-input?output_format=ulaw_8000", headers={"xi-api-key": key}) as r:
            assert r.status == 400 and "output_format" in (await r.json())["error"]["message"]
        async with session.get(base + "/alloy/stream-input", headers={"xi-api-key": "wrong"}) as response:
            assert response.status == 401
    # The same through a real WebSocket handshake: refused with the status, never upgraded.
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(
            url(proxy, "/v1/text-to-speech/nobody/stream-input"), additional_headers={"xi-api-key": key}
        )
    assert refused.value.response.status_code == 400


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pipecat imports audioop
async def test_pipecat_elevenlabs_service_with_an_interruption(proxy, key, triton_server):
    from pipecat.frames.frames import (
        EndFrame,
        InterruptionFrame,
        LLMFullResponseEndFrame,
        LLMFullResponseStartFrame,
        LLMTextFrame,
        TTSAudioRawFrame,
        TTSStoppedFrame,
    )
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.runner import PipelineRunner
    from pipecat.pipeline.task import PipelineParams, PipelineTask
    from pipecat.processors.frame_processor import FrameProcessor
    from pipecat.services.elevenlabs.tts import ElevenLabsTTSService
    from pipecat.services.tts_service import TextAggregationMode

    class Counter(FrameProcessor):
        def __init__(self) -> None:
            super().__init__()
            self.audio = 0
            self.stopped = 0

        async def process_frame(self, frame, direction) -> None:
            await super().process_frame(frame, direction)
            self.audio += isinstance(frame, TTSAudioRawFrame)
            self.stopped += isinstance(frame, TTSStoppedFrame)
            await self.push_frame(frame, direction)

    tts = ElevenLabsTTSService(
        api_key=key,
        url=proxy.http.replace("http://", "ws://"),
        sample_rate=24000,
        settings=ElevenLabsTTSService.Settings(voice="alloy"),
        text_aggregation_mode=TextAggregationMode.TOKEN,
    )
    counter = Counter()
    task = PipelineTask(Pipeline([tts, counter]), params=PipelineParams(audio_out_sample_rate=24000))
    pool_streams = []

    async def turn(text: str, interrupt_after: int | None = None) -> None:
        await task.queue_frame(LLMFullResponseStartFrame())
        for index, word in enumerate(text.split(" ")):
            if index == interrupt_after:
                for _ in range(100):  # the first cut ("Sure,") is being generated: then barge in
                    if proxy.app[TRITON].active_streams:
                        break
                    await asyncio.sleep(0.1)
                pool_streams.append(proxy.app[TRITON].active_streams)
                await task.queue_frame(InterruptionFrame())
                return
            await task.queue_frame(LLMTextFrame(word if index == 0 else " " + word))
            await asyncio.sleep(0.125)  # 8 words a second
        await task.queue_frame(LLMFullResponseEndFrame())

    async def speak() -> None:
        await asyncio.sleep(0.5)
        await turn("Hello there, how are you today?")
        for _ in range(600):  # the whole first answer, then its isFinal
            if counter.stopped:
                break
            await asyncio.sleep(0.1)
        assert counter.stopped, "the first answer never ended"
        first_audio = counter.audio
        before = len(cancellations(triton_server))
        await turn("Sure, this answer gets interrupted half way through.", interrupt_after=5)
        await wait_for_cancellation(triton_server, before)  # the barge-in cancelled the Triton stream
        await wait_idle(proxy, timeout=10)
        pool_streams.append(first_audio)
        await task.queue_frame(EndFrame())

    try:
        await asyncio.wait_for(asyncio.gather(PipelineRunner(handle_sigint=False).run(task), speak()), 120)
    finally:
        if not task.has_finished():  # a failed check must not leave the pipeline and its socket running
            await task.cancel()
    assert counter.stopped >= 1 and pool_streams[1] > 0
    assert pool_streams[0] >= 1, "the interrupted answer was not being generated when it was interrupted"
    await wait_idle(proxy)
