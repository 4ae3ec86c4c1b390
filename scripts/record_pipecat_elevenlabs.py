"""Record what pipecat's ElevenLabsTTSService really sends on `multi-stream-input` (for the protocol tests).

pipecat-ai 1.14.0 is installed with --no-deps (Makefile): it declares protobuf >= 5.29.6 (tritonclient 2.51
requires protobuf < 5), soxr ~= 1.0.0 and soundfile ~= 0.13.1 (we pin 1.1.0 and 0.14.0), and runs with ours:

    .venv/bin/python scripts/record_pipecat_elevenlabs.py tests/pipecat_elevenlabs_session.json

A local WebSocket server stands in for ElevenLabs (it answers each text piece or flush with 0.1 s of silence and a
`close_context` with `isFinal`); pipecat's pipeline gets two LLM turns token by token, the second interrupted after
four words. The file keeps the URL, the `xi-api-key` header and every message, plus how many audio frames and
TTSStoppedFrames reached the end of the pipeline.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys

import websockets
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

TURNS = [("Hello there, how are you? I am fine.", None), ("This answer gets interrupted half way through.", 4)]
SILENCE = bytes(4800)  # 0.1 s of 24 kHz 16-bit PCM


class Recorder:
    def __init__(self) -> None:
        self.connections: list[dict] = []

    async def serve(self, socket) -> None:
        connection = {"path": socket.request.path, "xi-api-key": socket.request.headers.get("xi-api-key")}
        connection["messages"] = messages = []
        self.connections.append(connection)
        try:
            async for raw in socket:
                message = json.loads(raw)
                messages.append(message)
                context_id = message.get("context_id")
                if message.get("close_socket"):
                    await socket.close()
                elif message.get("close_context"):
                    await socket.send(json.dumps({"isFinal": True, "contextId": context_id}))
                elif (message.get("text") or "").strip() or message.get("flush"):
                    audio = base64.b64encode(SILENCE).decode()
                    await socket.send(json.dumps({"audio": audio, "contextId": context_id}))
        except websockets.ConnectionClosed:
            pass


class Counter(FrameProcessor):
    def __init__(self) -> None:
        super().__init__()
        self.audio_frames = 0
        self.stopped_frames = 0

    async def process_frame(self, frame, direction) -> None:
        await super().process_frame(frame, direction)
        self.audio_frames += isinstance(frame, TTSAudioRawFrame)
        self.stopped_frames += isinstance(frame, TTSStoppedFrame)
        await self.push_frame(frame, direction)


async def record(path: str) -> None:
    recorder = Recorder()
    server = await websockets.serve(recorder.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tts = ElevenLabsTTSService(
        api_key="test-key",
        url=f"ws://127.0.0.1:{port}",
        sample_rate=24000,
        settings=ElevenLabsTTSService.Settings(voice="alloy", stability=0.5, similarity_boost=0.75, speed=1.0),
        text_aggregation_mode=TextAggregationMode.TOKEN,
    )
    counter = Counter()
    task = PipelineTask(Pipeline([tts, counter]), params=PipelineParams(audio_out_sample_rate=24000))

    async def speak() -> None:
        await asyncio.sleep(0.5)
        for text, interrupt_after in TURNS:
            await task.queue_frame(LLMFullResponseStartFrame())
            for index, word in enumerate(text.split(" ")):
                if index == interrupt_after:
                    await task.queue_frame(InterruptionFrame())
                    break
                await task.queue_frame(LLMTextFrame(word if index == 0 else " " + word))
                await asyncio.sleep(0.05)
            else:
                await task.queue_frame(LLMFullResponseEndFrame())
            await asyncio.sleep(1.0)
        await task.queue_frame(EndFrame())

    await asyncio.gather(PipelineRunner(handle_sigint=False).run(task), speak())
    server.close()
    result = {
        "recorded_with": "pipecat-ai 1.14.0, scripts/record_pipecat_elevenlabs.py",
        "connections": recorder.connections,
        "client_audio_frames": counter.audio_frames,
        "client_stopped_frames": counter.stopped_frames,
    }
    with open(path, "w") as file:
        json.dump(result, file, indent=1)
        file.write("\n")


if __name__ == "__main__":
    asyncio.run(record(sys.argv[1]))
