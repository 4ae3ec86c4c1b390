"""Batched streaming Mimi decode (`CodecSlots`, csm_tts/speech/codec_stream.py) and the engine's `take_chunks`: streams
joining and leaving at different frames, with different chunk sizes in one call, equal each stream decoded alone and a
one-shot decode of its codes; a reused slot starts from silence; bad input is refused.

Tolerance: batching changes how matrix products and convolutions split their sums, so a stream decoded in a batch
differs from the same stream decoded alone in the last bits: measured up to 4e-7 with the tiny codec (peaks ~0.9) and
1.3e-6 with the real-size codec (scripts/bench_codec.py); TOLERANCE leaves a margin over both.
"""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
import torch
from codec_reference import decode_all

from csm_tts import SAMPLES_PER_FRAME
from csm_tts.speech.codec_stream import CodecSlots
from csm_tts.speech.engine import CsmEngine
from csm_tts.speech.request import GenerationRequest
from csm_tts.speech.stream import NoFreeSlot

TOLERANCE = 5e-6
MAX_FRAMES = 10  # the chunk schedule's largest chunk: a stream bringing more is decoded in several passes
# Frames each stream brings per round, cycled: mixed sizes in one call, 0 (not in this round's call), a backlog (12).
TEXTS = ("Hello there.", "How are you doing today, my friend?", "Fine, thank you very much for asking.")
PATTERNS = ([2, 4, 8, 10], [1], [3, 7], [10], [5, 12], [0, 2, 9], [6], [4, 0, 1])


class Owner:
    """A stream, as far as a slot's ownership goes."""


def random_codes(frames: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2048, (frames, 32), generator=torch.Generator().manual_seed(seed))


def plan(streams: int) -> list[dict]:
    """Per stream: the round it joins, its codes, its chunk pattern, and the round it is dropped unfinished (or None).
    Stream 0 is short and leaves early; from 3 streams on, the last one joins after it, in its slot, and stream 1 is
    dropped mid-way."""
    out = []
    for i in range(streams):
        joins = 9 if i == streams - 1 and streams > 2 else (i + 1) // 2
        frames = 6 if i == 0 else 24 + 7 * i  # > 12 frames: the tiny codec's 24-step window is crossed
        dropped = 5 if i == 1 and streams > 2 else None
        out.append({"joins": joins, "codes": random_codes(frames, seed=i), "pattern": PATTERNS[i % len(PATTERNS)],
                    "dropped": dropped})  # fmt: skip
    return out


def run_batched(codec, streams: list[dict], decoder: CodecSlots | None = None):
    """Every round, one `decode` call for all streams that bring frames. Returns each stream's audio, its chunk sizes
    and its slot, and how many calls mixed chunk sizes."""
    decoder = decoder or CodecSlots(codec, len(streams), MAX_FRAMES)
    owners, slots = [None] * len(streams), [None] * len(streams)
    sent, sizes, audio = [0] * len(streams), [[] for _ in streams], [[] for _ in streams]
    round_ = mixed = 0
    while any(s["codes"].shape[0] > sent[i] and s["dropped"] != -1 for i, s in enumerate(streams)) and round_ < 99:
        work, members = [], []
        for i, stream in enumerate(streams):
            if stream["joins"] == round_:
                owners[i] = Owner()
                slots[i] = decoder.claim(owners[i])
            if owners[i] is None:
                continue
            if stream["dropped"] == round_:
                decoder.free(slots[i], owners[i])
                owners[i] = None
                stream["dropped"] = -1
                continue
            pattern = stream["pattern"]
            frames = min(pattern[len(sizes[i]) % len(pattern)], stream["codes"].shape[0] - sent[i])
            sizes[i].append(frames)
            if frames:
                work.append((slots[i], stream["codes"][sent[i] : sent[i] + frames]))
                members.append(i)
                sent[i] += frames
        mixed += len({codes.shape[0] for _, codes in work}) > 1
        for i, samples in zip(members, decoder.decode(work), strict=True):
            audio[i].append(samples)
            if sent[i] == streams[i]["codes"].shape[0]:
                owners[i] = None  # finished: dropped without `free`, its slot comes back as well
        round_ += 1
    return [np.concatenate(a) for a in audio], sizes, slots, mixed


def run_alone(codec, codes: torch.Tensor, sizes: list[int]) -> np.ndarray:
    decoder = CodecSlots(codec, 1, MAX_FRAMES)
    owner = Owner()
    slot = decoder.claim(owner)
    audio, sent = [], 0
    for frames in sizes:
        if frames:
            audio.append(decoder.decode([(slot, codes[sent : sent + frames])])[0])
            sent += frames
    return np.concatenate(audio)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_streams_batched_equal_each_alone_and_one_shot(engine, count):
    codec = engine.model.codec_model
    streams = plan(count)
    assert codec.config.sliding_window < 24 * 2  # every stream but the short first one crosses the window
    batched, sizes, slots, mixed = run_batched(codec, streams)
    if count > 1:
        assert mixed, "calls should mix chunk sizes"
    if count > 2:
        assert slots[-1] == slots[0], "the last stream should take the slot the first one left"
    for i, stream in enumerate(streams):
        decoded = sum(sizes[i])
        assert batched[i].shape == (decoded * SAMPLES_PER_FRAME,)
        alone = run_alone(codec, stream["codes"], sizes[i])
        one_shot = decode_all(codec, stream["codes"][:decoded])
        assert np.abs(batched[i] - alone).max() <= TOLERANCE, i
        assert np.abs(batched[i] - one_shot).max() <= TOLERANCE, i
        assert np.abs(one_shot).max() > 0.05  # real audio, not silence that matches anything
    if count > 2:
        assert sum(sizes[1]) < streams[1]["codes"].shape[0]  # dropped unfinished


def test_the_convolutions_stream_at_the_real_size():
    """transformers' `MimiConfig()` is the real codec (250-step window, 8 layers, SEANet 64 filters), random weights:
    two streams with different chunk sizes in the same calls. 12 frames are 24 transformer steps: the window's ring
    never wraps here (the tiny codec's window does, in the tests above), the convolutions are checked at full size."""
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(0)
    codec = MimiModel(MimiConfig()).eval()
    decoder = CodecSlots(codec, 2, MAX_FRAMES)
    owners = [Owner(), Owner()]
    slots = [decoder.claim(o) for o in owners]
    codes = [random_codes(12, seed=s) for s in (1, 2)]
    audio = [[], []]
    for first, second in ((2, 4), (4, 1), (6, 7)):
        out = decoder.decode([(slots[0], codes[0][:first]), (slots[1], codes[1][:second])])
        codes = [codes[0][first:], codes[1][second:]]
        audio[0].append(out[0])
        audio[1].append(out[1])
    for seed, parts in zip((1, 2), audio, strict=True):
        one_shot = decode_all(codec, random_codes(12, seed)[: sum(p.size for p in parts) // SAMPLES_PER_FRAME])
        assert np.abs(np.concatenate(parts) - one_shot).max() <= 10 * TOLERANCE


def test_a_reused_slot_starts_from_silence(engine):
    codec = engine.model.codec_model
    decoder = CodecSlots(codec, 1, MAX_FRAMES)
    first = Owner()
    slot = decoder.claim(first)
    for start in range(0, 30, 10):  # fill every state of the slot with the first stream's history
        decoder.decode([(slot, random_codes(30, seed=3)[start : start + 10])])
    decoder.free(slot, first)
    second = Owner()
    assert decoder.claim(second) == slot
    codes = random_codes(14, seed=4)
    reused = np.concatenate([decoder.decode([(slot, codes[i : i + n])])[0] for i, n in ((0, 2), (2, 4), (6, 8))])
    assert np.array_equal(reused, run_alone(codec, codes, [2, 4, 8]))


def test_a_call_for_a_slot_that_changed_hands_touches_nothing(engine):
    """The output stage may still hold a released stream's frames when the slot passes to a new stream."""
    codec = engine.model.codec_model
    decoder = CodecSlots(codec, 2, MAX_FRAMES)
    old, keeper = Owner(), Owner()
    slot, other = decoder.claim(old), decoder.claim(keeper)
    decoder.decode([(slot, random_codes(10, seed=5))], owners=[old])
    decoder.free(slot, old)
    new = Owner()
    assert decoder.claim(new) == slot
    late, kept = decoder.decode(
        [(slot, random_codes(4, seed=6)), (other, random_codes(4, seed=7))], owners=[old, keeper]
    )
    assert late.size == 0 and kept.size == 4 * SAMPLES_PER_FRAME
    codes = random_codes(6, seed=8)
    mine = np.concatenate([decoder.decode([(slot, codes[i : i + 3])], owners=[new])[0] for i in (0, 3)])
    assert np.array_equal(mine, run_alone(codec, codes, [3, 3]))


def test_slots_are_claimed_freed_and_checked(engine):
    decoder = CodecSlots(engine.model.codec_model, 2, MAX_FRAMES)
    a, b = Owner(), Owner()
    assert (decoder.claim(a), decoder.claim(b)) == (0, 1) and decoder.slots_taken == 2
    with pytest.raises(NoFreeSlot):
        decoder.claim(Owner())
    decoder.free(0, b)  # not b's slot: nothing happens
    assert decoder.slots_taken == 2
    del a
    gc.collect()
    assert decoder.slots_taken == 1  # an owner that is gone frees its slot
    c = Owner()
    assert decoder.claim(c) == 0
    codes = random_codes(2, seed=0)
    bad = {
        "not claimed": [(5, codes)],
        "at most once": [(0, codes), (0, codes)],
        "shape": [(0, codes[:, :8])],
        "lie in": [(0, codes + 2048)],
    }
    for message, work in bad.items():
        with pytest.raises(ValueError, match=message):
            decoder.decode(work)
    decoder.free(0, c)
    decoder.free(0, c)  # idempotent
    assert decoder.slots_taken == 1
    assert decoder.decode([(1, codes[:0])])[0].size == 0


def test_engine_take_chunks_equals_each_stream_alone(tiny_csm_dir):
    """Streams joining at different frames, each round's due chunks taken in one call, against each stream generated
    alone. A finished stream gives its backbone slot back at once and its codec slot with its last chunk."""
    engine = CsmEngine.from_dir(tiny_csm_dir, max_streams=4)
    requests = {
        f: GenerationRequest(
            f"Stream {f} speaks.", temperature=0, speaker_id=f % 3, max_audio_length_ms=(9 + 4 * f) * 80
        )
        for f in (0, 2, 5)
    }
    streams, chunks = {}, {f: [] for f in requests}
    for frame in range(40):
        if frame in requests:
            streams[frame] = engine.start(requests[frame])
        engine.step_many(list(streams.values()))
        due = [(f, s) for f, s in streams.items() if s.codec_slot is not None and engine.chunk_ready(s)]
        for (f, stream), chunk in zip(due, engine.take_chunks([s for _, s in due]), strict=True):
            chunks[f].append(chunk)
            if stream.finished:
                assert stream.slot is None and stream.codec_slot is None
    assert engine.streams_active == 0 and engine.codec.slots_taken == 0
    alone = CsmEngine.from_dir(tiny_csm_dir, max_streams=1)
    for f, request in requests.items():
        reference = list(alone.generate(request))
        got = chunks[f]
        assert [(c.index, c.sample_offset, c.is_last, c.finish_reason) for c in got] == [
            (c.index, c.sample_offset, c.is_last, c.finish_reason) for c in reference
        ]
        for mine, theirs in zip(got, reference, strict=True):
            assert mine.audio.shape == theirs.audio.shape
            assert np.abs(mine.audio - theirs.audio).max() <= TOLERANCE


def test_take_chunks_refuses_a_released_stream_before_touching_any(engine):
    kept = engine.start(GenerationRequest("Kept.", seed=1, max_audio_length_ms=800))
    dropped = engine.start(GenerationRequest("Dropped.", seed=2, max_audio_length_ms=800))
    engine.step_many([kept, dropped])
    engine.release(dropped)
    with pytest.raises(ValueError, match="no codec slot"):
        engine.take_chunks([kept, dropped])
    with pytest.raises(ValueError, match="twice"):
        engine.take_chunks([kept, kept])
    assert len(kept.pending) == 1  # nothing was taken
    assert engine.take_chunks([kept])[0].audio.size == SAMPLES_PER_FRAME
    engine.release(kept)
    assert engine.codec.slots_taken == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs); none is visible")
def test_graph_replay_equals_eager_on_a_gpu(tiny_csm_dir):
    from csm_tts.speech.checkpoint import load_csm

    model, _ = load_csm(tiny_csm_dir, device="cuda", dtype=torch.float32)
    codec = model.codec_model
    graphs = CodecSlots(codec, 8, MAX_FRAMES, cuda_graphs=True)
    assert graphs.capture_graphs() == len(graphs.row_buckets) * len(graphs.frame_buckets)
    replayed, sizes, _, _ = run_batched(codec, plan(8), graphs)
    eager, eager_sizes, _, _ = run_batched(codec, plan(8), CodecSlots(codec, 8, MAX_FRAMES))
    assert sizes == eager_sizes
    for mine, reference in zip(replayed, eager, strict=True):
        assert mine.shape == reference.shape and np.abs(mine - reference).max() <= TOLERANCE


def test_a_codec_slot_left_by_a_cancelled_stream_leaks_nothing(tiny_csm_dir):
    engine = CsmEngine.from_dir(tiny_csm_dir, max_streams=1)
    fresh = CsmEngine.from_dir(tiny_csm_dir, max_streams=1)
    old = engine.start(GenerationRequest(TEXTS[0], seed=3, max_audio_length_ms=40 * 80))
    for _ in range(12):  # chunks of 2 and 4 frames decoded, 6 frames pending: its codec slot holds their history
        engine.step(old)
        if engine.chunk_ready(old):
            engine.take_chunk(old)
    slot = old.codec_slot
    engine.release(old)  # cancelled mid-stream
    request = GenerationRequest(TEXTS[1], seed=4, max_audio_length_ms=9 * 80)
    new = engine.start(request)
    assert new.codec_slot == slot
    audio = []
    while not (new.finished and new.codec_slot is None):
        engine.step(new)
        if engine.chunk_ready(new):
            audio.append(engine.take_chunk(new).audio)
    assert np.array_equal(np.concatenate(audio), np.concatenate([c.audio for c in fresh.generate(request)]))


def test_take_chunks_beside_a_stepping_thread(tiny_csm_dir):
    """The split that the output stage uses: one thread steps and cuts each due chunk (the engine's thread rule),
    another takes the cut chunks whenever there are some. No frame is lost or repeated, each stream ends with exactly
    one last chunk, and its audio equals the stream alone."""
    engine = CsmEngine.from_dir(tiny_csm_dir, max_streams=4)
    requests = [
        GenerationRequest(TEXTS[i], temperature=0, speaker_id=i, max_audio_length_ms=(11 + 5 * i) * 80)
        for i in range(3)
    ]
    streams = [engine.start(r) for r in requests]
    chunks = {id(s): [] for s in streams}
    taking: set[int] = set()  # streams whose cut chunk the taker holds: not cut again until it is taken
    last_cut: set[int] = set()
    deadline = time.monotonic() + 120

    def step():
        while len(last_cut) < len(streams) and time.monotonic() < deadline:
            # Like the scheduler: a stream whose next chunk is due while its last one is not taken waits.
            running = [s for s in streams if not s.finished and not (s.due is not None and engine.chunk_ready(s))]
            if running:
                engine.step_many(running)
            for s in streams:
                if s.due is None and id(s) not in taking and id(s) not in last_cut and engine.chunk_ready(s):
                    if s.finished:
                        last_cut.add(id(s))
                    engine.cut_chunk(s)
            if not running:
                time.sleep(0.001)

    stepper = threading.Thread(target=step)
    stepper.start()
    while any(not c or not c[-1].is_last for c in chunks.values()) and time.monotonic() < deadline:
        due = [s for s in streams if s.due is not None]
        taking.update(id(s) for s in due)
        for stream, chunk in zip(due, engine.take_chunks(due), strict=True):
            chunks[id(stream)].append(chunk)
        taking.clear()
        time.sleep(0.001)
    stepper.join(10)
    assert engine.codec.slots_taken == 0 and engine.streams_active == 0
    alone = CsmEngine.from_dir(tiny_csm_dir, max_streams=1)
    for stream, request in zip(streams, requests, strict=True):
        got = chunks[id(stream)]
        assert [c.index for c in got] == list(range(len(got))) and [c.is_last for c in got].count(True) == 1
        assert [c.sample_offset for c in got] == np.cumsum([0] + [c.audio.size for c in got[:-1]]).tolist()
        mine = np.concatenate([c.audio for c in got])
        reference = np.concatenate([c.audio for c in alone.generate(request)])
        assert mine.shape == reference.shape and np.abs(mine - reference).max() <= TOLERANCE
