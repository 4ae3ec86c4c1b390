"""`make serve` under fire (scripts/serve.py, csm_tts/tooling/supervisor.py): the real tritonserver and proxy on free
loopback ports, the supervisor as its own process, signals sent as an operator or a crash would.

The tests run in order on one stack: a proxy SIGTERM restarts the proxy alone; a SIGKILL of tritonserver mid-stream
leaves the proxy answering 503 + Retry-After until Triton is back, and nothing of the dead server behind; Ctrl-C
stops everything.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import websockets
from conftest import CPU_THREADS, ROOT, WATERMARK_IDLE_TIMEOUT_S
from polling import alive, wait_for

from csm_tts.tooling.local_triton import free_port, group_members
from csm_tts.triton import cancellation

pytestmark = pytest.mark.live
SHORT = {"text": "Still there?", "max_audio_length_ms": 1000}
BACK_WITHIN_S = 60.0  # the bound for Triton to serve again after a kill


def children(pid: int) -> dict[int, str]:
    """PID -> command line of the running children of `pid`."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) if proc.name.isdigit() else None
            if parent == pid and alive(int(proc.name)):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
    return found


def status(url: str, body: dict | None = None) -> tuple[int | None, dict]:
    """(status, headers) of a GET (or a JSON POST); None when nothing answers."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            r.read()
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, dict(e.headers)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None, {}


@dataclass
class Stack:
    process: subprocess.Popen
    base: str
    log: Path
    first_start_s: float

    def pids(self) -> tuple[int | None, int | None]:
        """(tritonserver, proxy) as the supervisor runs them now."""
        running = children(self.process.pid)
        triton = next((p for p, c in running.items() if "tritonserver" in c.split(" ")[0]), None)
        proxy = next((p for p, c in running.items() if "-m proxy" in c), None)
        return triton, proxy

    def supervisor_log(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_csm_dir, tiny_watermark_dir):
    build = tmp_path_factory.mktemp("serve")
    distinct = set()
    while len(distinct) < 4:  # free_port can hand out the same free port twice
        distinct.add(free_port())
    *triton_ports, proxy_port = distinct
    names = ("TRITON_HTTP_PORT", "TRITON_GRPC_PORT", "TRITON_METRICS_PORT")
    ports = dict(zip(names, map(str, triton_ports), strict=True))
    env = {
        **os.environ,
        **ports,
        "PROXY_PORT": str(proxy_port),
        "CSM_MODEL_DIR": str(tiny_csm_dir),
        "CSM_WATERMARK_MODEL_DIR": str(tiny_watermark_dir),
        "CSM_WATERMARK_KEY": "",
        "CSM_WATERMARK_ENABLED": "true",
        "CSM_WATERMARK_IDLE_TIMEOUT_S": WATERMARK_IDLE_TIMEOUT_S,
        "OMP_NUM_THREADS": str(CPU_THREADS),
    }
    env.pop("TRITON_GRPC_URLS", None)
    log = build / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "serve.py"), "--build-dir", str(build)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{proxy_port}"
    try:
        started = time.monotonic()
        wait_for(lambda: status(base + "/health")[0] == 200 or process.poll() is not None, 300, "make serve ready")
        assert process.poll() is None, log.read_text(errors="replace")
        yield Stack(process, base, log, time.monotonic() - started)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_a_proxy_sigterm_restarts_the_proxy_alone(stack):
    triton, proxy = stack.pids()
    assert triton and proxy
    os.kill(proxy, signal.SIGTERM)
    wait_for(lambda: stack.pids()[1] not in (None, proxy), 30, "a new proxy")
    wait_for(lambda: status(stack.base + "/health")[0] == 200, 60, "the new proxy healthy")
    assert stack.pids()[0] == triton  # Triton never stopped
    assert status(stack.base + "/generate", SHORT)[0] == 200
    assert f"proxy (pid {proxy}) exited" in stack.supervisor_log()


async def test_triton_killed_mid_stream_the_proxy_answers_503_until_it_is_back_and_nothing_is_left(stack):
    triton, proxy = stack.pids()
    model_processes = group_members(triton)
    regions = {r for found in model_processes.values() for r in found}  # a stub and its watcher name it
    assert len(regions) == 2, model_processes  # csm_1b's stub and the watermarker's
    markers = cancellation.marker_dir(triton)
    async with websockets.connect(stack.base.replace("http", "ws") + "/stream?mode=stream") as ws:
        await ws.send(json.dumps({"text": "A long one, cut short.", "max_audio_length_ms": 30_000}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 60))["type"] == "audio"
        assert any(markers.iterdir())  # the stream's marker, which the dead server cannot remove
        os.kill(triton, signal.SIGKILL)
        killed = time.monotonic()
        # The stream in flight ends with an error message; the socket stays open.
        while (message := json.loads(await asyncio.wait_for(ws.recv(), 30)))["type"] == "audio":
            pass
        assert message["type"] == "error", message

    # Until Triton serves again: every answer is a 503 with Retry-After, and the proxy stays up and ready.
    outage, health, first_ok = [], set(), None
    async with aiohttp.ClientSession(stack.base) as session:
        while time.monotonic() - killed < max(BACK_WITHIN_S, 1.5 * stack.first_start_s) + 30:
            async with session.post("/generate", json=SHORT) as response:
                await response.read()
                if response.status == 200:
                    first_ok = time.monotonic() - killed
                    break
                outage.append((response.status, response.headers.get("Retry-After")))
            for path in ("/health", "/livez", "/readyz"):
                async with session.get(path) as response:
                    health.add((path, response.status))
            await asyncio.sleep(0.5)
    assert outage and set(outage) == {(503, "1")}, outage
    assert ("/health", 503) in health and ("/livez", 200) in health and ("/readyz", 200) in health, health
    assert ("/livez", 503) not in health and ("/readyz", 503) not in health, health
    assert first_ok is not None, stack.supervisor_log()[-3000:]
    # The bound is 60 s; on a loaded machine a start can take longer than that by itself, so the bound is
    # the larger of 60 s and 1.5 x this stack's first start (both printed).
    print(f"Triton serving again {first_ok:.1f} s after the kill (first start: {stack.first_start_s:.1f} s)")
    assert first_ok < max(BACK_WITHIN_S, 1.5 * stack.first_start_s), (first_ok, stack.first_start_s)

    # Nothing of the dead server: its stubs ended themselves (their watchers), regions and markers are gone.
    assert not any(alive(pid) for pid in model_processes)
    assert not any(Path("/dev/shm", r).exists() for r in regions)
    assert not markers.exists()
    assert stack.pids()[1] == proxy  # the same proxy all along
    log = stack.supervisor_log()
    assert f"triton (pid {triton}) exited" in log and "killed by SIGKILL" in log and "triton restarts in" in log
    assert "triton left behind" not in log  # the watchers did it; the supervisor had nothing left to remove


def test_ctrl_c_stops_the_proxy_then_triton_and_leaves_nothing(stack):
    triton, proxy = stack.pids()
    model_processes = group_members(triton)
    regions = {r for found in model_processes.values() for r in found}  # a stub and its watcher name it
    stack.process.send_signal(signal.SIGINT)
    assert stack.process.wait(90) == 0
    assert not alive(triton) and not alive(proxy)
    assert not any(alive(pid) for pid in model_processes)
    assert not any(Path("/dev/shm", r).exists() for r in regions)
    assert not cancellation.marker_dir(triton).exists()
    log = stack.supervisor_log()
    assert log.index("stopping proxy") < log.index("stopping triton")
    assert "triton stopped: exit code 0" in log and "proxy stopped: exit code 0" in log
