"""The proxy's edges against real clients on real sockets, in front of the real local Triton: slow clients are cut
within the configured limits, open connections are capped, pages on other origins cannot drive it, and every request
and WebSocket session leaves one honest log line and metric."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import time

import aiohttp
import numpy as np
import pytest
import soundfile
import websockets
from live_proxy import module_proxy, start_proxy

from csm_tts.tooling.local_triton import free_port
from proxy.auth import WS_BEARER_PREFIX, WS_PROTOCOL, generate_key, hash_key
from proxy.server import LINGER_S

pytestmark = pytest.mark.live
SLACK_S = 3.0  # a busy 2-core box: timers fire late, not early
LIMITS = {"header_timeout_s": 1.0, "body_timeout_s": 1.0, "max_connections": 6}


proxy = module_proxy(start_proxy, **LIMITS)


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


# -- one access-log line per request and session, honest counts -----------------------------------------------------
def access_lines(caplog, request_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "proxy.access" and f"id={request_id}" in r.getMessage()]


def requests_total(text: str, endpoint: str, status: str) -> float:
    prefix = f'csm_proxy_requests_total{{endpoint="{endpoint}",method="GET",status="{status}"}} '
    return sum(float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix))


async def wait_for_line(caplog, request_id: str, timeout_s: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while not access_lines(caplog, request_id) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return access_lines(caplog, request_id)


async def test_a_clean_websocket_session_is_one_access_line_with_its_close_code_and_counts_as_101(proxy, caplog):
    caplog.set_level(logging.INFO, logger="proxy.access")
    before = requests_total(await metrics_text(proxy), "/stream", "101")
    aborted = requests_total(await metrics_text(proxy), "/stream", "499")
    request_id = "edge-ws-clean"
    headers = {"X-Request-ID": request_id}
    async with websockets.connect(proxy.ws + "?max_audio_length_ms=1000", additional_headers=headers) as ws:
        await ws.send(json.dumps({"text": "One.", "watermark": False}))
        assert "audio_base64" in json.loads(await ws.recv())
        await ws.send(json.dumps({"done": True}))
        assert json.loads(await ws.recv()) == {"status": "closed"}
        with pytest.raises(websockets.ConnectionClosedOK):
            await ws.recv()
    (line,) = await wait_for_line(caplog, request_id)
    assert '"GET /stream?max_audio_length_ms=1000" 101 close=1000 ' in line
    assert 0.5 <= float(re.search(r" audio=([0-9.]+)s ", line)[1]) <= 1.0, line  # the one text's (up to) 1 s
    text = await metrics_text(proxy)
    assert requests_total(text, "/stream", "101") == before + 1
    assert requests_total(text, "/stream", "499") == aborted


async def test_a_vanished_websocket_client_is_logged_as_an_abnormal_close(proxy, caplog):
    caplog.set_level(logging.INFO, logger="proxy.access")
    request_id = "edge-ws-vanished"
    ws = await websockets.connect(proxy.ws + "?mode=stream", additional_headers={"X-Request-ID": request_id})
    await ws.send(json.dumps({"text": "Nobody hears this.", "max_audio_length_ms": 4000, "watermark": False}))
    assert json.loads(await ws.recv())["type"] == "audio"
    ws.transport.abort()  # no closing handshake
    (line,) = await wait_for_line(caplog, request_id)
    assert " 101 close=1006 " in line, line


async def test_a_client_aborted_http_request_is_logged_as_499(proxy, caplog):
    caplog.set_level(logging.INFO, logger="proxy.access")
    request_id = "edge-http-aborted"
    reader, writer = await connect(proxy)
    body = json.dumps({"text": "Never mind.", "max_audio_length_ms": 8000, "watermark": False}).encode()
    writer.write(
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Request-ID: %s\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (request_id.encode(), len(body), body)
    )
    await writer.drain()
    await asyncio.sleep(1.0)  # generating
    writer.transport.abort()
    (line,) = await wait_for_line(caplog, request_id)
    assert '"POST /generate" 499 ' in line, line


async def test_control_and_bidirectional_characters_are_escaped_in_the_access_log(proxy, caplog):
    caplog.set_level(logging.INFO, logger="proxy.access")
    request_id = "edge-escaped"
    reader, writer = await connect(proxy)
    agent = "evil\u202egnp.exe\u2028forged\tline".encode()  # aiohttp's parser refuses other controls itself
    writer.write(
        b"GET /livez?q=%E2%80%AE HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Request-ID: "
        + request_id.encode()
        + b"\r\nUser-Agent: "
        + agent
        + b"\r\n\r\n"
    )
    data, _ = await read_until_closed(reader, 10)
    writer.close()
    assert data.startswith(b"HTTP/1.1 200 ")
    (line,) = await wait_for_line(caplog, request_id)
    assert "\u202e" not in line and "\u2028" not in line and "\t" not in line
    assert '"evil\\u202egnp.exe\\u2028forged\\x09line"' in line, line


# -- what /health and /metrics tell whom -----------------------------------------------------------------------------
async def test_with_keys_health_and_metrics_are_for_operators_or_the_metrics_listener(triton_server, tmp_path):
    user, operator = generate_key(), generate_key()
    keys_file = tmp_path / "keys.json"
    entries = [
        {"name": "web-app", "sha256": hash_key(user)},
        {"name": "ops", "sha256": hash_key(operator), "operator": True},
    ]
    keys_file.write_text(json.dumps({"keys": entries}))
    metrics_port = free_port()
    proxy = await start_proxy(triton_server.grpc_url, api_keys_file=str(keys_file), metrics_port=metrics_port)
    try:
        async with aiohttp.ClientSession() as session:
            for key in (None, user, "sk-unknown"):
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                async with session.get(proxy.http + "/health", headers=headers) as r:
                    assert r.status == 200 and await r.json() == {"status": "ok"}, key
            async with session.get(proxy.http + "/health", headers={"Authorization": f"Bearer {operator}"}) as r:
                details = await r.json()
                assert r.status == 200 and details["triton"]["replicas"][0]["url"] == triton_server.grpc_url
            async with session.get(proxy.http + "/metrics") as r:
                assert r.status == 401
            async with session.get(proxy.http + "/metrics", headers={"Authorization": f"Bearer {user}"}) as r:
                assert r.status == 403
            async with session.post(
                proxy.http + "/generate", json=FAST, headers={"Authorization": f"Bearer {user}"}
            ) as r:
                assert r.status == 200
            async with session.get(proxy.http + "/metrics", headers={"Authorization": f"Bearer {operator}"}) as r:
                assert r.status == 200 and "csm_proxy_requests_total" in await r.text()
            async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:  # the scraper's listener
                scraped = await r.text()
                assert r.status == 200 and "csm_proxy_requests_total" in scraped
            assert "web-app" not in scraped and 'key="' not in scraped  # names only with PROXY_METRICS_KEY_NAMES
            async with session.get(f"http://127.0.0.1:{metrics_port}/generate") as r:
                assert r.status == 404  # the listener serves nothing else
    finally:
        await proxy.runner.cleanup()


# -- small input holes -----------------------------------------------------------------------------------------------
async def post_json(proxy, path: str, raw: bytes) -> tuple[int, dict, int]:
    """Status, JSON answer and its size in bytes."""
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session, session.post(proxy.http + path, data=raw, headers=headers) as r:
        body = await r.read()
        return r.status, json.loads(body), len(body)


async def test_a_100_kb_voice_name_gets_a_short_error(proxy):
    name = "v" * 100_000
    raw = json.dumps({"model": "csm-1b", "input": "Hi.", "voice": name}).encode()
    status, answer, size = await post_json(proxy, "/v1/audio/speech", raw)
    assert status == 400 and "Unknown voice" in answer["error"]["message"], answer
    assert size < 2000, size


async def test_duplicate_json_keys_are_400(proxy):
    raw = b'{"text": "Hi.", "max_audio_length_ms": 1000, "watermark": true, "watermark": false}'
    status, answer, _ = await post_json(proxy, "/generate", raw)
    assert status == 400 and "'watermark' appears twice" in answer["error"], answer
    status, answer, _ = await post_json(proxy, "/v1/audio/speech", b'{"input": "a", "input": "b", "model": "x"}')
    assert status == 400 and "appears twice" in answer["error"]["message"], answer
    async with websockets.connect(proxy.ws) as ws:  # a WebSocket message too (the socket stays open)
        await ws.send('{"text": "Hi.", "text": "Bye."}')
        reply = json.loads(await ws.recv())
        assert "appears twice" in reply["error"], reply


def flac_bomb() -> bytes:
    """20 s of silence at 192 kHz x 8 channels: ~31 kB of FLAC that promises 30.7 M samples."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros((20 * 192_000, 8), np.int16), 192_000, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


async def test_a_reference_clip_beyond_the_decoding_budget_is_413_before_it_is_decoded(proxy, monkeypatch):
    bomb = flac_bomb()
    assert len(bomb) < 64_000
    reads = []
    original = soundfile.SoundFile.read
    monkeypatch.setattr(soundfile.SoundFile, "read", lambda self, *a, **k: reads.append(1) or original(self, *a, **k))
    fields = {"reference_audio": base64.b64encode(bomb).decode(), "reference_text": "Silence."}
    raw = json.dumps({"text": "Hi.", "max_audio_length_ms": 1000, "watermark": False, **fields}).encode()
    status, answer, _ = await post_json(proxy, "/generate", raw)
    assert status == 413 and "8 channels at 192000 Hz" in answer["error"], answer
    assert reads == []  # the decoder never ran
    # the same check lets an ordinary clip through to the decoder
    buffer = io.BytesIO()
    soundfile.write(buffer, 0.1 * np.ones(24_000, np.float32), 24_000, format="WAV", subtype="FLOAT")
    fields["reference_audio"] = base64.b64encode(buffer.getvalue()).decode()
    raw = json.dumps({"text": "Hi.", "max_audio_length_ms": 1000, "watermark": False, **fields}).encode()
    status, answer, _ = await post_json(proxy, "/generate", raw)
    assert status == 200 and reads, answer


async def test_a_reference_clip_of_amplitude_1e30_is_refused(proxy):
    buffer = io.BytesIO()
    clip = np.full(24_000, 1e30, np.float32)
    clip[::2] *= -1  # a stereo mix or a mean would not hide it either
    soundfile.write(buffer, clip, 24_000, format="WAV", subtype="FLOAT")
    fields = {"reference_audio": base64.b64encode(buffer.getvalue()).decode(), "reference_text": "Loud."}
    raw = json.dumps({"text": "Hi.", "max_audio_length_ms": 1000, "watermark": False, **fields}).encode()
    status, answer, _ = await post_json(proxy, "/generate", raw)
    assert status == 422 and "peak of 1e+30" in answer["error"], answer
