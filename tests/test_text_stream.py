"""The incremental segmenter (csm_tts/text/incremental.py): text arriving in pieces, as an LLM streams it."""

from __future__ import annotations

import random

import pytest

from csm_tts.text.incremental import StreamPolicy, StreamSegmenter

TEXT = (
    "Sure, here is what I found. Dr. Smith met Mrs. Jones at 3 p.m. on Jan. 5, e.g. near the U.S. embassy. "
    'The fee was 3.50 dollars... or so they said. She asked, “Why?” He said "Stop." Then he left; nobody knew why. '
    "This last sentence has no full stop and keeps going with words, clauses and more words until the budget of "
    "the smaller policy is exceeded several times over, which forces cuts at clause ends or word ends inside it"
)
POLICIES = {
    "default": StreamPolicy(),
    "small budget": StreamPolicy(first_min_chars=5, first_max_chars=30, min_chars=0, max_bytes=70),
    "sentence ends only": StreamPolicy(early_first_cut=False),
}


class FrozenClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def segments_of(pieces: list[str], policy: StreamPolicy) -> list[tuple[str, int, int, str]]:
    segmenter = StreamSegmenter(policy, clock=FrozenClock())
    out = []
    for piece in pieces:
        out += segmenter.feed(piece)
    out += segmenter.flush()
    return [(s.text, s.start, s.end, s.reason) for s in out]


@pytest.mark.parametrize("name", POLICIES)
def test_text_cut_at_every_position_gives_the_segments_of_the_whole(name):
    policy = POLICIES[name]
    whole = segments_of([TEXT], policy)
    assert "".join(text for text, *_ in whole) == TEXT
    assert len(whole) > 3
    for cut in range(1, len(TEXT)):
        assert segments_of([TEXT[:cut], TEXT[cut:]], policy) == whole, f"cut at {cut}: {TEXT[:cut][-20:]!r}"
    assert segments_of(list(TEXT), policy) == whole, "one character at a time"
    rng = random.Random(5)
    for _ in range(20):  # LLM-like tokens of 1 to 6 characters
        cuts = sorted(rng.sample(range(1, len(TEXT)), len(TEXT) // 3))
        pieces = [TEXT[a:b] for a, b in zip([0, *cuts], [*cuts, len(TEXT)], strict=True)]
        assert segments_of(pieces, policy) == whole


def test_segments_respect_the_budget_and_name_their_span():
    policy = POLICIES["small budget"]
    for text, start, end, reason in segments_of([TEXT], policy):
        assert TEXT[start:end] == text
        assert len(text.strip().encode()) <= policy.max_bytes, reason


def test_the_first_cut_is_early_and_later_cuts_are_sentences():
    text = "Sure, here is what I found. It took a while, but it works. Done now."
    first, *rest = segments_of([text], StreamPolicy())
    assert (first[0], first[3]) == ("Sure, ", "first")
    assert [(t, r) for t, _, _, r in rest] == [
        ("here is what I found. ", "sentence"),
        ("It took a while, but it works. ", "sentence"),
        ("Done now.", "flush"),
    ]
    guarded = segments_of([text], StreamPolicy(first_min_chars=10))
    assert guarded[0][0] == "Sure, here is what I found. "  # "Sure, " is under first_min_chars
    late = segments_of(["Well, in the end, after a long day, it works. Yes."], StreamPolicy(early_first_cut=False))
    assert late[0][0] == "Well, in the end, after a long day, it works. "


def test_a_first_segment_without_punctuation_is_cut_at_a_word_before_first_max_chars():
    words = "one two three four five six seven eight nine ten eleven twelve thirteen"
    first = segments_of([words], StreamPolicy(first_max_chars=30))[0]
    assert first[0] == "one two three four five six "
    assert len(first[0]) <= 30


def test_short_sentences_wait_for_the_next_one():
    texts = [t for t, *_ in segments_of(["Intro text is here. Yes. No. Maybe so, said the man."], StreamPolicy())]
    assert texts == ["Intro text is here. ", "Yes. No. Maybe so, said the man."]


def test_nothing_is_cut_before_a_complete_word_follows():
    segmenter = StreamSegmenter(StreamPolicy(first_min_chars=5), clock=FrozenClock())
    assert segmenter.feed("I saw Dr.") == []
    assert segmenter.feed(" Sm") == []  # "Dr. Sm..." could still be a name
    assert segmenter.feed("ith, today") == []  # the clause end needs a complete word after it
    assert [s.text for s in segmenter.feed(" and")] == ["I saw Dr. Smith, "]
    assert segmenter.pending == "today and"


def test_flush_cuts_what_waits_and_restarts_the_early_cut():
    segmenter = StreamSegmenter(StreamPolicy(first_min_chars=5), clock=FrozenClock())
    assert [s.text for s in segmenter.feed("Hello there, my friend. And")] == ["Hello there, "]
    assert [s.text for s in segmenter.flush()] == ["my friend. And"]  # "my friend." alone is under min_chars
    assert segmenter.flush() == []
    cut = segmenter.feed("Again, a new turn begins here.")
    assert [(s.text, s.reason, s.start) for s in cut] == [("Again, ", "first", 27)]


def test_text_that_waits_too_long_is_released_at_its_last_complete_word():
    clock = FrozenClock()
    segmenter = StreamSegmenter(StreamPolicy(max_wait_s=2.0), clock=clock)
    assert segmenter.feed("The answer is wor") == []
    assert segmenter.deadline() == 102.0
    clock.now = 101.9
    assert segmenter.poll() == []
    clock.now = 102.0
    released = segmenter.poll()
    assert [(s.text, s.reason) for s in released] == [("The answer is ", "waited")]
    assert segmenter.pending == "wor"
    assert segmenter.deadline() == 104.0  # a word still being written gets a full wait of its own
    clock.now = 103.0
    assert segmenter.feed("ds.") == []
    clock.now = 104.0
    assert [s.text for s in segmenter.poll()] == ["words."]
    assert segmenter.deadline() is None


def test_the_wait_counts_from_when_the_waiting_text_arrived():
    clock = FrozenClock()
    segmenter = StreamSegmenter(StreamPolicy(max_wait_s=2.0, first_min_chars=5), clock=clock)
    segmenter.feed("First part, ")
    clock.now = 101.0
    segmenter.feed("second")
    clock.now = 101.5
    assert [s.text for s in segmenter.feed(" part")] == ["First part, "]
    assert segmenter.deadline() == 103.0  # "second" came at 101.0
    clock.now = 103.0
    assert [s.text for s in segmenter.poll()] == ["second "]


@pytest.mark.parametrize(
    "settings",
    [
        {"first_min_chars": 50, "first_max_chars": 10},
        {"first_min_chars": 0, "first_max_chars": 0},
        {"max_bytes": 0},
        {"first_max_chars": 500},
        {"max_wait_s": 0},
        {"min_chars": -1},
    ],
)
def test_bad_policies_are_refused(settings):
    with pytest.raises(ValueError):
        StreamPolicy(**settings)


def test_a_code_block_is_never_cut_inside_its_fence():
    text = "Run this:\n```python\nx = 1. y = 2. print(x, y)\nz = 3.\n```\nThat prints one, two. Then it stops."
    whole = segments_of([text], StreamPolicy(min_chars=0))
    assert segments_of(list(text), StreamPolicy(min_chars=0)) == whole
    assert [t for t, *_ in whole] == [
        "Run this:\n",
        "```python\nx = 1. y = 2. print(x, y)\nz = 3.\n```\n",
        "That prints one, two. ",
        "Then it stops.",
    ]


def test_text_without_spaces_is_still_cut_within_the_budget():
    """A client that never sends a space (or a flush) cannot make the server hold unbounded text."""
    policy = StreamPolicy(max_bytes=100, first_max_chars=50)
    segmenter = StreamSegmenter(policy, clock=FrozenClock())
    cut = []
    for _ in range(100):
        cut += segmenter.feed("x" * 37)
        assert len(segmenter.pending) <= policy.max_bytes + 37
    cut += segmenter.flush()
    assert "".join(s.text for s in cut) == "x" * 3700
    assert all(len(s.text) <= policy.max_bytes for s in cut)


def _answers() -> list[str]:
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "llm_answers.json"
    return json.loads(path.read_text())["answers"]


@pytest.mark.parametrize("index", range(6))
def test_llm_answers_streamed_as_tokens_give_the_segments_of_the_whole(index):
    """Markdown lists, a table, a code span, money and dates, as an LLM writes them (benchmarks/llm_answers.json)."""
    text = _answers()[index]
    for policy in POLICIES.values():
        whole = segments_of([text], policy)
        assert "".join(t for t, *_ in whole) == text
        assert segments_of(list(text), policy) == whole
        rng = random.Random(index)
        cuts = sorted(rng.sample(range(1, len(text)), len(text) // 4))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert segments_of(pieces, policy) == whole


@pytest.mark.parametrize(
    "text",
    ["a, " * 3333, "Ab cd. " * 1428, "x" * 10_000, "``` a\n" * 1400, "Hello there... " * 600],
    ids=["commas", "short sentences", "no spaces", "fences", "ellipses"],
)
def test_one_huge_message_is_cut_within_the_budget(text):
    """A 10,000-character message (the ElevenLabs surface's limit) in one piece: segments join back, each fits."""
    segments = segments_of([text], StreamPolicy())
    assert "".join(t for t, *_ in segments) == text
    assert all(len(t.strip().encode()) <= StreamPolicy().max_bytes for t, *_ in segments)
