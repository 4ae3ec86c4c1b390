"""Sentence segmentation and the split of long text into generation-sized segments (csm_tts/text/boundaries.py,
csm_tts/text/budget.py)."""

from __future__ import annotations

import random

import pytest

from csm_tts.limits import MODEL_POSITIONS
from csm_tts.text.boundaries import clause_bounds, sentence_bounds
from csm_tts.text.budget import (
    MAX_SEGMENT_BYTES,
    split_ranges,
    split_spoken,
    worst_case_positions,
)
from csm_tts.text.normalize import normalize


def sentences(text: str) -> list[str]:
    cuts = [0, *sentence_bounds(text), len(text)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Dr. Smith arrived. He was late.", ["Dr. Smith arrived. ", "He was late."]),
        ("Mr. and Mrs. Jones left at 3 p.m. today. Fine.", ["Mr. and Mrs. Jones left at 3 p.m. today. ", "Fine."]),
        ("Use e.g. apples, i.e. fruit. Then eat.", ["Use e.g. apples, i.e. fruit. ", "Then eat."]),
        ("I live in the U.S. now. It is big.", ["I live in the U.S. now. ", "It is big."]),
        ("It costs 3.50 dollars. Pi is 3.14159. Yes.", ["It costs 3.50 dollars. ", "Pi is 3.14159. ", "Yes."]),
        ("Wait... what? Really!", ["Wait... what? ", "Really!"]),
        ("Hmm… fine. Next", ["Hmm… fine. ", "Next"]),
        ('He said "Stop." Then he left.', ['He said "Stop." ', "Then he left."]),
        ("She asked, “Why?” I shrugged.", ["She asked, “Why?” ", "I shrugged."]),
        ("Title.\nBody text here", ["Title.\n", "Body text here"]),
        ("no punctuation at all", ["no punctuation at all"]),
    ],
)
def test_sentence_bounds(text, expected):
    assert sentences(text) == expected


def test_clause_bounds_skip_numbers_and_times():
    text = "First, 1,000 people came at 3:30; then — quietly — they left: all of them"
    assert [text[:b].rstrip()[-1] for b in clause_bounds(text)] == [",", ";", "—", "—", ":"]


def test_the_budget_leaves_room_for_context():
    """400 bytes of text is at most 1,175 positions (length rule, one token per byte): 873 are left for context."""
    assert worst_case_positions(MAX_SEGMENT_BYTES) == 1175
    assert MODEL_POSITIONS - worst_case_positions(MAX_SEGMENT_BYTES) >= 800
    # the 90 s cap: from 587 bytes on the length rule stops growing, so a longer text could be cut off
    assert worst_case_positions(587) - 587 == worst_case_positions(2000) - 2000 == 90_000 // 80


def _prose(characters: int, seed: int = 7) -> str:
    rng = random.Random(seed)
    words = ["the", "model", "speaks", "Dr.", "Smith's", "text", "e.g.", "3.5", "clearly", "and", "slowly"]
    out = []
    while sum(len(w) + 1 for w in out) < characters:
        word = rng.choice(words)
        roll = rng.random()
        out.append(word + ("." if roll < 0.06 else "," if roll < 0.12 else ""))
    return " ".join(out)[:characters]


def test_a_4000_character_text_splits_within_budget_and_joins_back():
    original = "# Report\n\n" + _prose(4000)
    spoken = normalize(original)
    segments = split_spoken(spoken)
    assert "".join(segment.text for segment in segments) == spoken.text
    assert all(len(segment.speech.encode()) <= MAX_SEGMENT_BYTES for segment in segments)
    assert all(segment.speech for segment in segments)
    # most segments are well filled (sentences packed), not one per sentence
    assert len(segments) <= len(spoken.text.encode()) // (MAX_SEGMENT_BYTES // 2) + 1
    # consecutive, increasing spans of the original that cover it from the first word to the last
    spans = [(segment.source_start, segment.source_end) for segment in segments]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert original[spans[0][0] :].startswith("Report")
    assert spans[-1][1] == len(original)


def test_a_sentence_longer_than_the_budget_is_cut_at_clauses_then_words():
    clauses = ", ".join(f"clause number {i} goes on" for i in range(30)) + "."
    ranges = split_ranges(clauses, max_bytes=100)
    parts = [clauses[a:b] for a, b in ranges]
    assert "".join(parts) == clauses
    assert all(len(part.strip()) <= 100 for part in parts)
    assert all(part.rstrip().endswith((",", ".")) for part in parts)
    words = " ".join(["word"] * 100)
    assert all(words[a:b].strip().endswith("word") for a, b in split_ranges(words, max_bytes=50))
    # a single "word" longer than the budget is the only thing ever cut inside
    assert [b - a for a, b in split_ranges("x" * 120, max_bytes=50)] == [50, 50, 20]


def test_the_budget_counts_bytes_so_cjk_gets_fewer_characters():
    text = "你好世界。" * 60  # 300 characters, 900 bytes
    ranges = split_ranges(text, max_bytes=MAX_SEGMENT_BYTES, language="zh")
    assert all(len(text[a:b].strip().encode()) <= MAX_SEGMENT_BYTES for a, b in ranges)
    assert "".join(text[a:b] for a, b in ranges) == text
    with pytest.raises(ValueError):
        split_ranges("x", max_bytes=0)


def test_the_front_end_entry_points():
    from csm_tts.text.frontend import spoken_segments, spoken_stream_segment
    from csm_tts.text.incremental import StreamSegment
    from csm_tts.text.normalize import NothingToSpeak

    original = "**Hi** there. " + "It costs $5. " * 60
    segments = spoken_segments(original)
    assert len(segments) > 1 and segments[0].speech.startswith("Hi there.")
    assert all(len(s.speech.encode()) <= MAX_SEGMENT_BYTES for s in segments)
    assert spoken_segments("**Hi**", normalized=False)[0].speech == "**Hi**"
    with pytest.raises(NothingToSpeak):
        spoken_segments("👍 \u200b")

    received = "Intro. Then $1,234,567 and $7,654,321 are " + "large sums, " * 3
    cut = StreamSegment(received[7:], 7, len(received), "sentence")
    parts = spoken_stream_segment(cut, max_bytes=60)
    assert len(parts) > 1 and all(len(p.speech.encode()) <= 60 for p in parts)  # words are longer than digits
    assert received[parts[0].source_start : parts[0].source_end].startswith("Then $1,234,567")
    assert parts[-1].source_end == len(received.rstrip())
    assert spoken_stream_segment(StreamSegment("```\ncode\n```\n", 0, 13, "sentence")) == []
