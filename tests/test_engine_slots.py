"""The fixed-slot engine path against the pre-slot engine (`BaselineEngine`) and transformers' `generate`: streams
joining and leaving at different frames, seeded sampling alone and batched, slot reuse, and the causal first depth
step that the pinned SDPA attention provides."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csm_tts.speech.checkpoint import load_csm
from csm_tts.speech.engine import CsmEngine
from csm_tts.speech.request import GenerationRequest
from csm_tts.speech.slots import batch_buckets, fit_slots
from csm_tts.speech.stream import NoFreeSlot
from csm_tts.tooling.baseline_engine import BaselineEngine

TEXTS = ("Hello.", "How are you doing today, my friend?", "Fine, thank you very much for asking.", "Bye now.")


def request(i: int, frames: int, **kwargs) -> GenerationRequest:
    options = {"temperature": 0, "speaker_id": i % 3, **kwargs}
    return GenerationRequest(TEXTS[i % len(TEXTS)], max_audio_length_ms=frames * 80, **options)


# Frame at which each stream joins, its request, and the frame at which it is dropped unfinished (None: runs to its
# length). Different prompt lengths; A finishes first and D takes its slot; B is cancelled while C still runs.
SCRIPT = {
    "A": (0, request(0, 5), None),
    "B": (0, request(1, 30), 9),
    "C": (3, request(2, 12), None),
    "D": (6, request(3, 8), None),
    "E": (10, request(0, 6, speaker_id=2), None),
}


def run_script(engine: CsmEngine, script=SCRIPT) -> dict[str, dict]:
    """Drive `engine` frame by frame through `script`; per stream: its codes, slot and audio."""
    streams, out, frame = {}, {}, 0
    while frame == 0 or streams:
        for name, (joins, req, _) in script.items():
            if joins == frame:
                streams[name] = engine.start(req)
                out[name] = {"slot": streams[name].slot, "audio": [], "codes": []}
        engine.step_many(list(streams.values()))
        for name, stream in list(streams.items()):
            if engine.chunk_ready(stream):
                out[name]["codes"] += stream.pending
                out[name]["audio"].append(engine.take_chunk(stream).audio)
            dropped = script[name][2] == frame
            if dropped:
                engine.release(stream)
            if dropped or (stream.finished and not stream.pending):
                out[name]["codes"] = torch.stack(out[name]["codes"] + stream.pending)
                out[name]["audio"] = np.concatenate(out[name]["audio"])
                del streams[name]
        frame += 1
    return out


def generate_codes(engine: CsmEngine, req: GenerationRequest, frames: int) -> torch.Tensor:
    conversation = [{"role": str(req.speaker_id), "content": [{"type": "text", "text": req.text}]}]
    inputs = engine.processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    special = list(range(engine.codebook_size, engine.model.config.vocab_size))
    reference = engine.model.generate(
        **inputs,
        do_sample=False,
        depth_decoder_do_sample=False,
        max_new_tokens=frames,
        suppress_tokens=special,
        depth_decoder_suppress_tokens=special,
    )
    return reference[0]


def test_batch_joining_and_leaving_equals_the_old_path_and_generate(engine):
    new = run_script(engine)
    old = run_script(BaselineEngine(engine.model, engine.processor))
    assert new["D"]["slot"] == new["A"]["slot"], "D should reuse the slot A freed"
    for name, (_, req, dropped) in SCRIPT.items():
        assert torch.equal(new[name]["codes"], old[name]["codes"]), name
        assert np.array_equal(new[name]["audio"], old[name]["audio"]), name
        frames = new[name]["codes"].shape[0]
        assert frames == (dropped + 1 if dropped is not None else req.max_audio_length_ms // 80)
        assert torch.equal(generate_codes(engine, req, frames), new[name]["codes"]), name
    assert engine.streams_active == 0


def test_one_stream_equals_the_old_path(engine):
    req = request(1, 10)
    stream = engine.start(req)
    old_engine = BaselineEngine(engine.model, engine.processor)
    old = old_engine.start(req)
    while not stream.finished:
        engine.step(stream)
        old_engine.step(old)
    assert torch.equal(torch.stack(stream.pending), torch.stack(old.pending))


@pytest.mark.parametrize("companions", [1, 3, 6])
def test_seeded_sampled_stream_is_the_same_alone_and_in_any_batch(engine, companions):
    """Every frame, not only the first: later frames come out of the batched backbone step."""
    mine = GenerationRequest(TEXTS[2], seed=1234, temperature=0.9, topk=50, max_audio_length_ms=14 * 80)
    solo = engine.start(mine)
    while not solo.finished:
        engine.step(solo)
    others = [
        engine.start(GenerationRequest(TEXTS[i % 4], seed=i, topk=[50, 2048, 5][i % 3], max_audio_length_ms=2000))
        for i in range(companions)
    ]
    for _ in range(2):  # the others are ahead: longer caches, other positions
        engine.step_many(others)
    stream = engine.start(mine)
    assert stream.slot == companions  # behind its batch-mates, in a bigger batch
    while not stream.finished:
        engine.step_many([*others, stream])
    assert torch.equal(torch.stack(stream.pending), torch.stack(solo.pending))
    assert torch.equal(stream.generator.get_state(), solo.generator.get_state())
    for other in others:
        engine.release(other)


@pytest.mark.parametrize("ending", ["finished", "cancelled"])
def test_a_reused_slot_leaks_nothing_of_its_previous_stream(tiny_csm_dir, ending):
    engine = CsmEngine.from_dir(tiny_csm_dir, max_streams=2)
    fresh = CsmEngine.from_dir(tiny_csm_dir, max_streams=2)
    # The old stream has a long prompt and runs long, so its leftovers lie past the new stream's length.
    old = engine.start(GenerationRequest(TEXTS[1] * 4, seed=5, max_audio_length_ms=40 * 80))
    keeper = engine.start(GenerationRequest(TEXTS[0], seed=6, max_audio_length_ms=100 * 80))
    for _ in range(40 if ending == "finished" else 17):
        engine.step_many([old, keeper])
    assert old.finished == (ending == "finished")
    engine.release(old)
    if not old.finished:
        with pytest.raises(ValueError, match="released"):
            engine.step(old)
    new_request = GenerationRequest(TEXTS[3], seed=9, max_audio_length_ms=12 * 80)
    new = engine.start(new_request)
    assert new.slot == 0 and new.prompt_length < old.positions
    audio = []
    while not new.finished:
        engine.step_many([new, keeper])
        if engine.chunk_ready(new):
            audio.append(engine.take_chunk(new).audio)
    solo = np.concatenate([c.audio for c in fresh.generate(new_request)])
    assert np.array_equal(np.concatenate(audio), solo)


def test_slots_are_limited_and_freed(tiny_csm_dir):
    engine = CsmEngine.from_dir(tiny_csm_dir, max_streams=2)
    a, b = (engine.start(GenerationRequest("Hi.", max_audio_length_ms=160)) for _ in range(2))
    assert (a.slot, b.slot) == (0, 1) and engine.streams_active == 2
    with pytest.raises(NoFreeSlot):
        engine.start(GenerationRequest("Hi.", max_audio_length_ms=160))
    while not a.finished:
        engine.step(a)
    assert a.slot is None and engine.streams_active == 1  # a finished stream frees its slot at once
    c = engine.start(GenerationRequest("Hi.", max_audio_length_ms=160))
    assert c.slot == 0
    del c  # a stream dropped without release does not keep its slot
    assert engine.start(GenerationRequest("Hi.", max_audio_length_ms=160)).slot == 0


def test_shapes_and_memory_sizing():
    assert batch_buckets(8) == (1, 2, 4, 8) and batch_buckets(1) == (1,) and batch_buckets(12) == (1, 2, 4, 8, 12)
    gib = 2**30
    assert fit_slots(32, 64 * 2**20, 80 * gib, 80 * gib)[0] == 32
    slots, note = fit_slots(64, 64 * 2**20, 6 * gib, 32 * gib)  # 32 GiB GPU: a 3.2 GiB reserve
    assert slots == int((6 - 3.2) * gib // (64 * 2**20)) == 44 and "reduced from 64" in note
    assert fit_slots(8, gib, gib, 16 * gib)[0] == 1  # never zero: the model loads, and says why it is small


def test_the_model_is_loaded_with_sdpa_and_the_engine_insists(tiny_csm_dir):
    model, processor = load_csm(tiny_csm_dir)
    assert model.config._attn_implementation == "sdpa"
    assert model.depth_decoder.config._attn_implementation == "sdpa"
    model.depth_decoder.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="sdpa"):
        CsmEngine(model, processor)


def first_depth_step_two_ways(engine: CsmEngine) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook 1's logits from the engine's first depth step (positions 0 and 1 in one call) and from feeding the
    two positions one at a time (a single query cannot see the future)."""
    stream = engine.start(GenerationRequest(TEXTS[1], temperature=0, max_audio_length_ms=800))
    state = engine._state
    with torch.inference_mode():
        hidden = state.hidden[: stream.slot + 1]
        first = engine.depth.embed_tokens(engine.model.lm_head(hidden).argmax(-1))[:, None]
        both = torch.cat([hidden[:, None], first], dim=1)
        together = engine._depth_logits(both, hidden.shape[0], 0)
        engine._depth_logits(both[:, :1], hidden.shape[0], 0)
        one_by_one = engine._depth_logits(both[:, 1:], hidden.shape[0], 1)
    engine.release(stream)
    return together, one_by_one


def test_first_depth_step_is_causal(tiny_csm_dir):
    engine = CsmEngine.from_dir(tiny_csm_dir, max_streams=1)
    together, one_by_one = first_depth_step_two_ways(engine)
    assert torch.allclose(together, one_by_one, atol=1e-5)
    # The check has teeth: the same step with eager attention (no mask, so bidirectional) differs.
    engine.depth_config._attn_implementation = "eager"
    together, one_by_one = first_depth_step_two_ways(engine)
    assert not torch.allclose(together, one_by_one, atol=1e-3)
