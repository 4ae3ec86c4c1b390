"""The `csm_1b` decoupled model on a real local Triton server, over gRPC streaming."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import InferInput

from csm_tts import SAMPLES_PER_FRAME
from csm_tts.speech.chunk_schedule import ChunkSchedule
from csm_tts.speech.engine import CsmEngine
from csm_tts.speech.request import GenerationRequest
from csm_tts.tooling.triton_streams import make_inputs, stream

pytestmark = pytest.mark.live
MODEL = "csm_1b"
TEXT = "Hello from Sesame."


async def test_chunks_arrive_in_schedule_with_the_requested_length(grpc_url):
    result = await stream(grpc_url, MODEL, TEXT, {"seed": 1, "max_audio_length_ms": 2000})
    assert result.error is None
    frames = [c["audio"].size // SAMPLES_PER_FRAME for c in result.chunks]
    assert frames == [3, 6, 10, 6]  # default schedule 3, x2, capped at 10; 25 frames in all
    assert [int(c["chunk_index"][0]) for c in result.chunks] == list(range(4))
    assert [bool(c["is_last"][0]) for c in result.chunks] == [False] * 3 + [True]
    assert [int(c["sample_offset"][0]) for c in result.chunks] == np.cumsum(
        [0] + [c["audio"].size for c in result.chunks[:-1]]
    ).tolist()
    assert len({c["stream_id"][0] for c in result.chunks}) == 1
    assert result.audio.dtype == np.float32 and result.audio.size == 2000 // 80 * SAMPLES_PER_FRAME
    # Streaming: the first chunk arrived well before the last one.
    assert result.arrival_s[0] < result.arrival_s[-1] / 2


async def test_same_seed_same_audio(grpc_url):
    params = {"seed": 42, "max_audio_length_ms": 800, "temperature": 0.8, "topk": 30, "speaker_id": 2}
    first, second = await stream(grpc_url, MODEL, TEXT, params), await stream(grpc_url, MODEL, TEXT, params)
    assert first.error is None and np.array_equal(first.audio, second.audio)
    other = await stream(grpc_url, MODEL, TEXT, {**params, "seed": 43})
    assert not np.array_equal(first.audio, other.audio)


async def test_matches_the_in_process_engine(grpc_url, engine):
    served = await stream(grpc_url, MODEL, TEXT, {"seed": 5, "max_audio_length_ms": 800, "speaker_id": 1})
    served_schedule = CsmEngine(engine.model, engine.processor, schedule=ChunkSchedule(first_frames=3))  # as config
    request = GenerationRequest(TEXT, speaker_id=1, seed=5, max_audio_length_ms=800)
    local = np.concatenate([c.audio for c in served_schedule.generate(request)])
    assert np.array_equal(served.audio, local)


async def test_concurrent_streams_equal_their_solo_runs_and_interleave(grpc_url):
    """Greedy, so equality is exact even though the two streams share batched steps (see test_scheduler.py for
    the per-stream randomness of sampled streams)."""
    params = [{"temperature": 0, "speaker_id": s, "max_audio_length_ms": 1600} for s in (1, 2)]
    texts = [TEXT, "A different sentence, spoken by someone else."]
    solo = [await stream(grpc_url, MODEL, t, p) for t, p in zip(texts, params, strict=True)]
    together = await asyncio.gather(*(stream(grpc_url, MODEL, t, p) for t, p in zip(texts, params, strict=True)))
    for alone, mixed in zip(solo, together, strict=True):
        assert mixed.error is None and np.array_equal(alone.audio, mixed.audio)
    # Interleaved, not one after another: each stream's first chunk comes before the other's last chunk.
    assert together[0].arrival_s[0] < together[1].arrival_s[-1] and together[1].arrival_s[0] < together[0].arrival_s[-1]


async def test_context_segments_are_used(grpc_url):
    audio = (np.random.default_rng(0).standard_normal(12000) * 0.1).astype(np.float32)
    base = {"temperature": 0, "max_audio_length_ms": 400}
    plain = await stream(grpc_url, MODEL, TEXT, base)
    with_context = await stream(grpc_url, MODEL, TEXT, base, context=[(1, "Earlier words.", audio)])
    assert with_context.error is None and with_context.audio.size == plain.audio.size
    assert not np.array_equal(plain.audio, with_context.audio)


async def test_cancelled_stream_stops_generating(grpc_url, triton_server):
    before = triton_server.log_text().count("Cancelling the request")
    result = await stream(grpc_url, MODEL, TEXT, {"seed": 3, "max_audio_length_ms": 60_000}, stop_after_chunks=2)
    assert result.error is None and len(result.chunks) == 2
    for _ in range(100):
        log = triton_server.log_text()
        if log.count("Cancelling the request") > before:
            break
        await asyncio.sleep(0.1)
    match = re.findall(r"Cancelling the request \w+ after (\d+) frames", log)
    assert match, "the server did not log the cancellation"
    assert int(match[-1]) < 60_000 // 80 // 2  # stopped long before its 750 frames
    # The model keeps serving.
    assert (await stream(grpc_url, MODEL, TEXT, {"max_audio_length_ms": 160})).error is None


def _raw(name, array, dtype):
    tensor = InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


BAD_PARAMETERS = [
    ({"speaker_id": -1}, "speaker_id"),
    ({"speaker_id": 1000}, "speaker_id"),
    ({"speaker_id": "abc"}, "speaker_id"),
    ({"temperature": 5.0}, "temperature"),
    ({"topk": 0}, "topk"),
    ({"max_audio_length_ms": 10}, "max_audio_length_ms"),
    ({"max_audio_length_ms": 10_000_000}, "max_audio_length_ms"),
    ({"seed": -1}, "seed"),
    ({"watermark_key": "1,2,3"}, "watermark_key"),
    ({"watermark": "maybe"}, "watermark"),
    # Hostile numbers: the largest int64, digit strings past Python's parsing limit, floats that overflow.
    ({"speaker_id": 2**63 - 1}, "speaker_id"),
    ({"seed": "9" * 5000}, "seed"),
    ({"temperature": "1e400"}, "temperature"),
    ({"max_audio_length_ms": -(2**63)}, "max_audio_length_ms"),
    ({"topk": 1e300}, "topk"),
]


@pytest.mark.parametrize("parameters, mentions", BAD_PARAMETERS, ids=[str(p) for p, _ in BAD_PARAMETERS])
async def test_bad_options_get_invalid_arg(grpc_url, parameters, mentions):
    result = await stream(grpc_url, MODEL, TEXT, {"max_audio_length_ms": 400, **parameters})
    assert result.error is not None and not result.chunks
    assert result.error.message().startswith("INVALID_ARG: ") and mentions in result.error.message()


@pytest.mark.parametrize("text", ["", "   \n\t"])
async def test_empty_text_gets_invalid_arg(grpc_url, text):
    result = await stream(grpc_url, MODEL, text)
    assert result.error is not None and result.error.message().startswith("INVALID_ARG: ")
    assert "text" in result.error.message()


async def test_text_too_long_for_the_context_gets_invalid_arg(grpc_url):
    result = await stream(grpc_url, MODEL, "word " * 900, {"max_audio_length_ms": 90_000})
    assert result.error is not None and result.error.message().startswith("INVALID_ARG: ")
    assert "context holds 2048" in result.error.message()


async def test_malformed_context_audio_gets_invalid_arg(grpc_url):
    inputs = make_inputs(TEXT)
    inputs += [
        _raw("context_text", np.array([b"Hi."], dtype=np.object_), "BYTES"),
        _raw("context_speaker", np.array([0], dtype=np.int32), "INT32"),
        _raw("context_audio", np.zeros(100, dtype=np.float32), "FP32"),
        _raw("context_audio_lengths", np.array([5000], dtype=np.int64), "INT64"),  # does not match the 100 samples
    ]
    result = await stream(grpc_url, MODEL, TEXT, inputs=inputs)
    assert (
        result.error is not None
        and result.error.message().startswith("INVALID_ARG: ")
        and "context_audio_lengths" in result.error.message()
    )
    partial = make_inputs(TEXT) + [_raw("context_audio", np.zeros(100, dtype=np.float32), "FP32")]
    result = await stream(grpc_url, MODEL, TEXT, inputs=partial)
    assert result.error is not None and "missing" in result.error.message()
    nan = make_inputs(TEXT, context=[(0, "Hi.", np.full(100, np.nan, dtype=np.float32))])
    result = await stream(grpc_url, MODEL, TEXT, inputs=nan)
    assert result.error is not None and "NaN" in result.error.message()


async def test_invalid_utf8_text_gets_invalid_arg(grpc_url):
    inputs = [_raw("text", np.array([b"\xff\xfe"], dtype=np.object_), "BYTES")]
    result = await stream(grpc_url, MODEL, "", inputs=inputs)
    assert result.error is not None and "UTF-8" in result.error.message()


async def test_server_keeps_serving_after_bad_requests(grpc_url):
    await asyncio.gather(*(stream(grpc_url, MODEL, "", {}) for _ in range(5)))
    result = await stream(grpc_url, MODEL, TEXT, {"max_audio_length_ms": 160})
    assert result.error is None and result.audio.size == 2 * SAMPLES_PER_FRAME


def load_script(name: str):
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_a_maximal_context_does_not_stall_running_streams(grpc_url, triton_server):
    """scripts/bench_context_stall.py against this server. Before, each of four contexts that cannot fit was
    Mimi-encoded on the stepping thread before being refused, stretching a running stream's gap from 0.78 s to 6.4 s;
    now they are refused from a cheap estimate, and a maximal context is encoded beside the running streams."""
    report = await load_script("bench_context_stall").measure_context_stall(grpc_url)
    print(json.dumps(report))
    baseline = report["running_stream"]["baseline_gap_ms_max"]
    joins, refused = report["phases"]["maximal context joins"], report["phases"]["4 contexts that cannot fit"]
    assert not joins["errors"]
    assert len(refused["errors"]) == 4 and all("takes at least" in e for e in refused["errors"])
    assert max(refused["request_latency_ms"]) < 3000 and refused["running_gap_ms_max"] < baseline + 1500
    assert joins["running_gap_ms_max"] < baseline + 3500
    assert re.search(r"prompt of \d+ positions \(8 context segments\) built in \d+ ms", triton_server.log_text())
