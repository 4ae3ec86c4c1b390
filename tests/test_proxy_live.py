"""The proxy on an ephemeral port in front of the real local Triton (tiny checkpoint), end to end.

Generation on the tiny model runs ~20 frames/s on 2 CPUs, so requests ask for 1000 ms (12 frames = 23040 samples);
random weights do not emit EOS within 12 frames, so every clip has exactly its requested length. Audio is compared
bit for bit with what Triton streams for the same request and seed. Cancellation is checked in Triton's log
("[csm_1b] Cancelling the request ... after N frames").

The proxy streams from `tts` (csm_1b -> watermarker); PROXY_TEST_MODEL=csm_1b runs the same tests straight on
csm_1b (the proxy does not depend on the watermark stage), to tell a proxy fault from a watermarker fault.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import soundfile
import websockets
from live_proxy import Proxy, module_proxy, too_long_for_the_model, wait_until_healthy
from live_proxy import start_proxy as start_live_proxy

from csm_tts.tooling.local_triton import free_port
from csm_tts.tooling.triton_streams import stream
from proxy.appkeys import TRITON
from proxy.render.pcm import to_pcm16

pytestmark = pytest.mark.live
ROOT = Path(__file__).resolve().parent.parent
MODEL = os.environ.get("PROXY_TEST_MODEL", "tts")
SAMPLES_1S = 12 * 1920  # 1000 ms -> 12 frames of 80 ms
FAST = {"max_audio_length_ms": 1000}
# The module's proxy runs with CSM_WATERMARK_ENABLED=false (watermarking costs ~1 CPU-second per audio second here):
# requests without a `watermark` option are sent with watermark=false, so direct Triton requests compared with them
# say so too. Tests that check watermarking ask for it.
UNMARKED = {"watermark": False}
HEADER = struct.Struct("<IIII")


async def start_proxy(grpc_url: str, **overrides) -> Proxy:
    settings = {
        "triton_model": MODEL,
        "ws_max_pending": 2,
        "watermark_enabled": False,
        "cpu_threads": 2,  # the bounded pool that encodes, decodes and builds large bodies
    }
    return await start_live_proxy(grpc_url, **{**settings, **overrides})


proxy = module_proxy(start_proxy)


def decode_wav(data: bytes) -> np.ndarray:
    info = soundfile.info(io.BytesIO(data))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (24000, 1, "PCM_16", "WAV")
    audio, _ = soundfile.read(io.BytesIO(data), dtype="int16")
    return audio


def cancellations(server) -> list[str]:
    return re.findall(r"\[csm_1b\] Cancelling the request[^\n]*", server.log_text())


async def wait_for_cancellation(server, before: int, timeout: float = 20.0) -> list[str]:
    """csm_1b's cancellation lines logged since `before` was counted. Through `tts` the watermarker passes the
    ensemble's cancellation on to csm_1b (Triton 2.51 does not), so generation stops either way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(lines := cancellations(server)) > before:
            return lines[before:]
        await asyncio.sleep(0.1)
    pytest.fail(f"Triton logged no cancellation within {timeout:.0f} s")


def assert_generation_stopped(lines: list[str], max_frames: int) -> None:
    for line in lines:
        match = re.search(r"after (\d+) frames", line)  # or "before it started"
        assert match is None or int(match.group(1)) < max_frames, line


async def wait_idle(proxy: Proxy, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while proxy.app[TRITON].active_streams and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert proxy.app[TRITON].active_streams == 0


# -- REST ----------------------------------------------------------------------------------------------------------
async def test_health_reports_everything_ready(http, triton_server):
    response = await http.get("/health")
    body = await response.json()
    assert response.status == 200 and body["status"] == "ok", body
    assert body["proxy"]["status"] == "ok" and body["proxy"]["version"] == "0.1.0"
    assert body["triton"]["live"] and body["triton"]["ready"] and body["triton"]["serving_replicas"] == 1
    assert body["triton"]["replicas"][0]["url"] == triton_server.grpc_url
    assert body["models"][MODEL]["ready"] and body["models"]["csm_1b"]["ready"]
    assert body["watermark"] == {"enabled": False, "key_source": "public", "weights_present": True}


async def test_index(http):
    body = await (await http.get("/")).json()
    assert body["name"] == "csm-tts-proxy" and body["version"] == "0.1.0" and "POST /generate" in body["endpoints"]


async def test_generate_returns_the_models_audio(http, triton_server):
    params = {"seed": 11, "speaker_id": 1, "temperature": 0.8, "topk": 40, "watermark": True, **FAST}
    response = await http.post("/generate", json={"text": "Hello from the proxy.", **params})
    body = await response.json()
    assert response.status == 200 and set(body) == {
        "audio_base64",
        "sample_rate",
        "duration_ms",
        "processing_time_ms",
        "watermarked",
    }
    audio = decode_wav(base64.b64decode(body["audio_base64"]))
    assert body["sample_rate"] == 24000 and audio.size == SAMPLES_1S and body["duration_ms"] == 960.0
    assert body["processing_time_ms"] > 0 and body["watermarked"] is (MODEL == "tts")
    # Exactly what Triton streams for the same request, every parameter forwarded.
    direct = await stream(triton_server.grpc_url, MODEL, "Hello from the proxy.", params)
    assert np.array_equal(audio, to_pcm16(direct.audio))


async def test_generate_wav_and_options(http, triton_server):
    body = {"text": "A wav file.", "seed": 3, "watermark": False, **FAST}
    response = await http.post("/generate/wav", json=body)
    assert response.status == 200 and response.content_type == "audio/wav"
    assert response.headers["Content-Disposition"] == "attachment; filename=speech.wav"
    audio = decode_wav(await response.read())
    assert audio.size == SAMPLES_1S
    # watermark=false: the tts output is csm_1b's output exactly.
    plain = await stream(triton_server.grpc_url, "csm_1b", "A wav file.", {"seed": 3, **FAST})
    assert np.array_equal(audio, to_pcm16(plain.audio))
    as_json = await (await http.post("/generate", json=body)).json()
    assert as_json["watermarked"] is False
    assert np.array_equal(decode_wav(base64.b64decode(as_json["audio_base64"])), audio)


async def test_triton_rejections_are_422_with_its_message(http):
    # Valid for the proxy, too long for the model's 2048-position context: Triton's INVALID_ARG, checked cheaply.
    response = await http.post("/generate", json=too_long_for_the_model())
    body = await response.json()
    assert response.status == 422 and "context holds 2048" in body["error"] and "INVALID_ARG" not in body["error"]


async def test_stream_chunks_ndjson(http):
    texts = ["First line.", "", "Third line."]
    start = time.monotonic()
    response = await http.post(
        "/stream/chunks",
        params={"speaker_id": "1", "watermark": "false", "seed": "5", **{k: str(v) for k, v in FAST.items()}},
        json=texts,
    )
    assert response.status == 200 and response.content_type == "application/x-ndjson"
    lines, arrivals = [], []
    while line := await response.content.readline():
        lines.append(json.loads(line))
        arrivals.append(time.monotonic() - start)
    assert [line.get("text") for line in lines] == texts
    assert lines[1] == {"error": "No text provided", "text": ""}
    for line in (lines[0], lines[2]):
        assert set(line) == {"text", "audio_base64", "sample_rate"} and line["sample_rate"] == 24000
        assert decode_wav(base64.b64decode(line["audio_base64"])).size == SAMPLES_1S
    # Each line leaves as soon as it is ready: the third text (as long as the first) takes about as long again to
    # generate; buffered lines would arrive together. Relative, since a quiet machine makes a 1 s clip in ~0.2 s.
    assert arrivals[2] - arrivals[0] > 0.5 * arrivals[0]


# -- WebSocket: the documented client, unchanged -------------------------------------------------------------------
async def test_documented_websocket_client(proxy):
    chunks = ["Hello there.", "This is the second chunk."]
    received = []
    # The session's default length comes from the URL; the loop is the documented one.
    async with websockets.connect(proxy.ws + "?max_audio_length_ms=1000") as ws:
        for chunk in chunks:
            await ws.send(json.dumps({"text": chunk}))
            audio = json.loads(await ws.recv())["audio_base64"]
            received.append(audio)
        await ws.send(json.dumps({"done": True}))
        assert json.loads(await ws.recv()) == {"status": "closed"}
        with pytest.raises(websockets.ConnectionClosedOK):
            await ws.recv()
    for audio in received:
        assert decode_wav(base64.b64decode(audio)).size == SAMPLES_1S


async def test_default_mode_reply_shape_and_failed_chunk(proxy):
    async with websockets.connect(proxy.ws) as ws:
        await ws.send(json.dumps({"text": "Shape check.", **FAST}))
        reply = json.loads(await ws.recv())
        assert set(reply) == {"audio_base64", "sample_rate", "processing_time_ms", "text"}
        assert reply["text"] == "Shape check." and reply["sample_rate"] == 24000
        await ws.send(json.dumps({"text": "Too many speakers.", "speaker_id": 4000, **FAST}))
        reply = json.loads(await ws.recv())
        assert reply["text"] == "Too many speakers." and "speaker_id" in reply["error"]
        await ws.send(json.dumps({"text": ""}))
        assert json.loads(await ws.recv()) == {"error": "No text provided"}
        await ws.send(json.dumps({"text": "Still open.", **FAST}))  # the socket stayed open
        assert "audio_base64" in json.loads(await ws.recv())


# -- WebSocket: low-latency streaming mode -------------------------------------------------------------------------
async def test_stream_mode_json_ordering_and_completeness(proxy, triton_server):
    texts = ["One streamed chunk.", "Another streamed chunk."]
    messages = []
    async with websockets.connect(proxy.ws) as ws:
        await ws.send(json.dumps({"config": {"mode": "stream", "context": False, "seed": 21, **FAST}}))
        start = time.monotonic()
        for text in texts:  # pipelined: both are sent before any audio arrives
            await ws.send(json.dumps({"text": text}))
        while sum(m.get("type") == "end" for m in messages) < 2:
            message = json.loads(await ws.recv())
            message["t"] = time.monotonic() - start
            messages.append(message)
    config, rest = messages[0], messages[1:]
    assert config["type"] == "config" and config["config"]["mode"] == "stream" and config["sample_rate"] == 24000
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    assert {m["type"] for m in rest} == {"audio", "end"}
    began = 0.0  # the second text starts when the first ends
    for chunk_id, text in enumerate(texts):
        audio_messages = [m for m in rest if m["chunk_id"] == chunk_id and m["type"] == "audio"]
        (end,) = [m for m in rest if m["chunk_id"] == chunk_id and m["type"] == "end"]
        assert [m["index"] for m in audio_messages] == list(range(len(audio_messages))) and len(audio_messages) > 1
        pcm = [np.frombuffer(base64.b64decode(m["audio_base64"]), "<i2") for m in audio_messages]
        assert [p.size for p in pcm] == [m["samples"] for m in audio_messages]
        assert all(m["format"] == "s16le" and m["sample_rate"] == 24000 for m in audio_messages)
        assert end["final"] is True and end["text"] == text and end["samples"] == SAMPLES_1S == sum(p.size for p in pcm)
        assert end["audio_messages"] == len(audio_messages) and end["duration_ms"] == 960.0
        assert max(m["seq"] for m in audio_messages) < end["seq"]
        # Streamed: the first audio arrived in the first half of the chunk's time; the proxy added ~nothing to it.
        assert audio_messages[0]["t"] - began < 0.5 * (end["t"] - began)
        began = end["t"]
        assert end["first_audio_proxy_ms"] < 100.0 and end["first_audio_ms"] < end["processing_time_ms"]
        if chunk_id == 0:  # the same audio as Triton streams (the second chunk would cost another generation)
            direct = await stream(triton_server.grpc_url, MODEL, text, {"seed": 21, **FAST, **UNMARKED})
            assert np.array_equal(np.concatenate(pcm), to_pcm16(direct.audio))
    # The first audio of a chunk leaves the proxy within milliseconds of arriving from Triton (typically < 1 ms; the
    # best of the two chunks, so that one unlucky descheduling of this busy 2-CPU machine does not decide).
    assert min(m["first_audio_proxy_ms"] for m in rest if m["type"] == "end") < 10.0
    # Chunks in order: everything of chunk 0 before anything of chunk 1.
    assert max(m["seq"] for m in rest if m["chunk_id"] == 0) < min(m["seq"] for m in rest if m["chunk_id"] == 1)


async def test_stream_mode_binary_f32le_via_query(proxy, triton_server):
    frames, end = [], None
    async with websockets.connect(proxy.ws + "?mode=stream&binary=true&format=f32le") as ws:
        await ws.send(json.dumps({"text": "Binary frames.", "seed": 8, **FAST}))
        while end is None:
            message = await ws.recv()
            if isinstance(message, bytes):
                seq, chunk_id, index, samples = HEADER.unpack_from(message)
                payload = np.frombuffer(message[HEADER.size :], "<f4")
                assert payload.size == samples and chunk_id == 0 and index == len(frames)
                frames.append((seq, payload))
            else:
                end = json.loads(message)
    assert [seq for seq, _ in frames] == list(range(len(frames))) and end["seq"] == len(frames)
    assert end["type"] == "end" and end["samples"] == SAMPLES_1S
    direct = await stream(triton_server.grpc_url, MODEL, "Binary frames.", {"seed": 8, **FAST, **UNMARKED})
    assert np.array_equal(np.concatenate([p for _, p in frames]), direct.audio)  # f32le: bit-exact


async def read_binary_chunk(ws) -> tuple[np.ndarray, dict]:
    parts = []
    while True:
        message = await ws.recv()
        if isinstance(message, bytes):
            parts.append(np.frombuffer(message[HEADER.size :], "<f4"))
            continue
        reply = json.loads(message)
        if reply.get("type") == "end":
            return np.concatenate(parts), reply
        assert reply.get("type") == "config", reply


async def test_voice_continuity_passes_earlier_chunks_as_context(proxy, triton_server):
    first, second = "The first sentence of a turn.", "The second sentence."
    async with websockets.connect(proxy.ws + "?mode=stream&binary=true&format=f32le") as ws:
        await ws.send(json.dumps({"text": first, "seed": 1, "speaker_id": 2, **FAST}))
        audio1, _ = await read_binary_chunk(ws)
        await ws.send(json.dumps({"text": second, "seed": 2, "speaker_id": 2, **FAST}))
        audio2, _ = await read_binary_chunk(ws)
    url = triton_server.grpc_url
    params = {"seed": 2, "speaker_id": 2, **FAST, **UNMARKED}
    with_context = await stream(url, MODEL, second, params, context=[(2, first, audio1)])
    without = await stream(url, MODEL, second, params)
    assert np.array_equal(audio2, with_context.audio)  # exactly the first chunk's text and audio as context
    assert not np.array_equal(audio2, without.audio)


# -- flow control, floods, cancellation ----------------------------------------------------------------------------
async def test_flood_is_refused_and_cancel_stops_everything(proxy, http, triton_server):
    before = len(cancellations(triton_server))
    async with websockets.connect(proxy.ws + "?mode=stream") as ws:
        for i in range(10):
            await ws.send(json.dumps({"text": f"Flood {i}.", "max_audio_length_ms": 8000}))
        # ws_max_pending=2: one generating and one queued; the other 8 are refused at once, each with a clear error.
        refused, audio = [], 0
        while len(refused) < 8 or not audio:
            message = json.loads(await ws.recv())
            if message["type"] == "audio":
                audio += 1
            else:
                refused.append(message)
        assert all(r["type"] == "error" and "Too many pending text chunks" in r["error"] for r in refused)
        assert [r["text"] for r in refused] == [f"Flood {i}." for i in range(2, 10)]
        # Everyone else is still served meanwhile.
        response = await http.get("/")
        assert response.status == 200
        await ws.send(json.dumps({"cancel": True}))
        while (message := json.loads(await ws.recv()))["type"] == "audio":
            pass
        assert message["type"] == "cancelled" and message["dropped"] == 2
        assert_generation_stopped(await wait_for_cancellation(triton_server, before), 8000 // 80)
        await ws.send(json.dumps({"text": "After the flood.", **FAST}))  # the session goes on
        while (message := json.loads(await ws.recv()))["type"] == "audio":
            pass
        assert message["type"] == "end" and message["samples"] == SAMPLES_1S
    await wait_idle(proxy)


async def test_websocket_disconnect_cancels_the_triton_stream(proxy, triton_server):
    before = len(cancellations(triton_server))
    ws = await websockets.connect(proxy.ws + "?mode=stream")
    await ws.send(json.dumps({"text": "A long one that nobody hears.", "max_audio_length_ms": 8000}))
    assert json.loads(await ws.recv())["type"] == "audio"
    ws.transport.abort()  # the client vanishes without a close handshake
    assert_generation_stopped(await wait_for_cancellation(triton_server, before), 8000 // 80 // 2)
    await wait_idle(proxy)


async def test_http_disconnect_cancels_the_triton_stream(proxy, triton_server):
    before = len(cancellations(triton_server))
    async with aiohttp.ClientSession() as session:
        pool = proxy.app[TRITON]
        chunks = pool.chunks_received
        request = asyncio.create_task(
            session.post(proxy.http + "/generate", json={"text": "Never mind.", "max_audio_length_ms": 8000})
        )
        while pool.chunks_received == chunks:  # generating: the first audio chunk reached the proxy
            await asyncio.sleep(0.02)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    assert_generation_stopped(await wait_for_cancellation(triton_server, before), 8000 // 80 // 2)
    await wait_idle(proxy)


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One client frame (FIN set, masked), as a browser sends it: opcode 1 text, 8 close."""
    mask = os.urandom(4)
    length = len(payload)
    first = 0x80 | opcode
    header = bytes([first, 0x80 | length]) if length < 126 else bytes([first, 0x80 | 126]) + struct.pack(">H", length)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def masked_text_frame(payload: bytes) -> bytes:
    return masked_frame(0x1, payload)


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked, unfragmented frame the proxy sent (the last one may be cut short)."""
    frames, i = [], 0
    while i + 2 <= len(data):
        opcode, length = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if length == 126:
            length, i = struct.unpack(">H", data[i : i + 2])[0], i + 2
        elif length == 127:
            length, i = struct.unpack(">Q", data[i : i + 8])[0], i + 8
        frames.append((opcode, data[i : i + length]))
        i += length
    return frames


async def raw_websocket(port: int, query: str, rcvbuf: int | None = None) -> socket.socket:
    """A WebSocket client on a bare socket (its frames are written as given, several in one write if asked)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(
        sock,
        (
            f"GET /stream?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode(),
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(sock, 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_cancel_done_and_close_at_once_get_the_cancelled_reply(proxy, triton_server):
    """The demo's Stop: cancel, done and the close frame in ONE write while a chunk is generated. The proxy reads the
    three back to back, and aiohttp answers a close frame at once (nothing can be sent after it), so the cancelled
    reply must leave while the cancel is read, not once the cancelled generation has unwound. Triton stops."""
    loop = asyncio.get_running_loop()
    sock = await raw_websocket(proxy.runner.addresses[0][1], "mode=stream&binary=true&format=f32le")
    try:
        before = len(cancellations(triton_server))
        request = {"text": "A long answer that will be interrupted.", "max_audio_length_ms": 8000}
        await loop.sock_sendall(sock, masked_text_frame(json.dumps(request).encode()))
        received = b""
        while sum(opcode == 0x2 for opcode, _ in server_frames(received)) < 2:  # generating: audio is coming
            received += await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 30)
        stop = [masked_text_frame(b'{"cancel": true}'), masked_text_frame(b'{"done": true}')]
        await loop.sock_sendall(sock, b"".join(stop) + masked_frame(0x8, struct.pack(">H", 1000)))
        try:
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 10):
                received += chunk
        except ConnectionResetError:
            pass
    finally:
        sock.close()
    frames = server_frames(received)
    texts = [(n, json.loads(payload)) for n, (opcode, payload) in enumerate(frames) if opcode == 0x1]
    assert texts and texts[0][1]["type"] == "cancelled" and texts[0][1]["dropped"] == 1, texts
    after = [opcode for opcode, _ in frames[texts[0][0] + 1 :]]
    assert 0x2 not in after, after  # the cancelled chunk sends no more audio
    assert frames[-1][0] == 0x8  # the proxy's close frame ends the session
    assert_generation_stopped(await wait_for_cancellation(triton_server, before), 8000 // 80)
    await wait_idle(proxy)


async def test_slow_reader_is_bounded_then_disconnected(triton_server, caplog):
    """A client that reads nothing: the proxy's sends wait (it stops reading that Triton stream, so nothing piles up
    in the proxy), and after ws_send_timeout_s it drops the client and cancels the stream.

    Streams from csm_1b: the watermark stage drops a stream that sends nothing for its idle timeout (3 s in the
    session server), which a stalled stream would hit first; the proxy's flow control is the same for any model."""
    slow_proxy = await start_proxy(
        triton_server.grpc_url,
        ws_send_timeout_s=1.5,
        ws_write_buffer_bytes=16 << 10,
        ws_socket_sndbuf=8 << 10,
        triton_model="csm_1b",
    )
    loop = asyncio.get_running_loop()
    # A raw WebSocket client with a small receive window that never reads after the handshake.
    sock = await raw_websocket(slow_proxy.runner.addresses[0][1], "mode=stream&binary=true&format=f32le", 4096)
    try:
        before = len(cancellations(triton_server))
        request = {"text": "Nobody reads this.", "max_audio_length_ms": 10_000}
        await loop.sock_sendall(sock, masked_text_frame(json.dumps(request).encode()))
        # The proxy's send waits on the client (it reads no more of the Triton stream meanwhile), then it gives up.
        deadline = time.monotonic() + 40
        while not any("accepts no data" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, (
                "the proxy did not give up on a client that reads nothing",
                [r.getMessage() for r in caplog.records][-10:],
                triton_server.log_tail(15),
            )
            await asyncio.sleep(0.1)
        assert_generation_stopped(await wait_for_cancellation(triton_server, before), 10_000 // 80)
        received = 0
        try:
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 10):
                received += len(chunk)
        except ConnectionResetError:  # the proxy aborted the connection
            pass
        assert received < 200_000  # what the bounded buffers held, whatever Triton generated
        await wait_idle(slow_proxy)
    finally:
        sock.close()
        await slow_proxy.runner.cleanup()


async def test_twenty_concurrent_websocket_clients(proxy):
    async def client(i: int) -> bytes:
        async with websockets.connect(proxy.ws) as ws:
            await ws.send(json.dumps({"text": "Twenty voices at once.", "seed": i % 2, "watermark": False, **FAST}))
            reply = json.loads(await ws.recv())
            await ws.send(json.dumps({"done": True}))
            assert json.loads(await ws.recv()) == {"status": "closed"}
            return base64.b64decode(reply["audio_base64"])

    start = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(20))), 120)
    elapsed = time.monotonic() - start
    for i, wav in enumerate(results):
        audio, same_seed = decode_wav(wav).astype(np.int32), decode_wav(results[i % 2]).astype(np.int32)
        assert audio.size == SAMPLES_1S
        # Same seed, same codes, same audio: no stream got another's chunks. The codec decodes the streams of a round
        # in one batch, whose float rounding (~3e-7) may flip an int16 sample by one step; another stream's audio
        # would differ everywhere.
        assert np.abs(audio - same_seed).max() <= 1
    assert results[0] != results[1]
    print(f"20 concurrent clients: {elapsed:.1f} s")
    await wait_idle(proxy)


# -- `python -m proxy` ---------------------------------------------------------------------------------------------
async def test_python_m_proxy_serves_and_shuts_down_cleanly(triton_server, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "PROXY_PORT": str(port),
        "TRITON_GRPC_URLS": triton_server.grpc_url,
        "TRITON_MODEL": MODEL,
        "PROXY_LOG_LEVEL": "INFO",
    }
    log_path = tmp_path / "proxy.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_until_healthy(base, ready=MODEL == "tts")
        async with websockets.connect(f"ws://127.0.0.1:{port}/stream?max_audio_length_ms=1000") as ws:
            for chunk in ["Served by python -m proxy."]:
                await ws.send(json.dumps({"text": chunk}))
                audio = json.loads(await ws.recv())["audio_base64"]
            assert decode_wav(base64.b64decode(audio)).size == SAMPLES_1S
            process.send_signal(signal.SIGINT)  # open sockets are closed with 1001 GOING_AWAY
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 10)
            assert info.value.rcvd.code == 1001
        assert await asyncio.to_thread(process.wait, 15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        output = log_path.read_text(errors="replace")
    assert "listening on" in output and "Traceback" not in output


async def test_streams_spread_over_healthy_replicas(triton_server):
    """TRITON_GRPC_URLS with two names for the live server and one dead port: every stream succeeds, the live
    replicas share them, the dead one gets none, and /health reports each."""
    port = triton_server.grpc_url.rsplit(":", 1)[1]
    dead = f"127.0.0.1:{free_port()}"
    urls = (triton_server.grpc_url, f"localhost:{port}", dead)
    spread = await start_live_proxy(
        triton_server.grpc_url, triton_grpc_urls=urls, triton_model=MODEL, health_timeout_s=0.3
    )
    try:
        async with aiohttp.ClientSession(spread.http) as session:

            async def generate(i):
                async with session.post("/generate", json={"text": f"Replica {i}.", "watermark": False, **FAST}) as r:
                    return r.status if r.status == 200 else (r.status, await r.text())

            assert await asyncio.gather(*(generate(i) for i in range(4))) == [200] * 4
            async with session.get("/health") as response:
                body = await response.json()
        assert response.status == 200 and body["triton"]["serving_replicas"] == 2
        replicas = {r["url"]: r for r in body["triton"]["replicas"]}
        assert replicas[dead]["live"] is False and replicas[dead]["error"] and replicas[dead]["streams_started"] == 0
        assert replicas[urls[0]]["streams_started"] == replicas[urls[1]]["streams_started"] == 2
    finally:
        await spread.runner.cleanup()
