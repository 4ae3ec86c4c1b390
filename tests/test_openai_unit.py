"""The OpenAI-compatible API's plain parts, no Triton needed: streaming encoders (checked by independent decoders),
reference audio decoding and its bounds, voices and their configuration, request validation, and the OpenAI error
shapes (through the official `openai` client) with Triton unreachable."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import openai
import pytest
import soundfile
from audio_checks import LOSSLESS, check_audio
from conftest import FAST_FAIL_S

from csm_tts.tooling.local_triton import free_port
from proxy.app import create_app
from proxy.errors import OpenAIError, ValidationError
from proxy.formats import FORMATS, RESPONSE_FORMATS
from proxy.parse.openai import parse_speech
from proxy.parse.reference import ReferenceLimits as Limits
from proxy.parse.reference import parse_reference
from proxy.parse.websocket import StreamConfig, parse_stream_config
from proxy.render.encoders import StreamEncoder
from proxy.render.pcm import to_pcm16
from proxy.settings import Settings, SettingsError
from proxy.voices import (
    DEFAULT_OPENAI_VOICES,
    InvalidReference,
    UnknownVoice,
    VoiceBook,
    VoiceConfigError,
    decode_reference,
    parse_voice_table,
)

ROOT = Path(__file__).resolve().parent.parent


def encode_whole(audio: np.ndarray, fmt) -> bytes:
    """One complete file of `audio`, encoded as one stream."""
    encoder = StreamEncoder(fmt)
    return encoder.encode(audio) + encoder.finish()


# The model's chunk schedule: 2, 4, 8 frames, then 10 (80 ms = 1920 samples each).
SCHEDULE = [3840, 7680, 15360, 19200, 19200]


def speech_like(seconds: float, rate: int = 24000, seed: int = 0) -> np.ndarray:
    """A deterministic, speech-band signal: a few gliding tones with noise, under full scale."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    audio = sum(0.15 * np.sin(2 * np.pi * (f + 40 * np.sin(2 * np.pi * 0.7 * t)) * t) for f in (180, 420, 1100))
    return (audio + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def in_schedule(audio: np.ndarray) -> list[np.ndarray]:
    chunks, start, i = [], 0, 0
    while start < audio.size:
        size = SCHEDULE[min(i, len(SCHEDULE) - 1)]
        chunks.append(audio[start : start + size])
        start, i = start + size, i + 1
    return chunks


def file_bytes(audio: np.ndarray, rate: int, **kwargs) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, rate, **kwargs)
    return buffer.getvalue()


# -- encoders ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RESPONSE_FORMATS)
def test_streaming_encoder_equals_one_shot_and_decodes(name):
    """Encoded chunk by chunk as the model delivers audio, the bytes are those of encoding the whole clip at once
    (no seam at chunk borders), the first chunk already yields bytes, and independent decoders read the file."""
    audio = speech_like(2.0)
    encoder = StreamEncoder(FORMATS[name])
    pieces = [encoder.encode(chunk) for chunk in in_schedule(audio)]
    data = b"".join(pieces) + encoder.finish()
    assert pieces[0], "the first chunk must already produce bytes (streaming)"
    assert data == encode_whole(audio, FORMATS[name])
    decoded = check_audio(data, name, audio.size)
    if name in LOSSLESS:
        assert np.array_equal(decoded, to_pcm16(audio))


def test_opus_is_resampled_to_48khz_without_seams():
    """Ogg/Opus plays at 48 kHz; the decoded audio follows the 24 kHz input closely (a seam would show as a click)."""
    audio = speech_like(1.5)
    data = encode_whole(audio, FORMATS["opus"])
    decoded, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert rate == 48000 and decoded.size == 2 * audio.size
    reference = np.interp(np.arange(decoded.size) / 2, np.arange(audio.size), audio)
    error = decoded[2000:-2000] - reference[2000:-2000]
    assert np.sqrt(np.mean(error**2)) < 0.25 * np.sqrt(np.mean(reference**2))


def test_encoder_close_releases_a_half_written_stream():
    encoder = StreamEncoder(FORMATS["mp3"])
    assert encoder.encode(speech_like(0.2))
    encoder.close()
    encoder.close()  # idempotent


# -- reference audio -----------------------------------------------------------------------------------------------
def test_reference_wav_at_24khz_is_taken_exactly():
    pcm = to_pcm16(speech_like(1.0))
    audio = decode_reference(file_bytes(pcm, 24000, format="WAV", subtype="PCM_16"), 20.0)
    assert audio.dtype == np.float32 and np.array_equal(audio, pcm.astype(np.float32) / 32768.0)


@pytest.mark.parametrize(
    "rate, channels, kwargs",
    [
        (44100, 2, {"format": "FLAC"}),
        (16000, 1, {"format": "MP3", "subtype": "MPEG_LAYER_III"}),
        (48000, 1, {"format": "OGG", "subtype": "OPUS"}),
        (8000, 1, {"format": "WAV", "subtype": "FLOAT"}),
    ],
)
def test_reference_audio_any_rate_and_format_becomes_24khz_mono(rate, channels, kwargs):
    audio = speech_like(1.2, rate)
    data = file_bytes(np.stack([audio] * channels, axis=1) if channels > 1 else audio, rate, **kwargs)
    decoded = decode_reference(data, 20.0)
    assert decoded.ndim == 1 and decoded.dtype == np.float32
    assert abs(decoded.size - 1.2 * 24000) <= 0.05 * 24000  # MP3 adds its encoder delay


def test_reference_bounds_are_checked_while_decoding():
    # Ten minutes of silence compress to a few kilobytes of FLAC: refused after reading 20 s, not ten minutes.
    bomb = file_bytes(np.zeros(600 * 24000, np.int16), 24000, format="FLAC")
    assert len(bomb) < 200_000
    start = time.monotonic()
    with pytest.raises(InvalidReference, match="longer than the limit of 20 s") as e:
        decode_reference(bomb, 20.0)
    assert e.value.status == 422 and time.monotonic() - start < 2.0
    with pytest.raises(InvalidReference, match="not a readable audio file"):
        decode_reference(b"<html>hello</html>" * 10, 20.0)
    with pytest.raises(InvalidReference, match="send WAV, FLAC, MP3 or Ogg/Opus"):
        decode_reference(file_bytes(speech_like(0.5), 24000, format="AIFF"), 20.0)
    with pytest.raises(InvalidReference, match="less than 80 ms"):
        decode_reference(file_bytes(speech_like(0.01), 24000, format="WAV"), 20.0)
    truncated = file_bytes(speech_like(1.0), 24000, format="FLAC")[:100]
    with pytest.raises(InvalidReference):
        decode_reference(truncated, 20.0)


@pytest.mark.parametrize(
    "fields, status, field, message",
    [
        ({"reference_text": "Hi."}, 422, "reference_audio", "needs reference_audio"),
        ({"reference_audio": "AAAA"}, 422, "reference_text", "needs reference_text"),
        ({"reference_audio": "AAAA", "reference_text": " "}, 422, "reference_text", "non-empty"),
        ({"reference_audio": 5, "reference_text": "Hi."}, 422, "reference_audio", "base64 string"),
        ({"reference_audio": "https://example.com/a.wav", "reference_text": "Hi."}, 422, "reference_audio", "URLs"),
        ({"reference_audio": "not base64!", "reference_text": "Hi."}, 422, "reference_audio", "not valid base64"),
        ({"reference_audio": "A" * 2000, "reference_text": "Hi."}, 413, "reference_audio", "the limit is 1000"),
        ({"reference_audio": "AAAA", "reference_text": "x" * 2001}, 422, "reference_text", "limit is 2000"),
    ],
)
def test_reference_fields_are_checked_before_decoding(fields, status, field, message):
    with pytest.raises(InvalidReference, match=message) as e:
        parse_reference(fields, Limits(max_bytes=1000))
    assert (e.value.status, e.value.field) == (status, field)


def test_reference_fields_absent_or_valid():
    assert parse_reference({}, Limits()) is None
    raw = file_bytes(speech_like(0.5), 24000, format="WAV")
    assert parse_reference({"reference_audio": base64.b64encode(raw).decode(), "reference_text": "Hi."}, Limits()) == (
        raw,
        "Hi.",
    )


# -- voices --------------------------------------------------------------------------------------------------------
def write_voice(directory: Path, name: str, text: str = "A reference sentence.", meta: str | None = None, ext="wav"):
    soundfile.write(directory / f"{name}.{ext}", speech_like(1.0, 16000), 16000)
    (directory / f"{name}.txt").write_text(text + "\n")
    if meta is not None:
        (directory / f"{name}.json").write_text(meta)


def test_voice_book_presets_aliases_and_speaker_ids(tmp_path):
    write_voice(tmp_path, "narrator", meta='{"speaker_id": 3, "description": "calm"}')
    write_voice(tmp_path, "guide", ext="flac")
    (tmp_path / "README.md").write_text("other files are ignored")
    book = VoiceBook.load(tmp_path, parse_voice_table("alloy=narrator,echo=5"))
    alloy = book.resolve("alloy")
    assert (alloy.speaker_id, alloy.alias_of, alloy.reference.text) == (3, "narrator", "A reference sentence.")
    assert alloy.reference.speaker == 3 and abs(alloy.reference.audio.size - 24000) <= 1
    assert book.resolve("narrator").reference is alloy.reference and book.resolve("guide").speaker_id == 0
    assert (book.resolve("echo").speaker_id, book.resolve("echo").reference) == (5, None)
    assert book.resolve("31").speaker_id == 31
    for bad in ("32", "nova", "", "-1", "٣", 3, None):
        with pytest.raises(UnknownVoice, match="available voices: alloy, echo, guide, narrator, 0-31"):
            book.resolve(bad)
    listing = book.listing()
    assert [v["id"] for v in listing] == ["alloy", "echo", "guide", "narrator"]
    assert listing[0] == {
        "id": "alloy",
        "name": "alloy",
        "speaker_id": 3,
        "type": "preset",
        "reference_seconds": 1.0,
        "reference_text": "A reference sentence.",
        "alias_of": "narrator",
        "description": "calm",
    }


def test_default_table_maps_openai_names_to_speakers():
    book = VoiceBook.load(None)
    assert [book.resolve(name).speaker_id for name, _ in DEFAULT_OPENAI_VOICES] == list(range(13))
    assert book.resolve("shimmer").reference is None


@pytest.mark.parametrize(
    "setup, table, message",
    [
        (lambda d: write_voice(d, "a", meta="{}") or (d / "a.txt").unlink(), "", "transcript a.txt is missing"),
        (lambda d: write_voice(d, "a", text=" "), "", "is empty"),
        (lambda d: write_voice(d, "7"), "", "not a number"),
        (lambda d: write_voice(d, "a", meta='{"speaker_id": 40}'), "", "speaker_id must be an integer 0-31"),
        (lambda d: write_voice(d, "a", meta='{"pitch": 1}'), "", "speaker_id and/or description"),
        (lambda d: write_voice(d, "a") or write_voice(d, "a", ext="flac"), "", "more than one audio file"),
        (lambda d: write_voice(d, "a") or (d / "a.wav").write_bytes(b"nonsense"), "", "a.wav is not"),
        (lambda d: None, "alloy=narrator", "not a preset in the voices directory nor a speaker id"),
        (lambda d: write_voice(d, "alloy"), "alloy=1", "also a preset"),
    ],
)
def test_voice_configuration_errors_name_the_file(tmp_path, setup, table, message):
    setup(tmp_path)
    with pytest.raises(VoiceConfigError, match=message):
        VoiceBook.load(tmp_path, parse_voice_table(table))


def test_voice_settings_and_start_up_errors(tmp_path):
    settings = Settings.from_env({"CSM_VOICES_DIR": str(tmp_path), "PROXY_OPENAI_VOICES": "alloy=2, nova=4"})
    assert settings.voices_dir == str(tmp_path) and settings.openai_voices == (("alloy", "2"), ("nova", "4"))
    for value in ("alloy", "alloy=1,alloy=2", "a b=1"):
        with pytest.raises(SettingsError, match="PROXY_OPENAI_VOICES"):
            Settings.from_env({"PROXY_OPENAI_VOICES": value})
    with pytest.raises(SettingsError, match="CSM_VOICES_DIR=.*not a directory"):
        create_app(Settings(voices_dir=str(tmp_path / "missing")))
    env = {**os.environ, "CSM_VOICES_DIR": str(tmp_path / "missing")}
    result = subprocess.run([sys.executable, "-m", "proxy"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "CSM_VOICES_DIR" in result.stderr and "Traceback" not in result.stderr


def test_websocket_stream_mode_accepts_encoded_formats():
    config = parse_stream_config({"mode": "stream", "binary": True, "format": "opus"}, StreamConfig())
    assert config.sample_format == "opus"
    with pytest.raises(ValidationError, match="s16le, f32le, mp3, opus, aac, flac, wav"):
        parse_stream_config({"format": "pcm"}, StreamConfig())


# -- request validation ------------------------------------------------------------------------------------------
BASE = {"model": "csm-1b", "input": "Hello.", "voice": "alloy"}


def test_parse_speech_defaults_and_extras():
    parsed = parse_speech(dict(BASE), VoiceBook.load(None), Limits())
    assert (parsed.format.name, parsed.sse, parsed.reference, parsed.voice.name) == ("mp3", False, None, "alloy")
    assert parsed.options.text == "Hello." and parsed.options.speaker_id == 0
    body = {
        **BASE,
        "model": "tts-1",
        "voice": {"id": "echo"},
        "response_format": "pcm",
        "stream_format": "sse",
        "speed": 1,
        "instructions": "Speak cheerfully.",
        "seed": 4,
        "temperature": 0.5,
        "topk": 20,
        "max_audio_length_ms": 2000,
        "watermark": False,
        "watermark_key": [1, 2, 3, 4, 5],
    }
    parsed = parse_speech(body, VoiceBook.load(None), Limits())
    assert (parsed.format.name, parsed.sse, parsed.voice.speaker_id) == ("pcm", True, 4)
    o = parsed.options
    assert (o.seed, o.temperature, o.topk, o.max_audio_length_ms, o.watermark, o.watermark_key) == (
        4,
        0.5,
        20,
        2000,
        False,
        (1, 2, 3, 4, 5),
    )


BAD_BODIES = [
    ([1], 400, None, "invalid_value", "must be a JSON object"),
    ({**BASE, "stream": True}, 400, "stream", None, "Unrecognized request argument supplied: stream"),
    ({"input": "Hi", "voice": "alloy"}, 400, "model", "missing_required_parameter", "'model'"),
    ({"model": "csm-1b", "voice": "alloy"}, 400, "input", "missing_required_parameter", "'input'"),
    ({"model": "csm-1b", "input": "Hi"}, 400, "voice", "missing_required_parameter", "'voice'"),
    ({**BASE, "model": "whisper-1"}, 404, "model", "model_not_found", "does not exist"),
    ({**BASE, "model": 7}, 400, "model", "invalid_value", "must be a string"),
    ({**BASE, "input": ""}, 400, "input", "invalid_value", "must not be empty"),
    ({**BASE, "input": ["Hi"]}, 400, "input", "invalid_value", "must be a string"),
    ({**BASE, "input": "x" * 5001}, 400, "input", "invalid_value", "the limit is 5000"),
    ({**BASE, "voice": "bob"}, 400, "voice", "unknown_voice", "available voices: alloy, ash"),
    ({**BASE, "voice": {"name": "x"}}, 400, "voice", "unknown_voice", "Unknown voice"),
    ({**BASE, "response_format": "ogg"}, 400, "response_format", "invalid_value", "mp3, opus, aac, flac, wav, pcm"),
    ({**BASE, "stream_format": "ndjson"}, 400, "stream_format", "invalid_value", "audio, sse"),
    ({**BASE, "speed": 1.5}, 400, "speed", "unsupported_value", "only 1.0 is supported"),
    ({**BASE, "speed": 9}, 400, "speed", "invalid_value", "0.25 to 4.0"),
    ({**BASE, "speed": "fast"}, 400, "speed", "invalid_value", "0.25 to 4.0"),
    ({**BASE, "instructions": 5}, 400, "instructions", "invalid_value", "must be a string"),
    ({**BASE, "temperature": 9}, 400, "temperature", "invalid_value", "between 0.1 and 2.0"),
    ({**BASE, "seed": -1}, 400, "seed", "invalid_value", "between 0 and"),
    ({**BASE, "watermark_key": [1, 2]}, 400, "watermark_key", "invalid_value", "5 integers"),
    ({**BASE, "reference_text": "Hi."}, 400, "reference_audio", "invalid_reference_audio", "needs reference_audio"),
    (
        {**BASE, "reference_audio": "A" * 4000, "reference_text": "Hi."},
        413,
        "reference_audio",
        "invalid_reference_audio",
        "the limit is 1000",
    ),
]


@pytest.mark.parametrize("body, status, param, code, message", BAD_BODIES)
def test_parse_speech_errors(body, status, param, code, message):
    with pytest.raises(OpenAIError, match=message) as e:
        parse_speech(body, VoiceBook.load(None), Limits(max_bytes=1000))
    assert (e.value.status, e.value.param, e.value.code) == (status, param, code)


# -- over HTTP with Triton unreachable: OpenAI error bodies, and the openai client's exceptions ------------------
@pytest.fixture
async def down_client(aiohttp_client):
    settings = Settings(triton_grpc_urls=(f"127.0.0.1:{free_port()}",), max_body_bytes=8192, health_timeout_s=0.3)
    return await aiohttp_client(create_app(settings))


def assert_openai_error(body: dict, param=None, code=None) -> dict:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and body["error"]["type"] in ("invalid_request_error", "server_error")
    assert (body["error"]["param"], body["error"]["code"]) == (param, code), body
    return body["error"]


@pytest.mark.parametrize(
    "method, path, kwargs, status, param, code",
    [
        ("post", "/v1/audio/speech", {"json": {**BASE, "voice": "bob"}}, 400, "voice", "unknown_voice"),
        ("post", "/v1/audio/speech", {"data": b"{oops"}, 400, None, None),
        ("post", "/v1/audio/speech", {"data": b""}, 400, None, None),
        ("post", "/v1/audio/speech", {"data": b"x" * 9000}, 413, None, "request_too_large"),
        ("get", "/v1/audio/speech", {}, 405, None, "method_not_allowed"),
        ("get", "/v1/nothing", {}, 404, None, "not_found"),
        ("post", "/v1/audio/speech", {"json": BASE}, 503, None, "service_unavailable"),
    ],
)
async def test_v1_errors_are_openai_shaped(down_client, method, path, kwargs, status, param, code):
    if "data" in kwargs:  # raw bodies are sent as JSON (any other Content-Type is 415)
        kwargs = {**kwargs, "headers": {"Content-Type": "application/json"}}
    start = time.monotonic()
    response = await getattr(down_client, method)(path, **kwargs)
    assert response.status == status and time.monotonic() - start < FAST_FAIL_S
    error = assert_openai_error(await response.json(), param, code)
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if status == 503:
        assert response.headers["Retry-After"] == "1" and "Triton is unavailable" in error["message"]
    # The seed API keeps its own error shape.
    seed = await down_client.post("/generate", json={"txt": "Hi"})
    assert seed.status == 422 and isinstance((await seed.json())["error"], str)


async def test_models_and_voices_need_no_triton(down_client):
    models = await (await down_client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "csm-1b"
    assert {m["id"] for m in models["data"]} >= {"csm-1b", "tts-1", "tts-1-hd", "gpt-4o-mini-tts"}
    voices = await (await down_client.get("/v1/audio/voices")).json()
    assert [v["id"] for v in voices["voices"]][:3] == ["alloy", "ash", "ballad"]


async def test_openai_client_raises_its_usual_exceptions(down_client):
    client = openai.AsyncOpenAI(base_url=str(down_client.make_url("/v1")), api_key="unused", max_retries=0)
    async with client:
        models = await client.models.list()
        assert models.data[0].id == "csm-1b"
        with pytest.raises(openai.BadRequestError) as e:
            await client.audio.speech.create(model="tts-1", voice="bob", input="Hi.")
        assert (e.value.code, e.value.param, e.value.type) == ("unknown_voice", "voice", "invalid_request_error")
        with pytest.raises(openai.NotFoundError) as e:
            await client.audio.speech.create(model="whisper-1", voice="alloy", input="Hi.")
        assert e.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError, match="only 1.0 is supported"):
            await client.audio.speech.create(model="tts-1", voice="alloy", input="Hi.", speed=2.0)
        with pytest.raises(openai.InternalServerError) as e:
            await client.audio.speech.create(model="tts-1", voice="alloy", input="Hi.")
        assert e.value.status_code == 503 and e.value.code == "service_unavailable"


# -- a failure after the first audio: the status is already 200 ------------------------------------------------------
class FailingTriton:
    """Stands in for the pool: one chunk of audio, then Triton goes away."""

    active_streams, max_streams = 0, 8  # what admission reads

    def __init__(self):
        self.contexts = []
        self.closed = 0

    def stream(self, text, parameters, context, request_id=""):
        from proxy.upstream.errors import UpstreamUnavailable
        from proxy.upstream.stream import AudioChunk

        self.contexts.append(list(context))
        pool = self
        sent = []

        class Stream:
            async def __aenter__(self):
                return self

            async def __aexit__(self, *exc):
                pool.closed += 1

            async def __anext__(self):
                if not sent:
                    sent.append(1)
                    return AudioChunk(speech_like(0.16), 0, False, False, None)
                raise UpstreamUnavailable("Triton at 127.0.0.1:1 is unavailable (UNAVAILABLE: gone)")

        return Stream()


@pytest.fixture
async def failing(aiohttp_client):
    from proxy.appkeys import TRITON

    app = create_app(Settings(triton_grpc_urls=(f"127.0.0.1:{free_port()}",), health_timeout_s=0.3))
    fake = FailingTriton()

    async def use_fake(app):  # after the real pool was set up (cleanup_ctx runs first)
        app[TRITON] = fake

    app.on_startup.append(use_fake)
    return await aiohttp_client(app), fake


async def test_failure_mid_stream_cuts_the_audio_and_ends_sse_with_an_error(failing):
    client, fake = failing
    body = {**BASE, "response_format": "pcm"}
    response = await client.post("/v1/audio/speech", json=body)
    assert response.status == 200 and response.headers["Transfer-Encoding"] == "chunked"
    with pytest.raises(aiohttp.ClientPayloadError):  # never a short file that looks complete
        await response.read()
    response = await client.post("/v1/audio/speech", json={**body, "stream_format": "sse"})
    assert response.status == 200
    events = [json.loads(b.removeprefix("data: ")) for b in (await response.text()).strip().split("\n\n")]
    assert [e["type"] for e in events] == ["speech.audio.delta", "error"]
    assert len(base64.b64decode(events[0]["audio"])) == 2 * 3840
    assert events[1]["error"]["type"] == "server_error" and events[1]["error"]["code"] == "service_unavailable"
    assert fake.closed == 2  # every Triton stream was left


async def test_a_reference_becomes_the_first_context_segment(failing):
    client, fake = failing
    pcm = to_pcm16(speech_like(0.5))
    fields = {"reference_audio": base64.b64encode(file_bytes(pcm, 24000, format="WAV")).decode()}
    fields["reference_text"] = "Mine."
    await client.post("/v1/audio/speech", json={**BASE, "voice": "echo", **fields, "stream_format": "sse"})
    await client.post("/generate", json={"text": "Seed API.", "speaker_id": 7, **fields})
    for context, speaker in zip(fake.contexts, (4, 7), strict=True):
        (segment,) = context
        assert (segment.speaker, segment.text) == (speaker, "Mine.")
        assert np.array_equal(segment.audio, pcm.astype(np.float32) / 32768)


def test_streamed_files_read_as_docs_api_says():
    """docs/api.md: soundfile reads the streamed wav, mp3 and opus; a streamed FLAC (length unknown) needs PyAV, whose
    documented snippet returns every sample."""
    import av

    audio = speech_like(1.0)
    for name in ("wav", "mp3", "opus", "flac"):
        encoder = StreamEncoder(FORMATS[name])
        body = encoder.encode(audio[:9000]) + encoder.encode(audio[9000:]) + encoder.finish()
        if name == "flac":
            with pytest.raises(ValueError, match="array is too big"):
                soundfile.read(io.BytesIO(body))
            with av.open(io.BytesIO(body)) as container:
                decoded = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
            assert decoded.size == audio.size
        else:
            decoded, rate = soundfile.read(io.BytesIO(body))
            assert rate == FORMATS[name].sample_rate and decoded.size >= audio.size * rate // 24000
