"""A burst against the whole stack (proxy -> tts ensemble: csm_1b -> watermarker, watermark on), on a Triton of the
test's own: 4x the stack's capacity of long requests, then every client gone after 3 s.

- every request was either streaming (first audio) or refused with 503 + Retry-After within 2 s: no 504 after 60 s;
- within 10 s of the clients leaving, nothing is generating or queued at either model (Triton's metrics, and no
  csm_1b stream left: every cancellation marker is gone);
- the next 1 s request is served at its usual speed (measured before the burst, same server);
- the watermarker's resident memory is back within 20% of what it was before the burst;
- while the watermarker is behind, the proxy's /health says so (status degraded, "behind": watermarker), and says
  "ok" again once the clients have gone.

What each part relies on: refusing at once is csm_1b's admission (no new stream, and a 0.5 s queue wait, while the
watermarker is behind; the CPU profile's own queue wait is 30 s). Streaming within 2 s, and stopping within seconds,
need csm_1b to hold streams back on the watermarker's progress reports (flow_control.py), so that little waits at the
watermarker, and the watermarker to take chunks by playback deadline (csm_tts/watermark/batching.py): a late stream's
first chunk does not queue behind seconds of other streams' audio, and a client's cancellation (which csm_1b learns
only when the watermarker reaches that stream's next chunk) is reached soon. The memory comes back because the
watermarker hands freed heap memory back to the system once idle (csm_tts/triton/memory.py).
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from conftest import WATERMARK_IDLE_TIMEOUT_S
from live_proxy import start_proxy
from test_hardening_live import start_server

from csm_tts.tooling.local_triton import TritonServer, free_port
from csm_tts.tooling.model_repository import PROFILES

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.live
CAPACITY = int(PROFILES["cpu"]["max_active_streams"])
BURST = 4 * CAPACITY
ANSWER_S = 2.0  # refused within this (the bound)
# First audio within 2 s too. On a quiet 2-core box the last of 8 streams joining at once got it at 1.35-1.55 s (it
# was 2.7-2.8 s before the watermarker served chunks by playback deadline, one stream per pass on a CPU).
FIRST_AUDIO_S = 2.0
SLACK_S = 2.0  # a loaded shared 2-core machine: the stated slack on top
CLIENTS_LEAVE_S = 3.0
IDLE_WITHIN_S = 10.0
MEMORY_BACK_WITHIN = 0.20  # the watermarker's resident memory after the burst, relative to before it
IDLE_TRIM_S = 1.5  # the watermarker gives freed memory back after 0.5 s without work
TEXT = "A long story that nobody will hear to its end, told again and again for a whole minute."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    server = start_server(
        root,
        {},
        {},
        CSM_CANCEL_DIR=str(root / "markers"),
        CSM_WATERMARK_IDLE_TIMEOUT_S=WATERMARK_IDLE_TIMEOUT_S,
        OMP_NUM_THREADS="1",
    )
    server.markers = root / "markers"
    yield server
    server.stop()


def metrics(server: TritonServer) -> dict[str, float]:
    """Triton's metrics, name{labels} -> value."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", text, re.M)}


def busy(server: TritonServer) -> dict[str, float]:
    """What is still generating, queued or pending at either model (empty when idle)."""
    found = {}
    for name, value in metrics(server).items():
        generating = name.startswith("csm_tts_streams{") and ('state="active"' in name or 'state="queued"' in name)
        pending = name.startswith("nv_inference_pending_request_count{")
        watermarking = name.startswith("csm_tts_watermark_streams{")
        if (generating or pending or watermarking) and value > 0:
            found[name] = value
    directory = getattr(server, "markers", None)  # a server with a marker directory of its own (start_server)
    markers = (
        [p.name for p in directory.iterdir() if not p.name.endswith(".done")]
        if directory is not None and directory.exists()
        else []
    )
    if markers:
        found["csm_1b streams with a marker"] = len(markers)
    return found


def body(ms: int, seed: int) -> dict:
    return {
        "model": "csm-1b",
        "voice": "alloy",
        "input": TEXT,
        "response_format": "pcm",
        "max_audio_length_ms": ms,
        "seed": seed,
    }


async def one_request(session, url: str, ms: int, seed: int, stay_s: float | None) -> dict:
    """Status and the time to the answer (first audio bytes, or the refusal); then it stays `stay_s` at most."""
    sent = time.monotonic()
    result = {"status": None, "answered_s": None, "retry_after": None, "audio": 0}
    try:
        async with session.post(url + "/v1/audio/speech", json=body(ms, seed)) as response:
            result["status"], result["retry_after"] = response.status, response.headers.get("Retry-After")
            if response.status != 200:
                result["answered_s"] = result["total_s"] = time.monotonic() - sent
                await response.read()
                return result
            deadline = None if stay_s is None else sent + stay_s
            async for piece in response.content.iter_any():
                if piece and result["answered_s"] is None:
                    result["answered_s"] = time.monotonic() - sent
                result["audio"] += len(piece)
                if deadline is not None and time.monotonic() > deadline:
                    break  # the client leaves: the connection closes with the response
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        result["status"] = f"{type(e).__name__}: {e}"
    result["total_s"] = time.monotonic() - sent
    return result


def resident_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


async def watch_health(session, url: str, seen: list[dict], stop: asyncio.Event) -> None:
    """GET /health every 0.2 s until `stop`; every answer's status and what it says is behind."""
    while not stop.is_set():
        async with session.get(url + "/health") as response:
            body = await response.json()
            seen.append({"code": response.status, "status": body["status"], "behind": body.get("behind")})
        await asyncio.sleep(0.2)


async def wait_idle(server: TritonServer, timeout: float) -> tuple[float, dict]:
    started = time.monotonic()
    while (left := busy(server)) and time.monotonic() - started < timeout:
        await asyncio.sleep(0.2)
    return time.monotonic() - started, left


async def test_a_burst_is_answered_at_once_and_leaves_nothing_behind(server):
    """Every part is checked and reported before the test fails, so that one run shows which of them hold."""
    proxy = await start_proxy(server.grpc_url, triton_metrics_port=server.metrics_port, health_interval_s=0.5)
    problems = []
    watermarker, csm_1b = server.model_stub("watermarker"), server.model_stub("csm_1b")
    assert watermarker is not None and csm_1b is not None, server.model_processes()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            usual = await one_request(session, proxy.http, 1000, 0, None)
            assert usual["status"] == 200 and usual["audio"] == 2 * 12 * 1920, usual  # 1000 ms: 12 frames, 16 bit
            await asyncio.sleep(
                IDLE_TRIM_S
            )  # the watermarker returns freed memory once idle (csm_tts/triton/memory.py)
            memory_before, csm_before = resident_mb(watermarker), resident_mb(csm_1b)
            health, stop = [], asyncio.Event()
            watcher = asyncio.create_task(watch_health(session, proxy.http, health, stop))
            burst = await asyncio.gather(
                *(one_request(session, proxy.http, 60_000, i, CLIENTS_LEAVE_S) for i in range(BURST))
            )
            left_at = time.monotonic()
            statuses = sorted(str(r["status"]) for r in burst)
            print(f"burst of {BURST}: statuses {statuses}; usual 1 s request {usual['total_s']:.2f} s")
            for status in (200, 503):
                print(
                    f"{status} in s:", sorted(round(r["answered_s"] or -1, 2) for r in burst if r["status"] == status)
                )
            if not all(r["status"] in (200, 503) for r in burst):
                problems.append(f"a request was neither served nor refused with 503 (a 504?): {statuses}")
            if not all(r["retry_after"] for r in burst if r["status"] == 503):
                problems.append("a 503 without Retry-After")
            if not any(r["status"] == 200 for r in burst):
                problems.append("nothing was served")
            for kind, status, within in (("refused", 503, ANSWER_S), ("streaming", 200, FIRST_AUDIO_S)):
                late = [r["answered_s"] for r in burst if r["status"] == status]
                late = [t for t in late if t is None or t > within + SLACK_S]
                if late:
                    problems.append(f"{len(late)} requests {kind} later than {within} s (+{SLACK_S} s): {late}")
            waited, left = await wait_idle(server, IDLE_WITHIN_S)
            print(f"idle {time.monotonic() - left_at:.1f} s after the clients left; still busy: {left}")
            await asyncio.sleep(1.5)  # csm_1b forgets "behind" 1 s after its last sign; then one more health check
            stop.set()
            await watcher
            degraded = [h for h in health if h["status"] == "degraded"]
            print(f"/health during the burst: {len(degraded)} of {len(health)} answers degraded; last {health[-1]}")
            if not degraded or any(
                h["code"] != 200 or h["behind"] != {"watermarker": [server.grpc_url]} for h in degraded
            ):
                problems.append(f"/health never said the watermarker was behind, or said it wrongly: {health}")
            if health[-1] != {"code": 200, "status": "ok", "behind": {}}:
                problems.append(f"/health after the burst: {health[-1]}")
            if left:
                problems.append(f"still busy {IDLE_WITHIN_S} s after the clients left: {left}")
                await wait_idle(server, 120)  # the next request then measures the stack, not the backlog
            after = await one_request(session, proxy.http, 1000, 0, None)
            print(f"the next 1 s request took {after['total_s']:.2f} s (before the burst {usual['total_s']:.2f} s)")
            if after["status"] != 200 or after["audio"] != usual["audio"]:
                problems.append(f"the next request failed: {after}")
            elif after["total_s"] > 3 * usual["total_s"] + SLACK_S:
                problems.append(f"the next 1 s request took {after['total_s']:.1f} s, {usual['total_s']:.1f} s before")
            await asyncio.sleep(IDLE_TRIM_S)
            memory_after = resident_mb(watermarker)
            print(f"watermarker resident memory {memory_before:.0f} MB before, {memory_after:.0f} MB after")
            print(f"csm_1b resident memory {csm_before:.0f} MB before, {resident_mb(csm_1b):.0f} MB after (unchecked)")
            if memory_after > (1 + MEMORY_BACK_WITHIN) * memory_before:
                problems.append(f"the watermarker kept {memory_after:.0f} MB, {memory_before:.0f} MB before the burst")
    finally:
        await proxy.runner.cleanup()
    assert not problems, "\n".join(problems)


async def test_health_without_tritons_metrics_still_serves(server):
    """A metrics port that does not answer leaves the replica serving; only its stages are unknown."""
    proxy = await start_proxy(server.grpc_url, triton_metrics_port=free_port())
    try:
        async with aiohttp.ClientSession() as session, session.get(proxy.http + "/health") as response:
            body = await response.json()
        assert response.status == 200 and body["status"] == "ok", body
        replica = body["triton"]["replicas"][0]
        assert replica["stages"] is None and "metrics" in replica["stages_error"], replica
    finally:
        await proxy.runner.cleanup()


def test_the_servers_log_names_the_graph_policy(server):
    log = server.log_text()
    assert "CUDA graphs auto: frames run eagerly" in log
