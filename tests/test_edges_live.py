"""The proxy's edges against real clients on real sockets, in front of the real local Triton: slow clients are cut
within the configured limits, open connections are capped, pages on other origins cannot drive it, and every request
and WebSocket session leaves one honest log line and metric."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from live_proxy import start_proxy

from proxy.server import LINGER_S

pytestmark = pytest.mark.live
SLACK_S = 3.0  # a busy 2-core box: timers fire late, not early
LIMITS = {"header_timeout_s": 1.0, "body_timeout_s": 1.0, "max_connections": 6}


@pytest.fixture(scope="module")
async def proxy(triton_server):
    proxy = await start_proxy(triton_server.grpc_url, **LIMITS)
    yield proxy
    await proxy.runner.cleanup()


async def connect(proxy):
    host, port = proxy.http.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def read_until_closed(reader: asyncio.StreamReader, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), limit_s)
    return data, time.monotonic() - started


async def test_a_slow_header_is_closed_within_the_header_limit(proxy):
    reader, writer = await connect(proxy)
    writer.write(b"POST /generate HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
    await writer.drain()
    data, took = await read_until_closed(reader, LIMITS["header_timeout_s"] + SLACK_S)
    writer.close()
    assert data == b""  # nothing was read, nothing to answer
    assert LIMITS["header_timeout_s"] * 0.9 <= took <= LIMITS["header_timeout_s"] + SLACK_S


async def test_a_slow_websocket_handshake_is_closed_within_the_header_limit(proxy):
    reader, writer = await connect(proxy)
    writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n")
    await writer.drain()
    data, took = await read_until_closed(reader, LIMITS["header_timeout_s"] + SLACK_S)
    writer.close()
    assert data == b"" and took <= LIMITS["header_timeout_s"] + SLACK_S


async def test_a_slow_body_gets_408_and_is_closed_within_the_body_limit(proxy):
    reader, writer = await connect(proxy)
    writer.write(
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        b'{"text":'
    )
    await writer.drain()
    limit = LIMITS["body_timeout_s"] + LINGER_S + SLACK_S
    data, took = await read_until_closed(reader, limit)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    assert b"PROXY_BODY_TIMEOUT_S" in data
    assert LIMITS["body_timeout_s"] * 0.9 <= took <= limit


async def test_a_quick_client_is_not_cut_by_the_header_limit(proxy):
    """The header limit is on the first header only: a kept-alive connection idles past it and is reused."""
    reader, writer = await connect(proxy)
    for _ in range(2):
        writer.write(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(
            next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        )
        await reader.readexactly(length)
        await asyncio.sleep(LIMITS["header_timeout_s"] * 1.5)
    writer.close()


async def test_connections_beyond_the_cap_get_503_and_are_closed(proxy):
    held = [await connect(proxy) for _ in range(LIMITS["max_connections"])]
    try:
        reader, writer = await connect(proxy)
        data, _ = await read_until_closed(reader, 5)
        writer.close()
        assert data.startswith(b"HTTP/1.1 503 "), data[:200]
        assert b"Retry-After: 1" in data and b"PROXY_MAX_CONNECTIONS" in data
    finally:
        for _, w in held:
            w.close()
    await asyncio.sleep(0.3)  # the server sees them go
    reader, writer = await connect(proxy)
    writer.write(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data, _ = await read_until_closed(reader, 5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 200 ")
    text = await metrics_text(proxy)
    assert 'csm_proxy_rejections_total{reason="connections"}' in text


async def metrics_text(proxy) -> str:
    async with aiohttp.ClientSession() as session, session.get(proxy.http + "/metrics") as response:
        return await response.text()
