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
