"""The watermarker's batching (issue 20): many streams in one pass equal each stream alone, the minimum message length,
and the queue that drops a cancelled stream's chunks however long it is. Random weights in silentcipher's layout
(real-size networks): speed and lengths are meaningful, detection is not.

Batched output equals per-stream output to BATCH_TOLERANCE (absolute, on audio of peak ~0.3): the packed convolution
may sum in another order than a stream's own; measured differences are ~1e-8. With pack_frames 1 (one convolution
call per stream, the CPU default) it is bit-exact.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_watermark import FRAME, KEY, TOLERANCE, one_torch_thread, speech_like  # noqa: F401 (autouse fixture)

from csm_tts.watermark.batching import ChunkQueue, QueuedChunk
from csm_tts.watermark.streaming import StreamingWatermarker, watermark_together
from csm_tts.watermark.streams import Chunk, WatermarkStreams
from csm_tts.watermark.weights import load_watermark_model

ROOT = Path(__file__).resolve().parent.parent
BATCH_TOLERANCE = 1e-6
MIN_CHUNK = 2400  # 100 ms at 24 kHz


@pytest.fixture(scope="module")
def model(tiny_watermark_dir):
    return load_watermark_model(tiny_watermark_dir)


def schedule(seconds: float, sizes: list[int]) -> list[int]:
    """Chunk sizes that cover `seconds` of audio, cycling through `sizes`."""
    total, out = int(seconds * 24000), []
    for size in itertools.cycle(sizes):
        if sum(out) >= total:
            return out
        out.append(min(size, total - sum(out)))


# Eight streams: different lengths, chunk schedules, keys, and joining at different passes (start).
STREAMS = [
    # (start pass, seconds, chunk sizes, key or None: watermark off)
    (0, 1.2, [2 * FRAME, 4 * FRAME, 8 * FRAME], KEY),
    (0, 0.5, [FRAME], (9, 8, 7, 6, 5)),
    (1, 0.9, [3 * FRAME, 1000], KEY),
    (1, 0.3, [5 * FRAME], None),
    (2, 0.7, [2 * FRAME], (200, 1, 2, 3, 4)),
    (3, 1.0, [10 * FRAME], KEY),
    (3, 0.2, [777, 5000], (5, 5, 5, 5, 5)),
    (5, 0.4, [FRAME, 2 * FRAME], KEY),
]


def audio_of(i: int, seconds: float) -> np.ndarray:
    return speech_like(seconds, seed=100 + i)


def alone(model, key, chunks) -> np.ndarray:
    if key is None:
        return np.concatenate(chunks)
    w = StreamingWatermarker(model, key)
    return np.concatenate([w.push(c) for c in chunks] + [w.flush()])


@pytest.mark.parametrize("count, pack_frames", [(1, None), (3, 8), (8, None), (8, 1)])
def test_streams_batched_in_passes_equal_each_stream_alone(model, count, pack_frames):
    """Streams join and leave at different passes; each pass takes one chunk per stream (the last one also flushes)."""
    plans = STREAMS[:count]
    audio = [audio_of(i, seconds) for i, (_, seconds, _, _) in enumerate(plans)]
    chunks = [np.split(a, np.cumsum(schedule(s, sizes))[:-1]) for a, (_, s, sizes, _) in zip(audio, plans, strict=True)]
    streams = WatermarkStreams(model, pack_frames=pack_frames)
    out: list[list[np.ndarray]] = [[] for _ in plans]
    passes = max(start + len(c) for (start, *_), c in zip(plans, chunks, strict=True))
    for p in range(passes):
        batch = []
        for i, ((start, _, _, key), cs) in enumerate(zip(plans, chunks, strict=True)):
            k = p - start
            if 0 <= k < len(cs):
                offset = sum(c.size for c in cs[:k])
                batch.append(Chunk(f"s{i}", key, "k", cs[k], k, offset, k == len(cs) - 1))
        for chunk, result in zip(batch, streams.process_batch(batch), strict=True):
            assert not isinstance(result, Exception), result
            out[int(chunk.stream_id[1:])].append(result.audio)
            assert result.is_last == chunk.is_last
    assert len(streams) == 0  # every stream ended and was forgotten
    for (_, _, _, key), cs, a, parts in zip(plans, chunks, audio, out, strict=True):
        mine = np.concatenate(parts)
        assert mine.shape == a.shape
        assert np.abs(mine - alone(model, key, cs)).max() <= BATCH_TOLERANCE
        if pack_frames == 1:  # one convolution call per stream (the CPU default): bit-exact
            assert np.array_equal(mine, alone(model, key, cs))
        # chunking invariance holds in a batch too: one push of the whole clip, alone
        assert np.abs(mine - alone(model, key, [a])).max() <= TOLERANCE


def test_one_pass_rejects_a_stream_twice_and_a_push_after_the_end(model):
    w = StreamingWatermarker(model, KEY)
    x = audio_of(0, 0.1)
    with pytest.raises(ValueError, match="twice"):
        watermark_together([(w, x), (w, x)])
    w.push(x)
    w.flush()
    assert w.flush().size == 0
    with pytest.raises(RuntimeError, match="after flush"):
        watermark_together([(StreamingWatermarker(model, KEY), x), (w, x)])


@pytest.mark.parametrize("key", [KEY, None], ids=["watermark-on", "watermark-off"])
@pytest.mark.parametrize("sizes", [[FRAME], [2 * FRAME], [3 * FRAME, 6 * FRAME], [500, 9000]])
def test_no_message_below_the_minimum_except_the_last(model, key, sizes):
    x = audio_of(3, 1.1)
    chunks = np.split(x, np.cumsum(schedule(1.1, sizes))[:-1])
    streams = WatermarkStreams(model, min_chunk_samples=MIN_CHUNK)
    offsets = np.cumsum([0] + [c.size for c in chunks])
    results = [
        streams.process("a", key, "k", c, i, int(offsets[i]), i == len(chunks) - 1) for i, c in enumerate(chunks)
    ]
    sizes_out = [r.audio.size for r in results]
    assert all(n == 0 or n >= MIN_CHUNK for n in sizes_out[:-1]), sizes_out
    assert [r.chunk_index for r in results] == list(range(len(chunks)))  # one response per chunk, held or not
    assert np.abs(np.concatenate([r.audio for r in results]) - alone(model, key, chunks)).max() <= BATCH_TOLERANCE
    if key is None and chunks[0].size >= MIN_CHUNK:
        assert sizes_out[0] == chunks[0].size  # nothing held back without the watermark


def test_first_message_sizes_by_first_chunk(model):
    """What csm_1b's first chunk must be for the first watermarked message to meet 100 ms (printed for the docs)."""
    x = audio_of(4, 2.0)
    first = {}
    for frames in range(1, 6):
        w = StreamingWatermarker(model, KEY)
        first[frames] = w.push(x[: frames * FRAME]).size
    print("first message samples by first chunk frames:", first)
    assert first[3] >= MIN_CHUNK > first[2]


# -- the queue -------------------------------------------------------------------------------------------------------


class Request:
    def __init__(self, cancelled=False):
        self.cancelled = cancelled
        self.asked = 0

    def is_cancelled(self):
        self.asked += 1
        return self.cancelled


def queued(stream_id: str, index: int, cancelled=False, is_last=False, arrived: float | None = None) -> QueuedChunk:
    chunk = QueuedChunk(stream_id, FRAME, (index + 1) * FRAME, is_last, Request(cancelled))
    if arrived is not None:
        chunk.arrived = arrived
    return chunk


def new_queue(**options) -> ChunkQueue:
    return ChunkQueue(lambda request: request.is_cancelled(), **options)


def test_a_pass_takes_one_chunk_per_stream_oldest_first_in_order():
    q = new_queue()
    for chunk in [queued("a", 0), queued("a", 1), queued("b", 0), queued("a", 2), queued("c", 0), queued("b", 1)]:
        q.put(chunk)
    assert q.depth == (6, 6 * FRAME)
    taken = []
    while (step := q.next_pass(timeout=0)) is not None:
        assert not step.dropped
        taken.append([(c.stream_id, c.progress // FRAME - 1) for c in step.batch])
    assert taken == [[("a", 0), ("b", 0), ("c", 0)], [("a", 1), ("b", 1)], [("a", 2)]]
    assert q.depth == (0, 0)


def test_a_pass_takes_at_most_max_streams():
    q = new_queue(max_streams_per_pass=2)
    for s in "abc":
        q.put(queued(s, 0))
    assert [c.stream_id for c in q.next_pass(timeout=0).batch] == ["a", "b"]
    assert [c.stream_id for c in q.next_pass(timeout=0).batch] == ["c"]


def test_a_cancelled_streams_queued_chunks_are_dropped_however_long_the_queue():
    """Triton marks only the chunk that arrived after the client's cancel: that one drops all its stream's chunks."""
    q = new_queue()
    for i in range(500):
        q.put(queued("gone", i))
        if i % 50 == 0:
            q.put(queued(f"live{i}", 0))
    q.put(queued("gone", 500, cancelled=True))
    step = q.next_pass(timeout=0)
    assert step.cancelled == ["gone"]
    assert len(step.dropped) == 501 and {c.stream_id for c in step.dropped} == {"gone"}
    assert [c.stream_id for c in step.batch] == [f"live{i}" for i in range(0, 500, 50)]
    assert [c.progress for c in step.dropped] == [(i + 1) * FRAME for i in range(501)]  # in order, for csm_1b
    assert q.depth == (0, 0)
    # Chunks that come later (csm_1b's last ones before it stops) are dropped too, and the stream is reported once.
    q.put(queued("gone", 501, is_last=True))
    step = q.next_pass(timeout=0)
    assert step.cancelled == [] and [c.is_last for c in step.dropped] == [True] and not step.batch
    assert not q.stopped("gone")  # forgotten after its last chunk


def test_every_queued_request_is_asked_each_pass():
    q = new_queue(max_streams_per_pass=1)
    chunks = [queued("a", 0), queued("a", 1), queued("b", 0)]
    for c in chunks:
        q.put(c)
    q.next_pass(timeout=0)
    assert [c.request.asked for c in chunks] == [1, 1, 1]
    q.next_pass(timeout=0)  # "a" 1 and "b" 0 were still queued
    assert [c.request.asked for c in chunks] == [1, 2, 2]


def test_a_stopped_stream_loses_its_queued_and_later_chunks():
    q = new_queue()
    q.put(queued("failed", 0))
    q.put(queued("failed", 1))
    q.stop("failed")
    q.put(queued("failed", 2))
    step = q.next_pass(timeout=0)
    assert step.cancelled == [] and len(step.dropped) == 3 and not step.batch


def test_a_failing_cancel_question_keeps_the_chunk():
    def broken(_):
        raise RuntimeError("server gone")

    q = ChunkQueue(broken)
    q.put(queued("a", 0))
    assert [c.stream_id for c in q.next_pass(timeout=0).batch] == ["a"]


def test_close_returns_what_is_left_and_refuses_more():
    q = new_queue()
    q.put(queued("a", 0))
    assert q.next_pass(timeout=0.01) is not None
    assert q.next_pass(timeout=0.01) is None  # empty: waits, then nothing
    q.put(queued("a", 1))
    left = q.close()
    assert [c.progress for c in left] == [2 * FRAME]
    started = time.monotonic()
    assert q.next_pass(timeout=5) is None and time.monotonic() - started < 1  # closed: no wait
    waiting = new_queue()
    woken = []
    thread = threading.Thread(target=lambda: woken.append(waiting.next_pass(timeout=30)))
    thread.start()
    time.sleep(0.1)
    waiting.close()  # wakes the batching thread at once
    thread.join(5)
    assert not thread.is_alive() and woken == [None]
    with pytest.raises(RuntimeError, match="shutting down"):
        q.put(queued("a", 2))


def test_bench_watermark_script_prints_equal_outputs_and_the_first_message_table(tmp_path, capsys):
    """scripts/bench_watermark.py on a tiny load: every batched variant equals the per-stream output."""
    spec = importlib.util.spec_from_file_location("bench_watermark", ROOT / "scripts" / "bench_watermark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    result = bench.main(["--streams", "2", "--seconds", "0.4", "--pack", "1,0", "--rounds", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    [row] = result["rows"]
    assert row["batched_pack_1"]["max_abs_diff"] == 0 and row["batched_pack_all"]["max_abs_diff"] <= BATCH_TOLERANCE
    first = {r["first_chunk_frames"]: r for r in result["first_message"]}
    assert first[2]["first_message"] < MIN_CHUNK <= first[3]["first_message"]
    for r in first.values():  # the hold-back adds up (each part rounded to a 24 kHz sample)
        assert abs(r["first_message"] + r["up_resampler"] + r["stft"] + r["down_resampler"] - r["input"]) <= 2
    assert "first chunk -> first message" in capsys.readouterr().out


def test_a_new_streams_first_chunk_goes_before_audio_its_listeners_have_in_hand():
    """Playback deadlines: a stream's first chunk is due at once; a running stream's next chunk when its listener
    reaches it. So a joining stream does not wait behind the running streams' queued audio."""
    q = new_queue(max_streams_per_pass=1)
    for i in range(3):
        q.put(queued("running", i, arrived=100.0))
    assert [c.stream_id for c in q.next_pass(timeout=0).batch] == ["running"]  # its first chunk: due now
    q.put(queued("joining", 0, arrived=100.01))  # due at 100.01 s; "running" 1 at 100.08 s, 2 at 100.16 s
    taken = [q.next_pass(timeout=0).batch[0] for _ in range(3)]
    assert [(c.stream_id, c.progress // FRAME - 1) for c in taken] == [("joining", 0), ("running", 1), ("running", 2)]


def test_a_stream_behind_real_time_goes_before_a_new_one():
    q = new_queue(max_streams_per_pass=1)
    late = QueuedChunk("late", FRAME, 51 * FRAME, False, Request(False), arrived=time.monotonic() - 10.0)
    q.put(QueuedChunk("late", FRAME, FRAME, False, Request(False), arrived=time.monotonic() - 10.0))
    assert q.next_pass(timeout=0).batch[0].stream_id == "late"  # started 10 s ago
    q.put(queued("new", 0))
    q.put(late)  # 4 s of audio delivered in 10 s: its listener has been waiting for 6 s
    assert [q.next_pass(timeout=0).batch[0].stream_id for _ in range(2)] == ["late", "new"]
