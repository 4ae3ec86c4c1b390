"""The proxy's edges against real clients on real sockets, in front of the real local Triton: slow clients are cut
within the configured limits, open connections are capped, pages on other origins cannot drive it, and every request
and WebSocket session leaves one honest log line and metric."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from live_proxy import start_proxy

from proxy.auth import WS_BEARER_PREFIX, WS_PROTOCOL, generate_key, hash_key
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


# -- pages on other origins ------------------------------------------------------------------------------------------
FOREIGN = "http://evil.test"
FAST = {"text": "Hi.", "max_audio_length_ms": 1000, "watermark": False}


@pytest.mark.parametrize(
    "path, content_type",
    [
        ("/generate", "text/plain"),
        ("/generate/wav", "application/x-www-form-urlencoded"),
        ("/generate/audio", "multipart/form-data; boundary=x"),
        ("/stream/chunks", "text/plain;charset=UTF-8"),
        ("/v1/audio/speech", "text/plain"),
        ("/generate", None),  # a Blob without a type: no Content-Type at all
    ],
)
async def test_a_json_endpoint_answers_415_to_any_other_content_type(proxy, path, content_type):
    body = json.dumps({**FAST, "input": "Hi.", "model": "csm-1b", "voice": "alloy"} if path.startswith("/v1") else FAST)
    if path == "/stream/chunks":
        body = json.dumps(["Hi."])
    headers = {"Origin": FOREIGN, **({"Content-Type": content_type} if content_type else {})}
    # skip_auto_headers: aiohttp would otherwise add application/octet-stream for a bytes body.
    post = {"data": body.encode(), "headers": headers, "skip_auto_headers": ["Content-Type"]}
    async with aiohttp.ClientSession() as session, session.post(proxy.http + path, **post) as response:
        answer = await response.json(content_type=None)
        assert response.status == 415, answer
        assert response.content_type == "application/json"
    message = answer["error"]["message"] if path.startswith("/v1") else answer["error"]
    assert "application/json" in message


async def test_json_with_a_charset_is_accepted(proxy):
    async with aiohttp.ClientSession() as session:
        headers = {"Content-Type": "application/json; charset=utf-8"}
        async with session.post(proxy.http + "/generate", data=json.dumps(FAST), headers=headers) as response:
            assert response.status == 200, await response.text()


async def ws_refusal(url: str, origin: str | None, **kwargs) -> int | None:
    """The HTTP status a handshake is refused with, or None when it is accepted (then the session streams)."""
    headers = {"Origin": origin} if origin else {}
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(url, headers=headers, **kwargs) as ws:
                await ws.send_json({"text": "Hi.", "max_audio_length_ms": 1000, "watermark": False})
                reply = await ws.receive_json(timeout=60)
                assert "error" not in reply, reply
                return None
        except aiohttp.WSServerHandshakeError as e:
            return e.status


async def test_a_websocket_from_a_foreign_origin_is_refused_without_keys(proxy):
    assert await ws_refusal(proxy.ws, FOREIGN) == 403
    assert await ws_refusal(proxy.ws, "null") == 403  # sandboxed frames and file:// pages
    assert await ws_refusal(proxy.ws, None) is None  # not a browser page: a client without Origin works
    assert await ws_refusal(proxy.ws, proxy.http) is None  # the proxy's own page (the demo)


async def test_a_websocket_origin_is_checked_with_keys_and_with_a_cors_list(triton_server, tmp_path):
    key = generate_key()
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": [{"name": "tester", "sha256": hash_key(key)}]}))
    allowed = "https://app.example"
    proxy = await start_proxy(triton_server.grpc_url, api_keys_file=str(keys_file), cors_origins=(allowed,))
    try:
        bearer = {"protocols": (WS_PROTOCOL, WS_BEARER_PREFIX + key)}
        assert await ws_refusal(proxy.ws, FOREIGN, **bearer) == 403  # a valid key does not make a page welcome
        assert await ws_refusal(proxy.ws, allowed, **bearer) is None
        assert await ws_refusal(proxy.ws, None, **bearer) is None
        assert await ws_refusal(proxy.ws, allowed) == 401  # the origin is welcome, the key is still needed
    finally:
        await proxy.runner.cleanup()
