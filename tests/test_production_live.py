"""Running it in production, on the live local stack: metrics that move (proxy and Triton), request ids from the
client to the model's log line, API keys and their limits, status codes that blame the right party, and a graceful
drain of `python -m proxy` on SIGTERM. Replica discovery has its own module (tests/test_discovery_live.py).

Most proxies here stream from `csm_1b` directly (watermarking costs ~1 CPU-second per audio second on this machine);
the request-id test goes through `tts`, so that the watermarker's log line is checked too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import aiohttp
import pytest
import websockets
from live_proxy import Proxy, too_long_for_the_model, wait_until_healthy
from live_proxy import start_proxy as start_live_proxy
from prometheus_client.parser import text_string_to_metric_families

from csm_tts.tooling.local_triton import free_port
from proxy.appkeys import TRITON
from proxy.auth import generate_key, hash_key

pytestmark = pytest.mark.live
ROOT = Path(__file__).resolve().parent.parent
FAST = {"max_audio_length_ms": 1000}


async def start_proxy(grpc_url: str, **overrides) -> Proxy:
    return await start_live_proxy(grpc_url, **{"triton_model": "csm_1b", **overrides})


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus exposition, parsed by prometheus_client: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(parsed: dict, name: str, **labels) -> float:
    return parsed.get((name, tuple(sorted(labels.items()))), 0.0)


async def proxy_metrics(session: aiohttp.ClientSession, base: str) -> dict:
    async with session.get(base + "/metrics") as response:
        assert response.status == 200 and response.content_type == "text/plain"
        return samples(await response.text())


def triton_streams(server) -> dict[str, float]:
    """csm_1b's streams by state, summed over instances, from Triton's metrics port."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        parsed = samples(response.read().decode())
    totals = {"active": 0.0, "queued": 0.0, "held": 0.0}  # held: streams waiting for the watermarker
    for (name, labels), v in parsed.items():
        labels = dict(labels)
        if name == "csm_tts_streams" and labels.get("model") == "csm_1b":
            totals[labels["state"]] += v
    return totals


async def wait_triton_idle(server, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while any((streams := await asyncio.to_thread(triton_streams, server)).values()):
        assert time.monotonic() < deadline, streams
        await asyncio.sleep(0.1)


async def wait_idle(proxy: Proxy, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while proxy.app[TRITON].active_streams and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert proxy.app[TRITON].active_streams == 0


# -- metrics ---------------------------------------------------------------------------------------------------------
async def test_proxy_metrics_count_each_request(triton_server):
    proxy = await start_proxy(triton_server.grpc_url)
    try:
        async with aiohttp.ClientSession() as session:
            before = await proxy_metrics(session, proxy.http)
            for i in range(2):
                async with session.post(proxy.http + "/generate", json={"text": f"Counted {i}.", **FAST}) as r:
                    assert r.status == 200
            after = await proxy_metrics(session, proxy.http)
            for name in ("csm_proxy_time_to_first_audio_seconds_count", "csm_proxy_real_time_factor_count"):
                assert value(after, name, endpoint="/generate") - value(before, name, endpoint="/generate") == 2
            ttfa_sum = value(after, "csm_proxy_time_to_first_audio_seconds_sum", endpoint="/generate")
            assert 0 < ttfa_sum < 60
            ok = {"endpoint": "/generate", "method": "POST", "status": "200"}
            assert value(after, "csm_proxy_requests_total", **ok) - value(before, "csm_proxy_requests_total", **ok) == 2
            audio = value(after, "csm_proxy_audio_seconds_total", endpoint="/generate")
            assert audio - value(before, "csm_proxy_audio_seconds_total", endpoint="/generate") == pytest.approx(1.92)
            # A WebSocket text counts under its own route, once per text.
            async with websockets.connect(proxy.ws + "?mode=stream") as ws:
                await ws.send(json.dumps({"text": "Over the socket.", **FAST}))
                while json.loads(await ws.recv())["type"] != "end":
                    pass
            final = await proxy_metrics(session, proxy.http)
            assert value(final, "csm_proxy_time_to_first_audio_seconds_count", endpoint="/stream") == 1
            bad = {"endpoint": "/generate", "method": "POST", "status": "422"}
            # Valid for the proxy, refused by Triton (INVALID_ARG): the prompt and 90 s of audio exceed the context.
            too_long = too_long_for_the_model()
            async with session.post(proxy.http + "/generate", json=too_long) as r:
                assert r.status == 422
            final = await proxy_metrics(session, proxy.http)
            assert value(final, "csm_proxy_requests_total", **bad) == 1
            assert value(final, "csm_proxy_upstream_errors_total", code="INVALID_ARG") == 1
            assert value(final, "csm_proxy_triton_replicas", state="serving") == 1
    finally:
        await proxy.runner.cleanup()


async def test_triton_stream_metric_rises_under_load_and_falls_back(triton_server):
    """The autoscaling signal (docs/deployment.md): csm_1b's active+queued streams on Triton's metrics port."""
    proxy = await start_proxy(triton_server.grpc_url)
    try:
        await wait_triton_idle(triton_server)
        async with aiohttp.ClientSession() as session:

            async def generate(i: int) -> int:
                body = {"text": f"Load {i}.", "max_audio_length_ms": 5000}
                async with session.post(proxy.http + "/generate", json=body) as response:
                    return response.status

            # All four run together for most of their ~60 frames each; sampled every 50 ms until both counts have
            # shown all four (a quiet box made 2.5 s clips so fast that 0.2 s samples could miss the overlap).
            requests = asyncio.gather(*(generate(i) for i in range(4)))
            seen, proxy_seen = [0], [0]
            while not requests.done() and min(max(seen), max(proxy_seen)) < 4:
                streams = await asyncio.to_thread(triton_streams, triton_server)
                seen.append(streams["active"] + streams["queued"])
                proxy_seen.append(value(await proxy_metrics(session, proxy.http), "csm_proxy_active_streams"))
                await asyncio.sleep(0.05)
            assert await requests == [200] * 4
        assert max(seen) == 4, seen
        assert max(proxy_seen) == 4, proxy_seen
        await wait_triton_idle(triton_server)  # and back to 0
    finally:
        await proxy.runner.cleanup()


# -- request ids -----------------------------------------------------------------------------------------------------
async def test_request_id_reaches_the_response_and_both_models_log_lines(triton_server):
    proxy = await start_proxy(triton_server.grpc_url, triton_model="tts")
    request_id = f"trace-{uuid.uuid4().hex[:12]}"
    try:
        async with aiohttp.ClientSession() as session:
            body = {"text": "Trace me.", "watermark": True, **FAST}
            async with session.post(proxy.http + "/generate", json=body, headers={"X-Request-ID": request_id}) as r:
                assert r.status == 200 and r.headers["X-Request-ID"] == request_id
                assert (await r.json())["watermarked"] is True
            async with session.get(proxy.http + "/health") as r:  # every response has one; this one is made
                made = r.headers["X-Request-ID"]
                assert made and made != request_id
        # The WebSocket upgrade answers with it too.
        async with websockets.connect(proxy.ws, additional_headers={"X-Request-ID": "ws-" + request_id}) as ws:
            assert ws.response.headers["X-Request-ID"] == "ws-" + request_id
            await ws.send(json.dumps({"config": {"mode": "stream"}}))  # stream-mode replies carry it as well
            reply = json.loads(await ws.recv())
            assert reply["type"] == "config" and reply["request_id"] == "ws-" + request_id
        log = triton_server.log_text()
        assert f"[csm_1b] request {request_id}: stream " in log
        assert f"[watermarker] request {request_id}: stream " in log
    finally:
        await proxy.runner.cleanup()


# -- API keys, limits, watermark policy ------------------------------------------------------------------------------
async def test_api_keys_limits_and_watermark_policy(triton_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    key, trusted = generate_key(), generate_key()
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(
        json.dumps(
            {
                "keys": [
                    {"name": "tester", "sha256": hash_key(key), "max_streams": 1},
                    {"name": "trusted", "sha256": hash_key(trusted), "allow_watermark_off": True, "operator": True},
                ]
            }
        )
    )
    proxy = await start_proxy(
        triton_server.grpc_url,
        api_keys_file=str(keys_file),
        metrics_key_names=True,
        watermark_allow_disable=False,
        watermark_allow_custom_key=False,
    )
    auth = {"Authorization": f"Bearer {key}"}
    try:
        async with aiohttp.ClientSession() as session:
            url = proxy.http + "/generate"
            async with session.post(url, json={"text": "No key.", **FAST}) as r:
                assert r.status == 401 and "API key" in (await r.json())["error"]
            async with session.post(
                url, json={"text": "Wrong key.", **FAST}, headers={"Authorization": "Bearer x"}
            ) as r:
                assert r.status == 401
            async with session.post(url, json={"text": "Right key.", **FAST}, headers=auth) as r:
                assert r.status == 200 and (await r.json())["audio_base64"]

            # Browsers: the key as a second WebSocket subprotocol; the server selects "csm-tts".
            with pytest.raises(websockets.InvalidStatus) as info:
                await websockets.connect(proxy.ws)
            assert info.value.response.status_code == 401
            async with websockets.connect(proxy.ws + "?mode=stream", subprotocols=["csm-tts", f"bearer.{key}"]) as ws:
                assert ws.subprotocol == "csm-tts"
                await ws.send(json.dumps({"text": "Holding the only stream.", "max_audio_length_ms": 3000}))
                assert json.loads(await ws.recv())["type"] == "audio"
                # The key's one stream is taken: 429 with Retry-After, at once.
                async with session.post(url, json={"text": "A second stream.", **FAST}, headers=auth) as r:
                    assert r.status == 429 and r.headers["Retry-After"] == "1"
                    assert "limit 1" in (await r.json())["error"]
                while json.loads(await ws.recv())["type"] != "end":
                    pass
            async with session.post(url, json={"text": "Free again.", **FAST}, headers=auth) as r:
                assert r.status == 200

            # The watermark policy: forbidden choices are a 403; a key may be trusted with them.
            for choice in ({"watermark": False}, {"watermark_key": [1, 2, 3, 4, 5]}):
                async with session.post(url, json={"text": "Policy.", **choice, **FAST}, headers=auth) as r:
                    assert r.status == 403, choice
            async with session.post(
                url,
                json={"text": "Trusted.", "watermark": False, **FAST},
                headers={"Authorization": f"Bearer {trusted}"},
            ) as r:
                assert r.status == 200
            async with session.get(proxy.http + "/metrics", headers={"Authorization": f"Bearer {trusted}"}) as r:
                metrics = await r.text()
        parsed = samples(metrics)
        assert value(parsed, "csm_proxy_rejections_total", reason="unauthorized") == 3
        assert value(parsed, "csm_proxy_rejections_total", reason="rate_limited") == 1
        assert value(parsed, "csm_proxy_rejections_total", reason="forbidden") == 2
        assert value(parsed, "csm_proxy_key_streams_total", key="tester") == 3
        # Everything the server side logged (the proxy, aiohttp's server and access log, gRPC), at DEBUG; the test's
        # own WebSocket client logs the headers it sends, so its records are not the server's.
        server_log = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("websockets.client"))
        for secret in (key, trusted):
            assert secret not in metrics
            assert secret not in server_log
        assert "unknown API key" in server_log and "no API key" in server_log
        assert any(r.name == "proxy.access" for r in caplog.records)
    finally:
        await proxy.runner.cleanup()


# -- status codes ----------------------------------------------------------------------------------------------------
async def test_stream_idle_timeout_is_504(triton_server):
    proxy = await start_proxy(triton_server.grpc_url, stream_idle_timeout_s=0.01)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(proxy.http + "/generate", json={"text": "Too slow.", **FAST}) as r,
        ):
            body = await r.json()
            assert r.status == 504 and "sent nothing" in body["error"], body
        await wait_idle(proxy)
    finally:
        await proxy.runner.cleanup()


# -- graceful drain --------------------------------------------------------------------------------------------------
async def test_sigterm_drains_streams_in_flight_then_closes(triton_server, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "PROXY_PORT": str(port),
        "TRITON_GRPC_URLS": triton_server.grpc_url,
        "TRITON_MODEL": "csm_1b",
        "PROXY_DRAIN_S": "60",
        "PROXY_LOG_FORMAT": "json",
    }
    log_path = tmp_path / "proxy.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_until_healthy(base)
        async with (
            aiohttp.ClientSession() as session,
            websockets.connect(f"ws://127.0.0.1:{port}/stream?mode=stream") as ws,
        ):
            await ws.send(json.dumps({"text": "Finish me after the signal.", "max_audio_length_ms": 4000}))
            assert json.loads(await ws.recv())["type"] == "audio"
            await ws.send(json.dumps({"text": "Queued behind it.", **FAST}))
            process.send_signal(signal.SIGTERM)
            start = time.monotonic()
            while True:  # readiness flips at once
                async with session.get(base + "/readyz") as response:
                    if response.status == 503:
                        assert (await response.json())["status"] == "draining"
                        break
                assert time.monotonic() - start < 1.0, "readiness did not flip within a second"
                await asyncio.sleep(0.02)
            async with session.get(base + "/livez") as response:
                assert response.status == 200
            async with session.post(base + "/generate", json={"text": "Too late.", **FAST}) as response:
                assert response.status == 503 and response.headers["Retry-After"] == "1"
                assert "shutting down" in (await response.json())["error"]
            with pytest.raises(websockets.InvalidStatus) as info:
                await websockets.connect(f"ws://127.0.0.1:{port}/stream")
            assert info.value.response.status_code == 503
            # The stream in flight completes; the next text of the session is refused; then 1001.
            messages = []
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    messages.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            ends = [m for m in messages if m["type"] == "end"]
            errors = [m for m in messages if m["type"] == "error"]
            assert len(ends) == 1 and ends[0]["samples"] == 4000 // 80 * 1920
            assert len(errors) == 1 and "shutting down" in errors[0]["error"]
            assert closed.value.rcvd.code == 1001
        assert await asyncio.to_thread(process.wait, 20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    messages = [line["message"] for line in lines]
    assert any(m.startswith("draining") for m in messages) and "drained: no stream in flight" in messages
    assert "Traceback" not in log_path.read_text()


# -- what the models' metrics cost ------------------------------------------------------------------------------------
def test_bench_model_metrics_prints_its_numbers():
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_model_metrics.py"), "--calls", "50"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in lines[1:4]}
    assert set(rows) == {"frame_step", "occupancy_change", "watermark_chunk"}
    for caller, made in rows.values():
        assert 0 < caller <= made  # queueing is never slower than making the call
    assert "csm_1b frame loop pays" in lines[-1]
