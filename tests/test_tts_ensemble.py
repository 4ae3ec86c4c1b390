"""The `tts` ensemble (csm_1b -> watermarker) on a real local Triton server, over gRPC streaming."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import numpy as np
import pytest
from conftest import TINY_CSM, TINY_WATERMARK, WATERMARK_IDLE_TIMEOUT_S, start_triton
from test_flow_control_live import wait_idle
from tritonclient.grpc import InferInput

from csm_tts.tooling.local_triton import TritonStartError
from csm_tts.tooling.triton_streams import stream
from csm_tts.watermark.detection import sdr_db
from csm_tts.watermark.options import key_id

pytestmark = pytest.mark.live
TEXT = "Hello from Sesame."
BASE = {"seed": 11, "max_audio_length_ms": 2000}


def summary(result) -> list[tuple]:
    return [
        (int(c["chunk_index"][0]), bool(c["is_last"][0]), bool(c["watermarked"][0]), c["watermark_key_id"][0])
        for c in result.chunks
    ]


async def test_watermark_off_passes_csm_1b_output_unchanged_chunk_by_chunk(grpc_url):
    raw = await stream(grpc_url, "csm_1b", TEXT, BASE)
    off = await stream(grpc_url, "tts", TEXT, {**BASE, "watermark": False})
    assert raw.error is None and off.error is None
    assert [c["audio"].size for c in off.chunks] == [c["audio"].size for c in raw.chunks]
    assert np.array_equal(off.audio, raw.audio)
    n = len(off.chunks)
    assert summary(off) == [(i, i == n - 1, False, b"none") for i in range(n)]
    assert n > 2 and off.arrival_s[0] < off.arrival_s[-1] / 2  # streamed, not collected


async def test_watermark_on_keeps_the_length_and_changes_the_audio_a_little(grpc_url):
    raw = await stream(grpc_url, "csm_1b", TEXT, BASE)
    marked = await stream(grpc_url, "tts", TEXT, BASE)  # the server default: on, public key
    assert marked.error is None and marked.audio.size == raw.audio.size
    n = len(marked.chunks)
    assert summary(marked) == [(i, i == n - 1, True, b"public") for i in range(n)]
    sdr = sdr_db(raw.audio, marked.audio)
    print(
        f"tts watermark SDR {sdr:.1f} dB over {raw.audio.size / 24000:.2f} s; first chunk "
        f"{marked.chunks[0]['audio'].size} of {raw.chunks[0]['audio'].size} samples"
    )
    assert 25 < sdr < 50
    # No message shorter than 100 ms but the last: the watermark holds back ~3000 samples, so the output of a short
    # first chunk waits for the next one (its response carries none); then audio flows with every chunk.
    sizes = [c["audio"].size for c in marked.chunks]
    assert all(n == 0 or n >= 2400 for n in sizes[:-1]) and sum(n == 0 for n in sizes[:-1]) <= 1, sizes

    private = await stream(grpc_url, "tts", TEXT, {**BASE, "watermark_key": "17,42,99,250,3"})
    assert private.error is None and {c["watermark_key_id"][0] for c in private.chunks} == {
        key_id((17, 42, 99, 250, 3)).encode()
    }
    assert private.audio.size == raw.audio.size and not np.array_equal(private.audio, marked.audio)


async def test_concurrent_streams_equal_their_solo_runs(grpc_url):
    """Per-stream watermark state never mixes. Greedy decoding keeps csm_1b exact when batched (see
    test_csm_1b_live.py); each stream is seeded and has its own key."""
    requests = [
        ("Hello.", {"seed": 1, "temperature": 0, "speaker_id": 0, "watermark_key": "1,2,3,4,5"}),
        ("How are you doing today?", {"seed": 2, "temperature": 0, "speaker_id": 1}),
        ("Fine, thank you very much.", {"seed": 3, "temperature": 0, "speaker_id": 2, "watermark_key": "9,8,7,6,5"}),
    ]
    requests = [(t, {**p, "max_audio_length_ms": 1200}) for t, p in requests]
    solo = [await stream(grpc_url, "tts", t, p) for t, p in requests]
    together = await asyncio.gather(*(stream(grpc_url, "tts", t, p) for t, p in requests))
    for alone, mixed in zip(solo, together, strict=True):
        assert alone.error is None and mixed.error is None
        assert summary(alone)[-1][1] and np.array_equal(alone.audio, mixed.audio)


async def wait_for_log(server, pattern: str, after: int, timeout: float) -> re.Match | None:
    """The first match of `pattern` in the server log beyond character `after`, polling until `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        match = re.search(pattern, server.log_text()[after:])
        if match:
            return match
        await asyncio.sleep(0.2)
    return None


async def test_cancelled_stream_frees_its_watermark_state(grpc_url, triton_server):
    """Triton tells the ensemble's next step about the cancellation: the watermarker drops the stream on its next
    chunk (and anything that stops sending is evicted after the idle timeout)."""
    start = len(triton_server.log_text())
    result = await stream(grpc_url, "tts", TEXT, {"seed": 3, "max_audio_length_ms": 8000}, stop_after_chunks=2)
    assert result.error is None and len(result.chunks) == 2
    freed = await wait_for_log(
        triton_server, r"\[watermarker\] (cancelled|evicted) stream (\w+)", start, float(WATERMARK_IDLE_TIMEOUT_S) + 15
    )
    assert freed, "the watermarker did not drop the cancelled stream's state"
    assert (await stream(grpc_url, "tts", TEXT, {"max_audio_length_ms": 160})).error is None  # still serving


async def test_cancelled_stream_stops_generation(grpc_url, triton_server):
    start = len(triton_server.log_text())
    # csm_1b learns of the cancellation when its next chunk reaches the watermarker: allow for a loaded machine.
    result = await stream(grpc_url, "tts", TEXT, {"seed": 4, "max_audio_length_ms": 30_000}, stop_after_chunks=2)
    assert result.error is None
    cancelled = await wait_for_log(triton_server, r"Cancelling the request \w+ after (\d+) frames", start, 60)
    assert cancelled and int(cancelled.group(1)) < 30_000 // 80 // 2


def watermark_queue(server) -> float:
    """The watermarker's csm_tts_watermark_queued_chunks gauge, from Triton's metrics endpoint."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        text = response.read().decode()
    match = re.search(r"^csm_tts_watermark_queued_chunks\{[^}]*\} (\S+)$", text, re.MULTILINE)
    assert match, "no queue gauge on /metrics"
    return float(match.group(1))


async def test_cancelled_streams_queued_chunks_are_dropped_and_the_queue_empties(grpc_url, triton_server):
    """Four long streams whose clients leave after 3 responses: at the watermarker each stream is cancelled by the
    first chunk that arrives marked cancelled, every chunk it still has queued is answered without being watermarked
    (its count is logged), and the queue is empty again within seconds, not after the streams' 20 s of audio."""
    start = len(triton_server.log_text())
    streams = [{"seed": 20 + i, "max_audio_length_ms": 20_000} for i in range(4)]
    results = await asyncio.gather(*(stream(grpc_url, "tts", TEXT, p, stop_after_chunks=3) for p in streams))
    assert all(r.error is None and len(r.chunks) == 3 for r in results)
    left = asyncio.get_running_loop().time()
    pattern = r"\[watermarker\] cancelled stream (\w+): dropped its watermark state and (\d+) queued chunks"
    deadline = left + 60
    while len(re.findall(pattern, triton_server.log_text()[start:])) < 4:
        assert asyncio.get_running_loop().time() < deadline, triton_server.log_text()[start:][-3000:]
        await asyncio.sleep(0.2)
    dropped = [int(n) for _, n in re.findall(pattern, triton_server.log_text()[start:])]
    assert all(n >= 1 for n in dropped)  # at least the chunk that brought the cancel
    while watermark_queue(triton_server) > 0:
        assert asyncio.get_running_loop().time() < left + 30, "the watermarker's queue did not empty"
        await asyncio.sleep(0.2)
    print(
        f"chunks dropped per cancelled stream: {dropped}; queue empty "
        f"{asyncio.get_running_loop().time() - left:.1f} s after the clients left"
    )
    # csm_1b learns of each cancel at its stream's next chunk: it ends them within a chunk, then serves again.
    waited, busy = await wait_idle(triton_server, 30)
    assert not busy, f"csm_1b or the watermarker still busy {waited:.1f} s after the queue emptied: {busy}"
    after = await stream(grpc_url, "tts", TEXT, {"max_audio_length_ms": 400})
    assert after.error is None, f"{after.error}\n{triton_server.log_text()[start:][-4000:]}"  # still serving


BAD_OPTIONS = [
    ({"watermark": "maybe"}, "watermark"),
    ({"watermark": 2}, "watermark"),
    ({"watermark_key": "1,2,3"}, "watermark_key"),
    ({"watermark_key": "1,2,3,4,256"}, "watermark_key"),
    ({"watermark_key": "1,2,3,4,-5"}, "watermark_key"),
    ({"watermark_key": "a,b,c,d,e"}, "watermark_key"),
    ({"watermark_key": "1,2,3,4,5,6"}, "watermark_key"),
    ({"watermark": False, "watermark_key": "1,2,3"}, "watermark_key"),
]


@pytest.mark.parametrize("options, mentions", BAD_OPTIONS, ids=[str(o) for o, _ in BAD_OPTIONS])
async def test_invalid_watermark_options_get_invalid_arg(grpc_url, options, mentions):
    result = await stream(grpc_url, "tts", TEXT, {"max_audio_length_ms": 400, **options})
    assert result.error is not None and not result.chunks
    # Triton prefixes errors from a composing model with "in ensemble 'tts', ".
    assert re.match(rf"(in ensemble 'tts', )?INVALID_ARG: {mentions} must be", result.error.message())


async def test_watermarker_validates_options_itself(grpc_url):
    """Called directly (not behind csm_1b's checks), the watermarker rejects bad options too."""

    def tensor(name, array, dtype):
        t = InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    inputs = [
        tensor("audio", np.zeros(1920, np.float32), "FP32"),
        tensor("stream_id", np.array([b"direct"], dtype=np.object_), "BYTES"),
        tensor("chunk_index", np.array([0], np.int32), "INT32"),
        tensor("is_last", np.array([True]), "BOOL"),
        tensor("sample_offset", np.array([0], np.int64), "INT64"),
    ]
    bad = await stream(grpc_url, "watermarker", "", {"watermark_key": "1,2"}, inputs=inputs)
    assert bad.error is not None and bad.error.message().startswith("INVALID_ARG: watermark_key")
    good = await stream(grpc_url, "watermarker", "", {}, inputs=inputs)
    assert good.error is None and good.audio.size == 1920 and summary(good) == [(0, True, True, b"public")]


def test_server_settings(tmp_path_factory):
    """An invalid server key stops the model from loading with a clear message; a private key is never logged."""
    repo = tmp_path_factory.mktemp("triton-settings") / "model_repository"
    with pytest.raises(TritonStartError) as info:
        start_triton(repo, TINY_CSM, TINY_WATERMARK, CSM_WATERMARK_KEY="17,42,99,250,999")
    message = str(info.value)
    assert "[watermarker] invalid server watermark setting: CSM_WATERMARK_KEY must be exactly 5" in message
    assert "17,42,99,250,999" not in message
    # Log lines start with timestamps and pids, so look for the bad value only in the error texts themselves.
    reasons = re.findall(r"invalid server watermark setting: ([^\\\n]*)", message)
    assert reasons and not any("999" in reason for reason in reasons)

    server = start_triton(
        repo, TINY_CSM, TINY_WATERMARK, CSM_WATERMARK_KEY="17,42,99,250,3", CSM_WATERMARK_ENABLED="false"
    )
    try:

        async def run():
            default = await stream(server.grpc_url, "tts", TEXT, {"max_audio_length_ms": 400})
            on = await stream(server.grpc_url, "tts", TEXT, {"max_audio_length_ms": 400, "watermark": True})
            return default, on

        default, on = asyncio.run(run())
        assert {(c[2], c[3]) for c in summary(default)} == {(False, b"none")}
        assert {(c[2], c[3]) for c in summary(on)} == {(True, key_id((17, 42, 99, 250, 3)).encode())}
        log = server.log_text()
        assert "17,42,99,250,3" not in log and "17, 42, 99, 250, 3" not in log
        assert "PUBLIC key" not in log and "[watermarker] loaded" in log
    finally:
        server.stop()
