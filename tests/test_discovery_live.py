"""Replica discovery on the live stack: two real Triton servers behind one name, one stopped mid-run.

The servers listen on two loopback addresses (127.0.0.2 and 127.0.0.3) with the same ports, as two pods behind a
headless Service would; the proxy resolves the name "triton.test" through a resolver the test controls (no DNS,
no /etc/hosts edit, no traffic off the machine). Which replica served a stream is read from the Triton logs: the
proxy's request id is the Triton request id, and csm_1b logs it. The servers serve `csm_1b` only, to start fast.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import time

import aiohttp
import pytest

from csm_tts.tooling.local_triton import TritonServer, free_port
from csm_tts.tooling.model_repository import render
from proxy.app import create_app
from proxy.server import start_server
from proxy.settings import Settings

pytestmark = pytest.mark.live
ADDRESSES = ("127.0.0.2", "127.0.0.3")


def shared_ports() -> tuple[int, int, int]:
    """Three ports free on both addresses."""
    while True:
        ports = tuple(free_port(ADDRESSES[0]) for _ in range(3))
        try:
            for port in ports:
                with socket.socket() as probe:
                    probe.bind((ADDRESSES[1], port))
        except OSError:
            continue
        if len(set(ports)) == 3:
            return ports


@pytest.fixture
def two_tritons(tmp_path, tiny_csm_dir):
    http, grpc, metrics = shared_ports()
    servers = []
    for i, address in enumerate(ADDRESSES):
        repo = render(tmp_path / f"repo{i}", "cpu", {"csm_model_dir": str(tiny_csm_dir)})
        for model in repo.iterdir():
            if model.name != "csm_1b":
                shutil.rmtree(model)
        servers.append(
            TritonServer(
                repo,
                http_port=http,
                grpc_port=grpc,
                metrics_port=metrics,
                host=address,
                log_path=tmp_path / f"triton-{address}.log",
            )
        )
    yield servers
    for server in servers:
        server.stop()


def served_on(server: TritonServer, request_id: str) -> bool:
    return f"[csm_1b] request {request_id}: stream " in server.log_text()


async def test_two_replicas_behind_one_name_share_streams_and_survive_losing_one(two_tritons):
    a, b = two_tritons
    await asyncio.gather(*(asyncio.to_thread(s.start, 240) for s in two_tritons))
    answer = list(ADDRESSES)
    lookups = []

    async def resolver(host: str, port: int) -> list[str]:
        lookups.append(host)
        assert host == "triton.test"
        return list(answer)

    settings = Settings(
        triton_grpc_urls=(),
        triton_grpc_service=f"triton.test:{a.grpc_port}",
        discovery_interval_s=0.5,
        health_interval_s=0.5,
        triton_model="csm_1b",
        watermark_enabled=False,  # these servers have no watermarker
    )
    app = create_app(settings, resolver=resolver)
    runner = await start_server(app, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    results: dict[str, tuple[int, float]] = {}
    try:
        async with aiohttp.ClientSession(base) as session:

            async def generate(request_id: str, ms: int) -> None:
                started = time.monotonic()
                body = {"text": f"Request {request_id}.", "max_audio_length_ms": ms}
                async with session.post("/generate", json=body, headers={"X-Request-ID": request_id}) as response:
                    await response.read()
                    results[request_id] = (response.status, started)

            async with session.get("/health") as response:
                health = await response.json()
            assert response.status == 200 and health["triton"]["serving_replicas"] == 2, health
            assert {r["url"] for r in health["triton"]["replicas"]} == {f"{x}:{a.grpc_port}" for x in ADDRESSES}

            # Both replicas share the streams.
            await asyncio.gather(*(generate(f"share-{i}", 1000) for i in range(6)))
            assert all(results[f"share-{i}"][0] == 200 for i in range(6)), results
            on_a = [i for i in range(6) if served_on(a, f"share-{i}")]
            on_b = [i for i in range(6) if served_on(b, f"share-{i}")]
            assert on_a and on_b and sorted(on_a + on_b) == list(range(6)), (on_a, on_b)

            # Streams keep arriving while replica b stops (as a pod would on scale-down) and leaves the name.
            async def traffic() -> None:
                tasks = []
                for i in range(8):
                    tasks.append(asyncio.create_task(generate(f"churn-{i}", 1500)))
                    await asyncio.sleep(0.3)
                await asyncio.gather(*tasks)

            load = asyncio.create_task(traffic())
            await asyncio.sleep(1.0)
            stopped_at = time.monotonic()
            answer.remove(ADDRESSES[1])
            await asyncio.to_thread(b.stop)
            await load
    finally:
        await runner.cleanup()
    churn = {rid: r for rid, r in results.items() if rid.startswith("churn-")}
    assert len(churn) == 8
    before_stop = [rid for rid, (_, started) in churn.items() if started < stopped_at]
    assert any(served_on(b, rid) for rid in before_stop), (
        "no stream ran on b before it stopped: the test proved nothing"
    )
    for rid, (status, _) in churn.items():
        if not served_on(b, rid):
            assert status == 200, (rid, status, "a stream that did not start on the stopped replica failed")
    assert lookups.count("triton.test") >= 2  # re-resolved while running
