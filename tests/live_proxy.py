"""The proxy in the test process, on a free loopback port, in front of a live Triton: one helper for every live test."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.server import start_server
from proxy.settings import Settings


class Proxy:
    def __init__(self, app: web.Application, runner: web.AppRunner):
        self.app = app
        self.runner = runner
        port = runner.addresses[0][1]
        self.http = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}/stream"


async def start_proxy(grpc_url: str, app: web.Application | None = None, **settings) -> Proxy:
    """`app` as given, or one made from `settings` (health checked every second so a restarted Triton is found fast)."""
    if app is None:
        app = create_app(Settings(**{"triton_grpc_urls": (grpc_url,), "health_interval_s": 1.0, **settings}))
    return Proxy(app, await start_server(app, "127.0.0.1", 0))


def module_proxy(start, **settings):
    """A module-scoped `proxy` fixture: `start(triton_server.grpc_url, **settings)` once for the module's tests
    (`start`: this file's `start_proxy`, or one with other defaults). conftest's `http` opens a client session on it."""

    @pytest.fixture(scope="module")
    async def proxy(triton_server):
        running = await start(triton_server.grpc_url, **settings)
        yield running
        await running.runner.cleanup()

    return proxy


async def wait_until_healthy(base: str, ready: bool = True) -> None:
    """Until a proxy started as a process (`python -m proxy`) answers GET /health (with 200 unless `ready` is False)."""
    async with aiohttp.ClientSession() as session:
        for _ in range(150):
            try:
                async with session.get(base + "/health") as response:
                    if response.status == 200 or not ready:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    pytest.fail("python -m proxy did not become healthy")


def too_long_for_the_model(text: str = "Words upon words.") -> dict:
    """A /generate body the proxy accepts and Triton refuses (INVALID_ARG, the prompt exceeds the 2048 positions).
    Long texts are split into segments that fit (proxy/spoken.py), but a voice clip's transcript is sent whole with
    every segment: 2,000 characters of it (~1,440 tiny-tokenizer tokens) and 90 s of audio cannot fit."""
    import base64
    import io

    import numpy as np
    import soundfile

    clip = io.BytesIO()
    soundfile.write(clip, np.zeros(12_000, np.float32), 24_000, format="WAV", subtype="PCM_16")
    return {
        "text": text,
        "max_audio_length_ms": 90_000,
        "reference_audio": base64.b64encode(clip.getvalue()).decode(),
        "reference_text": "word " * 400,
    }
