"""The proxy as a hostile client meets it, in front of the real local Triton: every malformed input gets a clear
answer (a 4xx with a JSON body, or an error message on a WebSocket that stays open), is logged at most as one line,
and the service keeps serving afterwards. Requests without max_audio_length_ms get the model's default, which
follows the text."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging

import pytest
import websockets
from live_proxy import module_proxy
from test_proxy_live import decode_wav, start_proxy, wait_idle

from csm_tts import SAMPLES_PER_FRAME
from csm_tts.speech.length_rule import default_audio_length_ms

pytestmark = pytest.mark.live
FAST = {"max_audio_length_ms": 1000, "watermark": False}
DEEP = "[" * 100_000  # nested past Python's recursion limit
HUGE = "9" * 5000  # an integer literal past Python's int parsing limit
JSON = {"Content-Type": "application/json"}  # raw bodies are sent as JSON (anything else is 415)


proxy = module_proxy(start_proxy)


def body(text: str) -> bytes:
    return text.encode()


# (method, path, query, raw body, expected status); raw bodies so that no client library "fixes" them.
HTTP_CASES = [
    ("POST", "/generate", {}, body("not json"), 400),
    ("POST", "/generate", {}, b"", 400),
    ("POST", "/generate", {}, body(DEEP), 400),
    ("POST", "/generate", {}, body('{"text": "Hi", "topk": ' + HUGE + "}"), 400),
    ("POST", "/generate", {}, b'{"text": "\\ud800"}', 422),
    ("POST", "/generate", {}, b'{"text": "ok \\udfff"}', 422),
    ("POST", "/generate", {}, body(json.dumps({"text": "Hi", "speaker_id": 2**63})), 422),
    ("POST", "/generate", {}, body(json.dumps({"text": "Hi", "speaker_id": 10**30})), 422),
    ("POST", "/generate", {}, body(json.dumps({"text": "Hi", "speaker_id": 32})), 422),
    ("POST", "/generate", {}, body(json.dumps({"text": "Hi", "seed": 2**64})), 422),
    ("POST", "/generate", {}, body(json.dumps({"text": "Hi", "max_audio_length_ms": -(2**70)})), 422),
    ("POST", "/generate", {}, b'{"text": "Hi", "temperature": 1e400}', 422),
    ("POST", "/generate", {}, body(json.dumps({"text": "Hi", "temperature": 10**400})), 422),
    ("POST", "/generate", {}, body(json.dumps({"text": "Hi", "topk": "9" * 5000})), 422),
    ("POST", "/generate", {}, body(json.dumps({"text": ["Hi"]})), 422),
    ("POST", "/generate", {}, body(json.dumps({"text": "x" * 5001})), 422),
    ("POST", "/generate", {}, body(json.dumps({"text": "Hi", "watermark_key": [2**64] * 5})), 422),
    ("POST", "/generate", {}, b"x" * (2 << 20), 413),
    ("POST", "/generate/wav", {}, b'{"text": "\\ud800"}', 422),
    ("POST", "/generate/wav", {}, body(json.dumps({"text": "Hi", "speaker_id": 2**63})), 422),
    ("POST", "/generate/wav", {}, body(DEEP), 400),
    ("POST", "/stream/chunks", {}, body(DEEP), 400),
    ("POST", "/stream/chunks", {}, body(json.dumps({"text": "Hi"})), 400),
    ("POST", "/stream/chunks", {}, body("[]"), 422),
    ("POST", "/stream/chunks", {}, body("[1, null]"), 422),
    ("POST", "/stream/chunks", {"speaker_id": "9" * 30}, body('["Hi"]'), 422),
    ("POST", "/stream/chunks", {"speaker_id": HUGE}, body('["Hi"]'), 422),
    ("POST", "/stream/chunks", {"seed": "-1"}, body('["Hi"]'), 422),
    ("POST", "/stream/chunks", {"temperature": "1e400"}, body('["Hi"]'), 422),
    ("POST", "/stream/chunks", {"context": "maybe"}, body('["Hi"]'), 422),
    ("POST", "/stream/chunks", {"voice": "1"}, body('["Hi"]'), 422),
    ("GET", "/stream", {}, b"", 400),
    ("GET", "/stream", {"speaker_id": "99"}, b"", 422),
    ("GET", "/nowhere", {}, b"", 404),
    ("PUT", "/generate", {}, b"{}", 405),
]


async def test_every_malformed_http_request_gets_a_json_4xx(http, proxy, caplog):
    caplog.set_level(logging.INFO)
    for method, path, query, raw, status in HTTP_CASES:
        async with http.request(method, path, params=query, data=io.BytesIO(raw), headers=JSON) as response:
            answer = await response.json(content_type=None)
            assert response.status == status, (path, query, raw[:60], answer)
            assert isinstance(answer.get("error"), str) and answer["error"], (path, raw[:60])
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a bad request was logged as an error"
    await assert_still_serving(http, proxy)


async def raw_http(proxy, request: bytes) -> bytes:
    host, port = proxy.http.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 GET / HTTP/1.1\r\n\r\n",
    ],
    ids=["8 KB URL", "8 KB header", "bad header name", "bad version", "TLS on plain HTTP"],
)
async def test_malformed_http_costs_one_log_line_and_a_400(proxy, http, caplog, request_bytes):
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    answer = await raw_http(proxy, request_bytes)
    assert answer.startswith(b"HTTP/1.") and answer.split(b" ")[1].startswith(b"4"), answer[:200]
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno <= logging.INFO and not records[0].exc_info
    assert records[0].getMessage().startswith("malformed HTTP request from 127.0.0.1 (answered 400): ")
    assert "\n" not in records[0].getMessage() and len(records[0].getMessage()) < 300
    await assert_still_serving(http, proxy)


async def test_a_text_that_fails_in_the_middle_of_stream_chunks_becomes_its_error_line(http):
    raw = b'["First line.", "bad \\ud800 text", "Third line."]'
    async with http.post(
        "/stream/chunks", params={"max_audio_length_ms": "1000", "watermark": "false"}, data=raw, headers=JSON
    ) as r:
        assert r.status == 200
        lines = [json.loads(line) for line in (await r.read()).splitlines()]
    assert [("error" in line) for line in lines] == [False, True, False]
    assert "UTF-8" in lines[1]["error"] and lines[1]["text"] == "bad \ud800 text"
    for line in (lines[0], lines[2]):
        assert decode_wav(base64.b64decode(line["audio_base64"])).size == 12 * SAMPLES_PER_FRAME


WS_CASES = [
    "not json",
    DEEP,
    '{"text": "Hi", "topk": ' + HUGE + "}",
    '{"text": "\\ud800"}',
    json.dumps({"text": "Hi", "speaker_id": 2**63}),
    json.dumps({"text": "Hi", "speaker_id": 10**30}),
    json.dumps({"text": "Hi", "seed": 2**64}),
    json.dumps({"text": "Hi", "max_audio_length_ms": 10**30}),
    json.dumps({"text": "Hi", "temperature": 10**400}),
    json.dumps({"text": "Hi", "unknown": 1}),
    json.dumps({"config": {"speaker_id": 2**63}}),
    json.dumps({"config": "stream"}),
    json.dumps({"cancel": 1}),
    json.dumps({"done": False}),
    json.dumps([1, 2, 3]),
    json.dumps({"text": "x" * 5001}),
]


async def test_every_malformed_websocket_message_is_answered_and_the_socket_stays_open(proxy, http, caplog):
    caplog.set_level(logging.INFO)
    async with websockets.connect(proxy.ws, max_size=None) as ws:
        for message in WS_CASES:
            await ws.send(message)
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert isinstance(reply.get("error"), str) and reply["error"], (message[:60], reply)
        await ws.send(b"\x00binary")
        assert "Binary frames" in json.loads(await asyncio.wait_for(ws.recv(), 10))["error"]
        await ws.send(json.dumps({"text": "Still here.", **FAST}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 60))
        assert decode_wav(base64.b64decode(reply["audio_base64"])).size == 12 * SAMPLES_PER_FRAME
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a bad message was logged as an error"
    await assert_still_serving(http, proxy)


async def test_messages_after_done_are_answered(proxy):
    async with websockets.connect(proxy.ws) as ws:
        await ws.send(json.dumps({"text": "The last words.", **FAST}))
        await ws.send(json.dumps({"done": True}))
        await ws.send(json.dumps({"text": "Too late."}))
        replies = [json.loads(await asyncio.wait_for(ws.recv(), 60)) for _ in range(3)]
    assert sum("no messages are accepted after done" in r.get("error", "") for r in replies) == 1
    assert sum("audio_base64" in r for r in replies) == 1 and replies[-1] == {"status": "closed"}


async def test_without_a_length_the_reply_follows_the_text(proxy, triton_server):
    """The seed's documented WebSocket client sends only text: its reply is as long as the model's default for it
    (the tiny checkpoint never stops by itself), seconds rather than the old 30 s."""
    async with websockets.connect(proxy.ws) as ws:
        await ws.send(json.dumps({"text": "Hello,"}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 120))
    samples = decode_wav(base64.b64decode(reply["audio_base64"])).size
    assert samples == default_audio_length_ms("Hello,", 90_000) // 80 * SAMPLES_PER_FRAME  # 2.88 s


async def assert_still_serving(http, proxy):
    async with http.post("/generate", json={"text": "Still serving.", **FAST}) as response:
        assert response.status == 200, await response.text()
        assert decode_wav(base64.b64decode((await response.json())["audio_base64"])).size == 12 * SAMPLES_PER_FRAME
    await wait_idle(proxy)
