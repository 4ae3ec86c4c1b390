"""Every refusal is answered before any expensive step: a counting stub on the reference decoder, on the
conversation's context building and on Triton streams stays at 0 for a request refused by keys (401), rate (429),
policy (403), drain (503) or a full server (503), on every endpoint that generates: /generate, /generate/wav,
/generate/audio, /v1/audio/speech, /stream/chunks and the WebSocket upgrade of /stream."""

from __future__ import annotations

import base64
import io
import json

import aiohttp
import numpy as np
import pytest
import soundfile

import proxy.voice_context
from csm_tts.tooling.local_triton import free_port
from proxy.app import create_app
from proxy.appkeys import API_KEYS, DRAIN, TRITON, WEBSOCKETS
from proxy.auth import generate_key, hash_key
from proxy.conversation import Conversation
from proxy.settings import Settings
from proxy.upstream.errors import UpstreamUnavailable
from proxy.upstream.pool import TritonPool


def _wav_base64() -> str:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(4800, np.float32), 24000, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


REFERENCE = {"reference_audio": _wav_base64(), "reference_text": "A clip."}
# endpoint -> (path, body); body None: the WebSocket upgrade
ENDPOINTS = {
    "generate": ("/generate", {"text": "Hi.", **REFERENCE}),
    "generate_wav": ("/generate/wav", {"text": "Hi.", **REFERENCE}),
    "generate_audio": ("/generate/audio", {"text": "Hi.", "response_format": "mp3", **REFERENCE}),
    "speech": ("/v1/audio/speech", {"model": "csm-1b", "input": "Hi.", "voice": "alloy", **REFERENCE}),
    "chunks": ("/stream/chunks", ["Hi.", "There."]),
    "websocket": ("/stream", None),
}
# The watermark choice the policy forbids, as each endpoint spells it.
FORBIDDEN = {"body": {"watermark": False}, "query": {"watermark": "false"}}


class Counts:
    def __init__(self, monkeypatch):
        self.decoded = self.contexts = self.streams = 0
        decode, context_for, stream = proxy.voice_context.decode_reference, Conversation.context_for, TritonPool.stream

        def counting_decode(*args):
            self.decoded += 1
            return decode(*args)

        def counting_context(conversation, *args):
            self.contexts += 1
            return context_for(conversation, *args)

        def counting_stream(pool, *args):
            self.streams += 1
            return stream(pool, *args)

        monkeypatch.setattr(proxy.voice_context, "decode_reference", counting_decode)
        monkeypatch.setattr(Conversation, "context_for", counting_context)
        monkeypatch.setattr(TritonPool, "stream", counting_stream)

    def total(self) -> int:
        return self.decoded + self.contexts + self.streams


@pytest.fixture
async def guarded(aiohttp_client, tmp_path, monkeypatch):
    """A proxy with keys (one stream per key), a policy that forbids turning the watermark off, Triton unreachable."""
    key = generate_key()
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": "tester", "sha256": hash_key(key), "max_streams": 1}]}))
    settings = Settings(
        triton_grpc_urls=(f"127.0.0.1:{free_port()}",),
        api_keys_file=str(path),
        health_timeout_s=0.2,
        watermark_allow_disable=False,
        max_websockets=4,
    )
    client = await aiohttp_client(create_app(settings))
    return client, key, Counts(monkeypatch)


async def call(client, endpoint: str, key: str | None, forbidden: bool = False) -> int:
    """The status the endpoint answers (for the WebSocket: the upgrade's; 101 when it was upgraded)."""
    path, body = ENDPOINTS[endpoint]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is None or endpoint == "chunks":
        params = FORBIDDEN["query"] if forbidden else {}
    else:
        params = {}
        body = {**body, **(FORBIDDEN["body"] if forbidden else {})}
    if body is None:
        try:
            ws = await client.ws_connect(path, params=params, headers=headers)
        except aiohttp.WSServerHandshakeError as e:
            return e.status
        await ws.close()
        return 101
    async with client.post(path, json=body, params=params, headers=headers) as response:
        await response.read()
        return response.status


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
async def test_every_refusal_comes_before_any_expensive_step(guarded, endpoint):
    client, key, counts = guarded
    app = client.server.app
    api_key = app[API_KEYS].authenticate(key)

    assert await call(client, endpoint, None) == 401  # no key
    assert await call(client, endpoint, "sk-wrong") == 401  # unknown key
    assert await call(client, endpoint, key, forbidden=True) == 403  # the watermark policy
    api_key.take_stream()  # the key's one stream is in use elsewhere
    assert await call(client, endpoint, key) == 429
    api_key.release_stream()
    if endpoint == "websocket":  # a full server: the WebSocket limit
        sockets = app[WEBSOCKETS]
        held = [object.__new__(aiohttp.web.WebSocketResponse) for _ in range(4)]
        for ws in held:
            sockets.add(ws)
        assert await call(client, endpoint, key) == 503
        for ws in held:
            sockets.discard(ws)
    else:  # a full server: the proxy's stream limit
        pool = app[TRITON]
        pool.active_streams = pool.max_streams
        assert await call(client, endpoint, key) == 503
        pool.active_streams = 0
    app[DRAIN].begin()
    assert await call(client, endpoint, key) == 503
    assert counts.total() == 0, vars(counts)
    assert api_key.open_streams == 0  # nothing refused kept a stream slot

    # The control: admitted, the same request reaches the expensive steps. Triton is unreachable; the replica is
    # taken as healthy so that streams open (and fail) instead of stopping at "no replica".
    app[DRAIN].started_at = None

    async def pick(pool, exclude=()):
        if exclude:
            raise UpstreamUnavailable("no other replica")
        return pool.replicas[0]

    app[TRITON].pick = pick.__get__(app[TRITON])
    if endpoint == "websocket":
        ws = await client.ws_connect("/stream", headers={"Authorization": f"Bearer {key}"})
        await ws.send_json({"text": "Hi."})
        assert "unavailable" in (await ws.receive_json())["error"]
        await ws.close()
    else:
        await call(client, endpoint, key)
    streaming = endpoint in ("chunks", "websocket")  # they send no reference clip; they build a context
    assert counts.streams >= 1 and counts.decoded == (0 if streaming else 1)
    if streaming:
        assert counts.contexts >= 1
    assert api_key.open_streams == 0  # released when the request ended
