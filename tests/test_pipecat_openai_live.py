"""pipecat's stock OpenAITTSService(base_url=...) against the live proxy's /v1/audio/speech: an LLM answer sent
token by token comes back as audio frames (issue 19, item 5)."""

from __future__ import annotations

import asyncio

import pytest
from live_proxy import module_proxy
from test_proxy_live import start_proxy

pytestmark = pytest.mark.live


proxy = module_proxy(start_proxy)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pipecat imports audioop; PipelineRunner.run is deprecated
async def test_openai_tts_service(proxy):
    from pipecat.frames.frames import (
        EndFrame,
        LLMFullResponseEndFrame,
        LLMFullResponseStartFrame,
        LLMTextFrame,
        TTSAudioRawFrame,
    )
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.runner import PipelineRunner
    from pipecat.pipeline.task import PipelineParams, PipelineTask
    from pipecat.processors.frame_processor import FrameProcessor
    from pipecat.services.openai.tts import OpenAITTSService

    class Collect(FrameProcessor):
        def __init__(self) -> None:
            super().__init__()
            self.audio = b""

        async def process_frame(self, frame, direction) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, TTSAudioRawFrame):
                self.audio += frame.audio
            await self.push_frame(frame, direction)

    settings = OpenAITTSService.Settings(voice="alloy")
    tts = OpenAITTSService(api_key="unused", base_url=proxy.http + "/v1", settings=settings, sample_rate=24000)
    collect = Collect()
    task = PipelineTask(Pipeline([tts, collect]), params=PipelineParams(audio_out_sample_rate=24000))

    async def speak() -> None:
        await asyncio.sleep(0.5)
        await task.queue_frame(LLMFullResponseStartFrame())
        for i, word in enumerate(["Hi", "there.", "This", "is", "short."]):
            await task.queue_frame(LLMTextFrame(word if i == 0 else " " + word))
            await asyncio.sleep(0.05)
        await task.queue_frame(LLMFullResponseEndFrame())
        for _ in range(600):
            if len(collect.audio) >= 2 * 24000:  # at least a second of 16-bit audio arrived
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(3)
        await task.queue_frame(EndFrame())

    try:
        await asyncio.wait_for(asyncio.gather(PipelineRunner(handle_sigint=False).run(task), speak()), 120)
    finally:
        await tts._client.close()  # pipecat never closes its AsyncOpenAI client: its pooled socket would leak
    assert len(collect.audio) >= 2 * 24000
