"""No orphans without a supervisor: a tritonserver killed with SIGKILL mid-stream, and not reaped by the process
that started it (a zombie, which the Python backend's own check takes for alive), leaves no stub process, no
shared-memory region and no marker file behind for long (csm_tts/triton/watchdog.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import start_triton

from csm_tts.tooling.local_triton import group_members
from csm_tts.tooling.triton_streams import stream
from csm_tts.triton import cancellation
from csm_tts.triton.watchdog import started_at

pytestmark = pytest.mark.live
GONE_WITHIN_S = 10.0  # the watchers look every 0.1 s; the rest is slack for a loaded machine


async def test_a_killed_unreaped_server_leaves_no_stub_region_or_marker(tmp_path, tiny_csm_dir, tiny_watermark_dir):
    server = await asyncio.to_thread(start_triton, tmp_path / "model_repository", tiny_csm_dir, tiny_watermark_dir)
    try:
        model_processes = group_members(server.process.pid)
        regions = {r for found in model_processes.values() for r in found}
        assert len(regions) == 2 and len(model_processes) == 4, model_processes  # two stubs, two watchers
        markers = cancellation.marker_dir(server.process.pid)
        streaming = asyncio.create_task(stream(server.grpc_url, "tts", "Cut short.", {"max_audio_length_ms": 30_000}))
        while not (markers.exists() and any(markers.iterdir())):
            assert not streaming.done()
            await asyncio.sleep(0.05)
        os.kill(server.process.pid, signal.SIGKILL)  # and no wait(): the server stays a zombie
        killed = time.monotonic()
        while time.monotonic() - killed < GONE_WITHIN_S:
            left = [pid for pid in model_processes if started_at(pid) is not None]
            if not left and not markers.exists() and not any(Path("/dev/shm", r).exists() for r in regions):
                break
            await asyncio.sleep(0.1)
        took = time.monotonic() - killed
        assert started_at(server.process.pid) is None  # still unreaped
        assert not [pid for pid in model_processes if started_at(pid) is not None], model_processes
        assert not [r for r in regions if Path("/dev/shm", r).exists()]
        assert not markers.exists()
        print(f"stubs, regions and markers of the killed server gone {took:.2f} s after the kill")
        try:  # the stream in flight fails (how depends on where the gRPC call was when the server vanished)
            error = (await asyncio.wait_for(streaming, 30)).error
        except Exception as e:
            error = e
        assert error is not None
        log = server.log_text()
        assert log.count(f"tritonserver (pid {server.process.pid}) is gone: ended stub") == 2, log[-2000:]
    finally:
        server.process.kill()
        server.process.wait()
        server.remove_leftovers()
