"""Triton goes away and comes back while the proxy keeps running: fast 503s, a mid-stream failure reported to the
client, and recovery without restarting the proxy.

This test owns its Triton (the session server must not be stopped), serving only `csm_1b` so that it starts fast;
the proxy's behaviour does not depend on which model it streams from.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from pathlib import Path

import aiohttp
import pytest
import websockets
from conftest import FAST_FAIL_S

from csm_tts.tooling.local_triton import TritonServer, free_port
from csm_tts.tooling.model_repository import render
from proxy.app import create_app
from proxy.server import start_server
from proxy.settings import Settings

pytestmark = pytest.mark.live
FAST = {"max_audio_length_ms": 1000}


async def generate_status(session: aiohttp.ClientSession) -> tuple[int, dict, float]:
    start = time.monotonic()
    async with session.post("/generate", json={"text": "Are you there?", **FAST}) as response:
        return response.status, await response.json(), time.monotonic() - start


def crash(server: TritonServer) -> None:
    """Kill our own server's process group (tritonserver and its Python stubs) at once, as a crash would, then
    remove the shared-memory regions its stubs leave behind."""
    group = server.process.pid
    regions = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.getpgid(int(proc.name)) == group:
                regions += [
                    a.decode()
                    for a in (proc / "cmdline").read_bytes().split(b"\0")
                    if a.startswith(b"triton_python_backend_shm_region_")
                ]
        except (OSError, ProcessLookupError):
            continue
    os.killpg(group, signal.SIGKILL)
    server.process.wait()
    for name in regions:
        Path("/dev/shm", name).unlink(missing_ok=True)


async def test_triton_stopped_then_restarted(tmp_path, tiny_csm_dir):
    repo = render(tmp_path / "model_repository", "cpu", {"csm_model_dir": str(tiny_csm_dir)})
    for model in repo.iterdir():
        if model.name != "csm_1b":
            shutil.rmtree(model)
    server = TritonServer(
        repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), log_path=tmp_path / "triton.log"
    )
    await asyncio.to_thread(server.start, 240)
    app = create_app(Settings(triton_grpc_urls=(server.grpc_url,), triton_model="csm_1b", health_interval_s=0.5))
    runner = await start_server(app, "127.0.0.1", 0)
    port = runner.addresses[0][1]
    try:
        async with (
            aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session,
            websockets.connect(f"ws://127.0.0.1:{port}/stream?mode=stream") as ws,
        ):
            # A stream that fails in the middle (Triton crashes): the client is told, and the socket stays open.
            await ws.send(json.dumps({"text": "Interrupted half way.", "max_audio_length_ms": 60_000}))
            assert json.loads(await ws.recv())["type"] == "audio"
            crash(server)
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if message["type"] != "audio":
                    break
            assert message["type"] == "error" and message["text"] == "Interrupted half way."
            assert "unavailable" in message["error"].lower()

            # Triton down: clear 503s at once (health_timeout_s is 0.5 s), no hang.
            status, body, elapsed = await generate_status(session)
            assert status == 503 and elapsed < FAST_FAIL_S and "Triton" in body["error"]
            start = time.monotonic()
            async with session.get("/health") as response:
                health = await response.json()
                assert response.status == 503 and time.monotonic() - start < FAST_FAIL_S
            assert health["status"] == "unavailable" and health["triton"]["live"] is False
            start = time.monotonic()
            await ws.send(json.dumps({"text": "Anyone?", **FAST}))
            reply = json.loads(await ws.recv())
            assert reply["type"] == "error" and reply["text"] == "Anyone?" and time.monotonic() - start < FAST_FAIL_S

            # Triton back on the same ports: the same proxy serves again by itself.
            await asyncio.to_thread(server.start, 240)
            deadline = time.monotonic() + 10
            while (status := (await generate_status(session))[0]) != 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert status == 200
            async with session.get("/health") as response:
                assert (await response.json())["triton"]["ready"] is True
            await ws.send(json.dumps({"text": "Back again.", **FAST}))  # the same socket works again
            types = []
            while not types or types[-1] not in ("end", "error"):
                types.append(json.loads(await ws.recv())["type"])
            assert types[-1] == "end" and "audio" in types
    finally:
        await runner.cleanup()
        await asyncio.to_thread(server.stop)
