"""The proxy's pure parts (settings, validation, audio encoding, context budget, error mapping) and its HTTP error
handling, with Triton unreachable (a closed port): no server is needed."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import soundfile
from aiohttp import WSMsgType
from conftest import FAST_FAIL_S

from csm_tts.limits import CONTEXT_TOO_LONG
from csm_tts.tooling.local_triton import free_port
from proxy.app import create_app
from proxy.conversation import ContextBudget, Conversation
from proxy.errors import ApiError, ValidationError
from proxy.parse.job import GenerateOptions
from proxy.parse.native import parse_chunk_options, parse_generate, parse_text_list
from proxy.parse.websocket import Message, StreamConfig, parse_stream_config
from proxy.render.pcm import pcm_bytes, to_pcm16, wav_bytes
from proxy.settings import Settings, SettingsError
from proxy.upstream.errors import UpstreamError, UpstreamRejected, UpstreamUnavailable, classify


# -- settings ------------------------------------------------------------------------------------------------------
def test_settings_defaults():
    """An empty environment changes nothing; every setting has its variable, and every variable is documented."""
    assert Settings.from_env({}) == Settings()
    assert Settings().watermark_default is True  # unset CSM_WATERMARK_ENABLED: Triton's default, which is on
    from proxy.settings import _VARIABLES

    derived = {"watermark_enabled", "watermark_key_source"}  # from CSM_WATERMARK_ENABLED / _KEY / _KEY_SOURCE
    assert {f.name for f in dataclasses.fields(Settings)} == {field for _, field, _ in _VARIABLES} | derived
    documented = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    assert [name for name, _, _ in _VARIABLES if f"`{name}`" not in documented] == []


def test_settings_from_env():
    s = Settings.from_env(
        {
            "PROXY_HOST": "0.0.0.0",
            "PROXY_PORT": "9000",
            "TRITON_GRPC_URLS": "a:8001, grpc://b:9001,",
            "TRITON_MODEL": "csm_1b",
            "PROXY_MAX_BODY_BYTES": "2048",
            "PROXY_CORS_ORIGINS": "http://x.test,http://y.test",
            "CSM_WATERMARK_ENABLED": "false",
            "CSM_WATERMARK_KEY": "1,2,3,4,5",
            "PROXY_WS_SEND_TIMEOUT_S": "2.5",
        }
    )
    assert s.host == "0.0.0.0" and s.port == 9000 and s.triton_grpc_urls == ("a:8001", "b:9001")
    assert s.triton_model == "csm_1b" and s.max_body_bytes == 2048
    assert s.cors_origins == ("http://x.test", "http://y.test")
    assert s.watermark_enabled is False and s.watermark_default is False and s.watermark_key_source == "private"
    assert s.ws_send_timeout_s == 2.5
    # The public key spelled out is still the public key.
    assert Settings.from_env({"CSM_WATERMARK_KEY": "212,211,146,56,201"}).watermark_key_source == "public"


@pytest.mark.parametrize(
    "env, names",
    [
        ({"PROXY_PORT": "80000"}, "PROXY_PORT"),
        ({"PROXY_PORT": "abc"}, "PROXY_PORT"),
        ({"TRITON_GRPC_URLS": "no-port"}, "TRITON_GRPC_URLS"),
        ({"TRITON_GRPC_URLS": " , "}, "TRITON_GRPC_URLS"),
        ({"PROXY_MAX_BODY_BYTES": "-1"}, "PROXY_MAX_BODY_BYTES"),
        ({"PROXY_CONTEXT_ENABLED": "maybe"}, "PROXY_CONTEXT_ENABLED"),
        ({"CSM_WATERMARK_KEY": "1,2,3"}, "watermark"),
        ({"CSM_WATERMARK_ENABLED": "perhaps"}, "CSM_WATERMARK_ENABLED"),
    ],
)
def test_settings_errors_name_the_variable(env, names):
    with pytest.raises(SettingsError, match=names):
        Settings.from_env(env)


# -- request validation --------------------------------------------------------------------------------------------
def test_generate_defaults_and_parameters():
    options = parse_generate({"text": "Hi."})
    assert options == GenerateOptions(text="Hi.", speaker_id=0, max_audio_length_ms=None, temperature=0.9, topk=50)
    # No max_audio_length_ms: the model's default applies, which follows the text (csm_tts/speech/length_rule.py).
    assert options.triton_parameters() == {"speaker_id": 0, "temperature": 0.9, "topk": 50}
    full = parse_generate(
        {
            "text": "Hi.",
            "speaker_id": 2,
            "max_audio_length_ms": 1000.0,
            "temperature": 1,
            "topk": 100,
            "watermark": False,
            "watermark_key": [1, 2, 3, 4, 255],
            "seed": 7,
        }
    )
    assert full.triton_parameters(watermark_default=True) == {
        "speaker_id": 2,
        "temperature": 1.0,
        "topk": 100,
        "max_audio_length_ms": 1000,
        "seed": 7,
        "watermark": False,
        "watermark_key": "1,2,3,4,255",
    }
    # No watermark option: the proxy's configured default is sent, or nothing (Triton's default) when unset.
    assert parse_generate({"text": "Hi."}).triton_parameters(watermark_default=False)["watermark"] is False
    assert parse_generate({"text": "Hi.", "watermark_key": "9,8,7,6,5"}).watermark_key == (9, 8, 7, 6, 5)


BAD_BODIES = [
    ({}, "text: is required"),
    ({"text": ""}, "text: must not be empty"),
    ({"text": "   "}, "text: must not be empty"),
    ({"text": 5}, "text: must be a string"),
    ({"text": "x" * 5001}, "5001 characters"),
    ({"text": "Hi", "speaker_id": -1}, "speaker_id"),
    ({"text": "Hi", "speaker_id": True}, "speaker_id: must be an integer"),
    ({"text": "Hi", "speaker_id": "1"}, "speaker_id: must be an integer"),
    ({"text": "Hi", "max_audio_length_ms": 999}, "max_audio_length_ms: must be between 1000 and 90000"),
    ({"text": "Hi", "max_audio_length_ms": 90001}, "max_audio_length_ms"),
    ({"text": "Hi", "max_audio_length_ms": 1500.5}, "max_audio_length_ms: must be an integer"),
    ({"text": "Hi", "temperature": 0.05}, "temperature: must be between 0.1 and 2.0"),
    ({"text": "Hi", "temperature": 2.5}, "temperature"),
    ({"text": "Hi", "temperature": float("nan")}, "temperature"),
    ({"text": "Hi", "temperature": "hot"}, "temperature: must be a number"),
    ({"text": "Hi", "topk": 0}, "topk"),
    ({"text": "Hi", "topk": 101}, "topk"),
    ({"text": "Hi", "watermark": "yes"}, "watermark: must be true, false or null"),
    ({"text": "Hi", "watermark_key": [1, 2, 3]}, "watermark_key: must be exactly 5"),
    ({"text": "Hi", "watermark_key": [1, 2, 3, 4, 256]}, "watermark_key"),
    ({"text": "Hi", "watermark_key": [1, 2, 3, 4, True]}, "watermark_key"),
    ({"text": "Hi", "watermark_key": "a,b,c,d,e"}, "watermark_key"),
    ({"text": "Hi", "seed": -1}, "seed"),
    ({"text": "Hi", "speaker": 1}, "unknown field(s): speaker"),
    # Every number is range-checked against what the model accepts (nothing out of range reaches gRPC's int64).
    ({"text": "Hi", "speaker_id": 32}, "speaker_id: must be between 0 and 31, got 32"),
    ({"text": "Hi", "speaker_id": 2**63}, "speaker_id: must be between 0 and 31, got 9223372036854775808"),
    ({"text": "Hi", "seed": 2**63}, "seed: must be between 0 and 9223372036854775807"),
    ({"text": "Hi", "temperature": 10**400}, "temperature: must be between 0.1 and 2.0, got 1000000000"),
    ({"text": "Hi", "topk": -(10**400)}, "topk: must be between 1 and 100, got -100000"),
    ({"text": "lone \ud800 surrogate"}, "text: cannot be encoded as UTF-8 (character 5 is a lone surrogate)"),
]


@pytest.mark.parametrize("body, message", BAD_BODIES, ids=[m for _, m in BAD_BODIES])
def test_generate_rejects(body, message):
    with pytest.raises(ValidationError) as info:
        parse_generate(body)
    assert info.value.status == 422 and message in info.value.message


def test_every_bad_field_is_reported():
    with pytest.raises(ValidationError) as info:
        parse_generate({"text": "", "topk": 0, "extra": 1})
    assert {e["field"] for e in info.value.errors} == {None, "text", "topk"}


def test_non_object_bodies_are_400():
    for body in ([], "text", 3, None):
        with pytest.raises(ApiError) as info:
            parse_generate(body)
        assert info.value.status == 400 and "JSON object" in info.value.message


def test_chunk_list_and_query():
    assert parse_text_list(["a", ""], 10) == ["a", ""]
    for body, status in (({"text": "a"}, 400), ([], 422), (["a", 1], 422), (["a"] * 11, 422)):
        with pytest.raises(ApiError) as info:
            parse_text_list(body, 10)
        assert info.value.status == status
    assert parse_chunk_options({"speaker_id": "3", "watermark": "false", "max_audio_length_ms": "1000"}) == {
        "speaker_id": 3,
        "watermark": False,
        "max_audio_length_ms": 1000,
    }
    for query in ({"speaker_id": "x"}, {"watermark": "maybe"}, {"voice": "1"}):
        with pytest.raises(ValidationError):
            parse_chunk_options(query)


def test_stream_config():
    config = parse_stream_config({"mode": "stream", "binary": True, "format": "f32le", "speaker_id": 3}, StreamConfig())
    assert (config.mode, config.binary, config.sample_format, config.context) == ("stream", True, "f32le", True)
    assert config.options == {"speaker_id": 3}
    assert parse_stream_config({"context": False}, config).options == {"speaker_id": 3}
    for bad in ({"mode": "fast"}, {"format": "ogg"}, {"binary": "yes"}, {"topk": 0}, {"colour": 1}, []):
        with pytest.raises(ValidationError):
            parse_stream_config(bad, StreamConfig())


# -- audio ---------------------------------------------------------------------------------------------------------
def test_wav_is_pcm16_at_24khz_and_clips():
    audio = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0], dtype=np.float32)
    data, rate = soundfile.read(io.BytesIO(wav_bytes(audio)), dtype="int16")
    info = soundfile.info(io.BytesIO(wav_bytes(audio)))
    assert rate == 24000 and info.subtype == "PCM_16" and info.channels == 1
    assert data.tolist() == [0, 16384, -16384, 32767, -32767, 32767, -32767]  # clipped, not wrapped


def test_pcm_formats():
    audio = np.array([0.25, -2.0], dtype=np.float32)
    assert np.frombuffer(pcm_bytes(audio, "s16le"), "<i2").tolist() == to_pcm16(audio).tolist() == [8192, -32767]
    assert np.frombuffer(pcm_bytes(audio, "f32le"), "<f4").tolist() == [0.25, -2.0]  # f32le keeps the raw samples
    with pytest.raises(ValueError):
        pcm_bytes(audio, "mp3")


# -- voice-continuity context --------------------------------------------------------------------------------------
def _audio(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * 24000), dtype=np.float32)


def test_context_keeps_the_newest_segments_that_fit():
    budget = ContextBudget(positions=2048, tokens_per_byte=0.5, max_audio_s=100, max_segments=8)
    conversation = Conversation(budget)
    for i in range(5):
        conversation.add(0, f"segment {i}", _audio(20))  # 250 frames + text each
    conversation.add(0, "empty audio is not context", _audio(0))
    assert len(conversation.segments) == 5
    # 1000 ms requested leaves room for 7 segments' worth: all 5 fit.
    assert [s.text for s in conversation.context_for("next", 1000)] == [f"segment {i}" for i in range(5)]
    # 90 s requested (1125 frames) leaves ~900 positions: only the newest three fit, oldest dropped first.
    chosen = conversation.context_for("next", 90_000)
    assert [s.text for s in chosen] == ["segment 2", "segment 3", "segment 4"]
    used = sum(budget.segment_cost(s) for s in chosen) + budget.request_cost("next", 90_000)
    assert used <= 2048


def test_context_limits_audio_seconds_and_segment_count():
    conversation = Conversation(ContextBudget(max_audio_s=30, max_segments=3))
    for i in range(6):
        conversation.add(1, f"s{i}", _audio(12))
    assert len(conversation.segments) == 3  # never keeps more than it could use
    assert [s.text for s in conversation.context_for("x", 1000)] == ["s4", "s5"]  # 24 s <= 30 s < 36 s


def test_text_cost_is_generous_for_multibyte_text():
    budget = ContextBudget(tokens_per_byte=0.5)
    assert budget.text_cost("ü" * 100) >= 100  # 200 UTF-8 bytes


# -- Triton error mapping ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "message, kind, status",
    [
        ("INVALID_ARG: speaker_id must be an integer from 0 to 31, got 40", UpstreamRejected, 422),
        ("in ensemble 'tts', INVALID_ARG: topk must be ...", UpstreamRejected, 422),
        ("UNAVAILABLE: server is full (8 active streams, 32 queued); retry later", UpstreamUnavailable, 503),
        ("INTERNAL: request failed: boom", UpstreamError, 502),
        ("CANCELLED: the model is shutting down", UpstreamUnavailable, 503),
        # The code decides, never words in the message (TritonStream re-checks the replica for uncoded errors).
        ("INTERNAL: checkpoint shard not found", UpstreamError, 502),
        ("INVALID_ARG: speaker 40 is unavailable", UpstreamRejected, 422),
        ("Request for unknown model: 'tts' is not found", UpstreamError, 502),
    ],
)
def test_classify(message, kind, status):
    error = classify(message)
    assert type(error) is kind and error.status == status
    if kind is UpstreamRejected:
        assert not error.message.startswith("INVALID_ARG") and "INVALID_ARG" not in error.message


def test_a_too_long_prompt_is_a_reason_code_not_a_wording():
    """The engine's ContextTooLong carries CONTEXT_TOO_LONG in its message (the only thing gRPC streams carry); the
    proxy reads the code back and the client sees the engine's words without it."""
    from csm_tts.speech.request import ContextTooLong, InvalidRequest
    from csm_tts.triton.errors import coded

    engine_error = ContextTooLong("the prompt takes 3000 positions; the model's context holds 2048")
    assert isinstance(engine_error, InvalidRequest)
    error = classify("in ensemble 'tts', " + coded("INVALID_ARG", str(engine_error)))
    assert type(error) is UpstreamRejected and error.reason == CONTEXT_TOO_LONG
    assert error.message == "the prompt takes 3000 positions; the model's context holds 2048"
    worded = classify(coded("INVALID_ARG", "text says: the model's context holds 2048"))  # words decide nothing
    assert worded.reason is None


# -- the HTTP API with Triton unreachable --------------------------------------------------------------------------
@pytest.fixture
async def down_client(aiohttp_client):
    """The real app, pointed at a port where nothing listens."""
    settings = Settings(
        triton_grpc_urls=(f"127.0.0.1:{free_port()}",),
        max_body_bytes=4096,
        cors_origins=("http://allowed.test",),
        health_timeout_s=0.3,
    )
    return await aiohttp_client(create_app(settings))


async def test_index(down_client):
    response = await down_client.get("/")
    body = await response.json()
    assert response.status == 200 and body["name"] == "csm-tts-proxy" and body["version"] == "0.1.0"
    assert set(body["endpoints"]) == {
        "GET /",
        "GET /demo",
        "GET /health",
        "GET /livez",
        "GET /readyz",
        "GET /metrics",
        "GET /openapi.json",
        "POST /generate",
        "POST /generate/wav",
        "POST /generate/audio",
        "WS /stream",
        "POST /stream/chunks",
        "POST /v1/audio/speech",
        "GET /v1/models",
        "GET /v1/audio/voices",
        "WS /v1/text-to-speech/{voice_id}/stream-input",
        "WS /v1/text-to-speech/{voice_id}/multi-stream-input",
    }


async def test_triton_down_is_503_fast(down_client):
    for path, body in (("/generate", {"text": "Hi"}), ("/generate/wav", {"text": "Hi"}), ("/stream/chunks", ["Hi"])):
        start = time.monotonic()
        response = await down_client.post(path, json=body)
        assert time.monotonic() - start < FAST_FAIL_S
        assert response.status == 503 and response.headers["Retry-After"] == "1"
        assert "Triton is unavailable" in (await response.json())["error"]
    start = time.monotonic()
    response = await down_client.get("/health")
    body = await response.json()
    assert time.monotonic() - start < FAST_FAIL_S and response.status == 503
    assert body["status"] == "unavailable" and body["proxy"]["status"] == "ok"
    assert body["triton"]["live"] is False and body["triton"]["replicas"][0]["error"]
    assert body["watermark"] == {"enabled": True, "key_source": "public", "weights_present": False}


@pytest.mark.parametrize(
    "kwargs, status, message",
    [
        ({"data": b"{not json"}, 400, "Invalid JSON"),
        ({"data": b""}, 400, "empty"),
        ({"data": b"[" * 100_000 + b"]" * 100_000}, 413, "too large"),
        ({"json": ["a list"]}, 400, "JSON object"),
        ({"json": {"text": "Hi", "temperature": 9}}, 422, "temperature"),
        ({"json": {"txt": "Hi"}}, 422, "unknown field(s): txt"),
        ({"data": b"x" * 5000}, 413, "too large"),
    ],
)
async def test_bad_requests_get_json_errors(down_client, kwargs, status, message):
    if "data" in kwargs:  # raw bodies are sent as JSON (any other Content-Type is 415)
        kwargs = {**kwargs, "headers": {"Content-Type": "application/json"}}
    response = await down_client.post("/generate", **kwargs)
    assert response.status == status
    assert message in (await response.json())["error"]


async def test_deeply_nested_json_is_400(aiohttp_client):
    client = await aiohttp_client(create_app(Settings(triton_grpc_urls=(f"127.0.0.1:{free_port()}",))))
    response = await client.post(
        "/generate", data=b"[" * 200_000 + b"]" * 200_000, headers={"Content-Type": "application/json"}
    )
    assert response.status == 400 and "Invalid JSON" in (await response.json())["error"]


async def test_unknown_paths_and_methods_are_json(down_client):
    response = await down_client.get("/nope")
    assert response.status == 404 and "GET / lists" in (await response.json())["error"]
    response = await down_client.get("/generate")
    assert response.status == 405 and "POST" in (await response.json())["error"]
    response = await down_client.get("/stream")  # not an upgrade
    assert response.status == 400 and "WebSocket" in (await response.json())["error"]
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:  # a bad query refuses the upgrade itself
        await down_client.ws_connect("/stream?mode=fast")
    assert info.value.status == 422


async def test_cors(down_client):
    preflight = await down_client.options(
        "/generate",
        headers={
            "Origin": "http://allowed.test",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status == 204 and preflight.headers["Access-Control-Allow-Origin"] == "http://allowed.test"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    refused = await down_client.options(
        "/generate", headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "POST"}
    )
    assert refused.status == 403 and "Access-Control-Allow-Origin" not in refused.headers
    response = await down_client.get("/", headers={"Origin": "http://allowed.test"})
    assert response.headers["Access-Control-Allow-Origin"] == "http://allowed.test"
    response = await down_client.get("/", headers={"Origin": "http://evil.test"})
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_websocket_bad_input_and_triton_down(down_client):
    ws = await down_client.ws_connect("/stream")
    await ws.send_bytes(b"\x00\x01")
    assert (await ws.receive_json())["error"].startswith("Binary frames are not accepted")
    await ws.send_str("{oops")
    assert (await ws.receive_json())["error"].startswith("Invalid JSON")
    await ws.send_str("[1, 2]")
    assert "JSON object" in (await ws.receive_json())["error"]
    await ws.send_json({"text": ""})
    assert await ws.receive_json() == {"error": "No text provided"}
    await ws.send_json({"speaker_id": 1})
    assert await ws.receive_json() == {"error": "No text provided"}
    await ws.send_json({"text": "Hi", "topk": 0})
    reply = await ws.receive_json()
    assert "topk" in reply["error"] and reply["text"] == "Hi"
    await ws.send_json({"text": "Hi", "voice": 1})
    assert "unknown field(s): voice" in (await ws.receive_json())["error"]
    await ws.send_json({"config": {"mode": "fast"}})
    assert "mode" in (await ws.receive_json())["error"]
    start = time.monotonic()
    await ws.send_json({"text": "Hi"})
    reply = await ws.receive_json()
    assert time.monotonic() - start < FAST_FAIL_S
    assert "Triton is unavailable" in reply["error"] and reply["text"] == "Hi"  # the socket stays open
    await ws.send_json({"done": True})
    assert await ws.receive_json() == {"status": "closed"}
    message = await ws.receive()
    assert message.type == WSMsgType.CLOSE and ws.close_code == 1000


# -- context retry: Triton's own prompt-length check has the last word ---------------------------------------------
class FakeTritonForContext:
    """Stands in for the pool: rejects prompts with more than `max_segments` context segments the way csm_1b does."""

    def __init__(self, max_segments: int):
        self.max_segments = max_segments
        self.calls: list[int] = []
        self.closed = 0

    def stream(self, text, parameters, context, request_id=""):
        self.calls.append(len(context))
        pool = self

        class Stream:
            async def __aenter__(self):
                return self

            async def __aexit__(self, *exc):
                pool.closed += 1

            async def __anext__(self):
                if len(context) > pool.max_segments:
                    raise UpstreamRejected(
                        "the prompt takes 3000 positions (text and context) and max_audio_length_ms "
                        "1000 needs 12 more; the model's context holds 2048: shorten the text",
                        CONTEXT_TOO_LONG,
                    )
                from proxy.upstream.stream import AudioChunk

                return AudioChunk(np.ones(1920, np.float32), 0, True, False, None)

        return Stream()


async def test_context_is_shortened_until_triton_accepts_it():
    from proxy.generation import Generation, synthesize

    conversation = Conversation(ContextBudget())
    for i in range(3):
        conversation.add(0, f"s{i}", _audio(1))
    fake = FakeTritonForContext(max_segments=1)
    clip = await synthesize(
        Generation(fake, GenerateOptions(text="next", max_audio_length_ms=1000), None, None, conversation)
    )
    assert clip.audio.size == 1920 and fake.calls == [3, 2, 1] and fake.closed == 3
    never = FakeTritonForContext(max_segments=-1)  # too long even without context: the client's error
    with pytest.raises(UpstreamRejected, match="context holds"):
        await synthesize(
            Generation(never, GenerateOptions(text="next", max_audio_length_ms=1000), None, None, conversation)
        )
    assert never.calls == [3, 2, 1, 0]


async def test_pick_prefers_ready_and_least_loaded_replicas():
    from proxy.upstream.pool import ReplicaHealth, TritonPool

    pool = TritonPool(["a:1", "b:2", "c:3"], "tts")
    try:
        ready = {"tts": {"state": "READY", "reason": ""}}
        a, b, c = pool.replicas
        a.health = ReplicaHealth(live=True, ready=True, models=ready, checked_at=time.monotonic())
        b.health = ReplicaHealth(live=True, ready=True, models=ready, checked_at=time.monotonic())
        c.health = ReplicaHealth(
            live=True, ready=True, models={"tts": {"state": "LOADING"}}, checked_at=time.monotonic()
        )
        assert {r.url for r in [await pool.pick() for _ in range(4)]} == {"a:1", "b:2"}  # ties alternate; c not ready
        a.active_streams = 3
        assert [await pool.pick() for _ in range(3)] == [b, b, b]
        assert await pool.pick(exclude=[b]) is a
        for r in (a, b):
            r.mark_down("UNAVAILABLE: connection refused")
        with pytest.raises(UpstreamUnavailable, match="a:1: UNAVAILABLE"):
            await pool.pick(exclude=[c])
    finally:
        await pool.close()


async def test_websocket_message_over_the_limit_closes_with_1009(down_client):
    ws = await down_client.ws_connect("/stream")
    await ws.send_str(json.dumps({"text": "x" * 5000}))  # PROXY_MAX_BODY_BYTES is 4096 here
    message = await ws.receive()
    assert message.type == WSMsgType.CLOSE and ws.close_code == 1009


async def test_websocket_origin_must_be_allowed_when_cors_is_configured(down_client):
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await down_client.ws_connect("/stream", origin="http://evil.test")
    assert info.value.status == 403
    ws = await down_client.ws_connect("/stream", origin="http://allowed.test")
    await ws.close()


def test_websocket_messages_are_read_by_pure_functions():
    """WS /stream's protocol without a socket: what each client frame is (proxy/parse/websocket.py)."""
    from proxy.parse.websocket import is_blank, read_message, text_of

    assert read_message('{"text": "Hi", "topk": 5}') == Message("text", {"text": "Hi", "topk": 5})
    assert read_message('{"config": {"mode": "stream"}}') == Message("config", {"mode": "stream"})
    assert read_message('{"cancel": true}') == Message("cancel") and read_message('{"done": true}') == Message("done")
    assert read_message("{oops").kind == "malformed" and read_message("[1]").kind == "malformed"
    assert read_message('{"done": 1}') == Message("invalid", {"error": "done must be true"})
    assert read_message('{"cancel": true, "text": "x"}').payload == {
        "error": "A 'cancel' message must have no other fields"
    }
    assert read_message("[" * 100_000).payload["error"].startswith("Invalid JSON")  # nesting: an error, no crash
    assert is_blank({"text": "  "}) and is_blank({}) and not is_blank({"text": 5}) and text_of({"text": 5}) is None
