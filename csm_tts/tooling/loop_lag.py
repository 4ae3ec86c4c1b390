"""How late the proxy's event loop wakes up under its heaviest CPU work (a test and scripts/bench_loop_lag.py).

`LagProbe` is a task that sleeps 10 ms again and again and records how late each wake-up is. `InstantTriton`
stands in for the proxy's Triton pool (duck-typed, so it fits the proxy of any version): every stream is one
maximal chunk at once (1125 frames = 90 s, csm_1b's largest `max_chunk_frames`), so the proxy's own work -- MP3
encoding, WAV and base64 of a 90 s clip, a ~6 MB JSON body -- is all that runs. `heavy_load` sends four MP3 streams
and the largest POST /generate at once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import numpy as np

from csm_tts import SAMPLES_PER_FRAME

MAX_CHUNK_FRAMES = 1125
SLEEP_S = 0.010


@dataclass(frozen=True)
class Chunk:
    audio: np.ndarray
    index: int = 0
    is_last: bool = True
    watermarked: bool = False
    key_id: str | None = None


def speech_like(samples: int, seed: int = 0) -> np.ndarray:
    """Tones under a slow envelope: encoders spend on it about what they spend on speech."""
    t = np.arange(samples) / 24000
    rng = np.random.default_rng(seed)
    tone = sum(np.sin(2 * np.pi * f * t) for f in rng.uniform(120, 2400, 6)) / 6
    return (0.3 * tone * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


MAX_CHUNK = speech_like(MAX_CHUNK_FRAMES * SAMPLES_PER_FRAME)


class InstantStream:
    def __init__(self):
        self.sent = False

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    def __aiter__(self):
        return self

    async def __anext__(self) -> Chunk:
        if self.sent:
            raise StopAsyncIteration
        self.sent = True
        return Chunk(MAX_CHUNK)


class InstantTriton:
    """Replaces the proxy's TritonPool class (`proxy.app.TritonPool = InstantTriton`)."""

    active_streams = 0
    max_streams = 128
    replicas: list = []

    def __init__(self):
        self.on_upstream_error = self.on_full = None

    @classmethod
    def from_settings(cls, settings) -> InstantTriton:
        return cls()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def healthy(self) -> list:
        return []

    async def pick(self, exclude=()):
        return None

    def stream(self, text, parameters, context=(), request_id=""):
        return InstantStream()


class LagProbe:
    def __init__(self):
        self.lags_ms: list[float] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(SLEEP_S)
            self.lags_ms.append((time.perf_counter() - start - SLEEP_S) * 1000.0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> dict:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        lags = np.array(self.lags_ms)
        return {
            "samples": int(lags.size),
            "p50_ms": float(np.percentile(lags, 50)),
            "p99_ms": float(np.percentile(lags, 99)),
            "max_ms": float(lags.max()),
        }


async def heavy_load(session: aiohttp.ClientSession, base: str, streams: int = 4) -> list[int]:
    """`streams` MP3 streams of one maximal chunk each and the largest /generate, at once; their body sizes."""

    async def post(path: str, body: dict) -> int:
        async with session.post(base + path, json=body) as response:
            data = await response.read()
            assert response.status == 200, (response.status, data[:300])
            return len(data)

    speech = {"model": "csm-1b", "input": "A long read.", "voice": "alloy", "response_format": "mp3"}
    work = [post("/v1/audio/speech", speech) for _ in range(streams)]
    work.append(post("/generate", {"text": "A long read.", "max_audio_length_ms": 90_000}))
    return list(await asyncio.gather(*work))


async def measure(session: aiohttp.ClientSession, base: str) -> dict:
    probe = LagProbe()
    probe.start()
    await asyncio.sleep(0.2)  # a quiet baseline first
    sizes = await heavy_load(session, base)
    stats = await probe.stop()
    return {**stats, "body_bytes": sizes}
