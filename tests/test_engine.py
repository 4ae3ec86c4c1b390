"""The CSM engine on the tiny random checkpoint: equality with transformers' generate, streaming exactness, stopping,
seeding, the codebook mask and context segments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from codec_reference import decode_all

from csm_tts import SAMPLES_PER_FRAME
from csm_tts.speech.chunk_schedule import ChunkSchedule
from csm_tts.speech.engine import CsmEngine
from csm_tts.speech.request import ContextSegment, GenerationRequest, InvalidRequest
from csm_tts.speech.sampling import sample_codes

TEXT = "Hello from Sesame."


def run_to_end(engine: CsmEngine, request: GenerationRequest):
    stream = engine.start(request)
    while not stream.finished:
        engine.step(stream)
    return stream


def test_greedy_codes_equal_transformers_generate(engine):
    request = GenerationRequest(text=TEXT, speaker_id=1, temperature=0, max_audio_length_ms=12 * 80)
    mine = torch.stack(run_to_end(engine, request).pending)
    conversation = [{"role": "1", "content": [{"type": "text", "text": TEXT}]}]
    inputs = engine.processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    special = list(range(engine.codebook_size, engine.model.config.vocab_size))  # the engine never samples these
    reference = engine.model.generate(
        **inputs,
        do_sample=False,
        depth_decoder_do_sample=False,
        max_new_tokens=12,
        suppress_tokens=special,
        depth_decoder_suppress_tokens=special,
    )
    assert mine.shape == (12, 32)
    assert torch.equal(reference[0], mine)


def test_greedy_with_context_equals_generate(engine):
    rng = np.random.default_rng(0)
    context = (
        ContextSegment(speaker=0, text="Hi there.", audio=(rng.standard_normal(24000) * 0.1).astype(np.float32)),
    )
    request = GenerationRequest(text=TEXT, temperature=0, max_audio_length_ms=6 * 80, context=context)
    stream = run_to_end(engine, request)
    conversation = [
        {"role": "0", "content": [{"type": "text", "text": "Hi there."}, {"type": "audio", "audio": context[0].audio}]},
        {"role": "0", "content": [{"type": "text", "text": TEXT}]},
    ]
    inputs = engine.processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    special = list(range(engine.codebook_size, engine.model.config.vocab_size))
    reference = engine.model.generate(
        **inputs,
        do_sample=False,
        depth_decoder_do_sample=False,
        max_new_tokens=6,
        suppress_tokens=special,
        depth_decoder_suppress_tokens=special,
    )
    assert torch.equal(reference[0], torch.stack(stream.pending))
    # 1 s of context audio = 13 codec frames in the prompt, on top of both turns' text.
    without = engine.start(GenerationRequest(text=TEXT, max_audio_length_ms=80))
    assert stream.prompt_length > without.prompt_length + 13


def test_context_changes_the_output(engine):
    rng = np.random.default_rng(1)
    audio = (rng.standard_normal(12000) * 0.1).astype(np.float32)
    base = GenerationRequest(text=TEXT, temperature=0, max_audio_length_ms=4 * 80)
    with_context = GenerationRequest(
        text=TEXT, temperature=0, max_audio_length_ms=4 * 80, context=(ContextSegment(1, "Earlier words.", audio),)
    )
    assert not torch.equal(
        torch.stack(run_to_end(engine, base).pending), torch.stack(run_to_end(engine, with_context).pending)
    )


@pytest.mark.parametrize(
    "schedule",
    [ChunkSchedule(1, 1.0, 1), ChunkSchedule(2, 2.0, 10), ChunkSchedule(3, 1.5, 7), ChunkSchedule(40, 1.0, 40)],
    ids=lambda s: f"{s.first_frames}-{s.growth}-{s.max_frames}",
)
def test_streamed_chunks_equal_one_shot_decode(engine, schedule):
    engine = CsmEngine(engine.model, engine.processor, schedule=schedule)
    request = GenerationRequest(text=TEXT, seed=7, max_audio_length_ms=30 * 80)
    chunks = list(engine.generate(request))
    sizes = [c.audio.size // SAMPLES_PER_FRAME for c in chunks]
    expected = [schedule.frames_in_chunk(i) for i in range(len(chunks))]
    assert sizes[:-1] == expected[:-1] and sum(sizes) == 30
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [c.is_last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    offsets = np.cumsum([0] + [c.audio.size for c in chunks[:-1]])
    assert [c.sample_offset for c in chunks] == offsets.tolist()
    streamed = np.concatenate([c.audio for c in chunks])
    stream = run_to_end(engine, request)
    one_shot = decode_all(engine.model.codec_model, torch.stack(stream.pending))
    assert streamed.shape == one_shot.shape == (30 * SAMPLES_PER_FRAME,)
    assert np.abs(streamed - one_shot).max() <= 1e-4


def test_max_length_stops_the_stream(engine):
    stream = run_to_end(engine, GenerationRequest(text=TEXT, seed=1, max_audio_length_ms=1000))
    assert stream.finish_reason == "length"
    assert stream.frames_generated == 1000 // 80


def test_eos_frame_stops_the_stream(tiny_csm_dir):
    """Zero heads give all-equal logits; greedy takes the first id, 0, for every codebook: the all-zero EOS frame."""
    engine = CsmEngine.from_dir(tiny_csm_dir)
    with torch.no_grad():
        engine.model.lm_head.weight.zero_()
        engine.model.depth_decoder.codebooks_head.weight.zero_()
    chunks = list(engine.generate(GenerationRequest(text=TEXT, temperature=0, max_audio_length_ms=2000)))
    assert len(chunks) == 1 and chunks[0].is_last and chunks[0].finish_reason == "eos" and chunks[0].audio.size == 0
    ignored = run_to_end(engine, GenerationRequest(text=TEXT, temperature=0, max_audio_length_ms=400, ignore_eos=True))
    assert ignored.finish_reason == "length" and ignored.frames_generated == 5


def test_same_seed_same_audio_different_seed_different_audio(engine):
    def audio(seed):
        return np.concatenate(
            [c.audio for c in engine.generate(GenerationRequest(text=TEXT, seed=seed, max_audio_length_ms=800))]
        )

    assert np.array_equal(audio(11), audio(11))
    assert not np.array_equal(audio(11), audio(12))


def rows(n, temperature, topk):
    return torch.full((n,), float(temperature)), torch.full((n,), topk)


def test_sampling_never_picks_ids_outside_the_codebook():
    logits = torch.zeros(4, 2051)
    logits[:, 2048:] = 100.0  # the special ids are by far the most likely
    generator = torch.Generator().manual_seed(0)
    for temperature, topk in ((0.0, 50), (0.9, 50), (2.0, 2051)):
        for _ in range(50):
            ids = sample_codes(logits.clone(), *rows(4, temperature, topk), torch.rand(4, generator=generator), 2048)
            assert int(ids.max()) < 2048


def test_topk_one_is_greedy_and_rows_keep_their_own_settings():
    logits = torch.randn(3, 2051, generator=torch.Generator().manual_seed(0))
    logits[:, 2048:] = -1e9
    uniforms = torch.tensor([0.3, 0.99, 0.999])
    assert torch.equal(sample_codes(logits.clone(), *rows(3, 0.9, 1), uniforms, 2048), logits.argmax(-1))
    mixed = sample_codes(logits.clone(), torch.tensor([0.0, 0.9, 0.9]), torch.tensor([50, 1, 2048]), uniforms, 2048)
    assert mixed[0] == logits[0].argmax() and mixed[1] == logits[1].argmax() and mixed[2] != logits[2].argmax()


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]]))
    uniforms = torch.linspace(0.001, 0.999, 1000)
    ids = torch.cat([sample_codes(logits.clone(), *rows(1, 1.0, 3), u[None], 4) for u in uniforms])
    counts = torch.bincount(ids, minlength=4) / 1000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.01)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(text="   "), "non-empty"),
        (dict(text="x", speaker_id=-1), "speaker_id"),
        (dict(text="x", speaker_id=999), "speaker_id"),
        (dict(text="x", temperature=3.0), "temperature"),
        (dict(text="x", topk=0), "topk"),
        (dict(text="x", max_audio_length_ms=10), "max_audio_length_ms"),
        (dict(text="x", max_audio_length_ms=10**7), "max_audio_length_ms"),
        (dict(text="x", seed=-4), "seed"),
        (dict(text="x", context=(ContextSegment(0, "a", np.zeros(0, np.float32)),)), "context segment 0"),
        (dict(text="x", context=(ContextSegment(0, "a", np.array([np.nan], np.float32)),)), "NaN"),
    ],
)
def test_invalid_requests_are_rejected_with_a_clear_message(engine, kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        engine.start(GenerationRequest(**kwargs))


def test_prompt_that_does_not_fit_the_context_is_rejected(engine):
    with pytest.raises(InvalidRequest, match="context holds 2048"):
        engine.start(GenerationRequest(text="word " * 900, max_audio_length_ms=90_000))


def test_chunk_schedule_grows_to_its_cap():
    schedule = ChunkSchedule(first_frames=2, growth=2.0, max_frames=10)
    assert [schedule.frames_in_chunk(i) for i in range(5)] == [2, 4, 8, 10, 10]
    with pytest.raises(ValueError):
        ChunkSchedule(first_frames=0)


def test_kv_cache_grows_one_position_per_frame(engine):
    stream = engine.start(GenerationRequest(text=TEXT, seed=0, max_audio_length_ms=5 * 80))
    after_prefill = stream.kv_cache_bytes
    assert after_prefill == stream.prompt_length * engine.kv_bytes_per_position
    for _ in range(3):
        engine.step(stream)
    assert stream.kv_cache_bytes == (stream.prompt_length + 3) * engine.kv_bytes_per_position
