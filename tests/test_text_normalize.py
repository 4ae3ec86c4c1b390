"""Normalisation for speech (csm_tts/text/normalize.py): what is said for each kind of written form, and that every
spoken word maps back to the part of the original text it stands for."""

from __future__ import annotations

import pytest

from csm_tts.text.mapped import MappedText
from csm_tts.text.normalize import NothingToSpeak, normalize, verbatim

# (original, spoken, [(a spoken word or phrase, the original text it must map back to)])
CASES = [
    # markdown: markers go, blocks end as sentences, link text stays and its target goes
    (
        "# Getting started\n\nThis is **really** _important_.",
        "Getting started.\nThis is really important.",
        [("Getting started", "Getting started"), ("really", "really"), ("important", "important")],
    ),
    (
        "- apples\n- pears\n\n1. wash them\n2. eat them",
        "apples.\npears.\none, wash them.\ntwo, eat them.",
        [("pears", "pears"), ("one,", "1."), ("eat them", "eat them")],
    ),
    ("See [the docs](https://example.com/docs) now.", "See the docs now.", [("the docs", "the docs")]),
    ("> quoted *text*", "quoted text.", [("text", "text")]),
    ("| name | age |\n|---|---|\n| Ann | 30 |", "name, age.\nAnn, thirty.", [("Ann", "Ann"), ("thirty", "30")]),
    ("Escaped \\*stars\\* &amp; entities", "Escaped *stars* and entities.", [("*", "\\*"), ("and", "&amp;")]),
    ("Half **closed bold", "Half closed bold.", [("closed", "closed")]),
    ("<b>html</b> tags", "html tags.", [("html", "html")]),
    # code: spans are read as written, blocks are not read
    ("Call `load_model()` first.", "Call load_model() first.", [("load_model()", "load_model()")]),
    ("Run this:\n\n```python\nprint(1)\n```\n\nDone.", "Run this:\nDone.", [("Done.", "Done.")]),
    ("<div>\nDone\n</div>\n\nDone here.", "Done here.", [("Done here.", "Done here.")]),
    # URLs and e-mail addresses: the host, spoken
    (
        "Visit https://www.python.org/downloads/?x=1 today.",
        "Visit python dot org today.",
        [("python dot org", "https://www.python.org/downloads/?x=1")],
    ),
    (
        "Write to jane.doe@example.co.uk.",
        "Write to jane dot doe at example dot co dot uk.",
        [("at", "jane.doe@example.co.uk")],
    ),
    # emoji, zero-width, bidi and control characters vanish
    ("Great job 👍🏽! Well\u200b done\u200f.", "Great job! Well done.", [("Well", "Well"), ("done.", "done\u200f.")]),
    ("family 👨\u200d👩\u200d👧 time\x07", "family time.", [("time", "time")]),
    ("flag🇫🇷inside", "flag inside.", [("inside", "inside")]),
    ("line one\r\nline two", "line one line two.", [("two", "two")]),
    # numbers, currency, percentages
    (
        "I have 3 cats and 1,250 fish.",
        "I have three cats and one thousand two hundred and fifty fish.",
        [("three", "3")],
    ),
    (
        "Pi is 3.14 and -5 is negative.",
        "Pi is three point one four and minus five is negative.",
        [("minus five", "-5")],
    ),
    ("It costs $12.50 today.", "It costs twelve dollars and fifty cents today.", [("twelve dollars", "$12.50")]),
    (
        "Raised €5m and £1, then $0.99.",
        "Raised five million euros and one pound, then ninety-nine cents.",
        [("one pound", "£1")],
    ),
    (
        "Growth was 3.5% or 12 %.",
        "Growth was three point five percent or twelve percent.",
        [("twelve percent", "12 %")],
    ),
    # dates and years
    ("Born on Jan 5, 2024.", "Born on January fifth twenty twenty-four.", [("January fifth", "Jan 5, 2024")]),
    (
        "Due 2024-03-15 or 12/25/2023.",
        "Due March fifteenth twenty twenty-four or December twenty-fifth twenty twenty-three.",
        [],
    ),
    (
        "On 4 July 1776 and in 1990, the 1980s.",
        "On the fourth of July seventeen seventy-six and in nineteen ninety, the nineteen eighties.",
        [],
    ),
    # times
    ("Meet at 3:30 pm or 9:05.", "Meet at three thirty P M or nine oh five.", [("three thirty P M", "3:30 pm")]),
    ("At 7 a.m. Then at 14:00.", "At seven A M. Then at fourteen hundred.", [("seven A M", "7 a.m")]),
    # units
    (
        "Run 5 km at 25°C with 1 kg.",
        "Run five kilometres at twenty-five degrees Celsius with one kilogram.",
        [("five kilometres", "5 km")],
    ),
    ("A 2.5 GB file in 300 ms.", "A two point five gigabytes file in three hundred milliseconds.", []),
    # ranges
    (
        "3-5 days, 10:30-11:30, 2020–2024, COVID-19.",
        "three to five days, ten thirty to eleven thirty, twenty twenty to twenty twenty-four, COVID-nineteen.",
        [("three to five", "3-5"), ("twenty twenty to twenty twenty-four", "2020–2024")],
    ),
    # ordinals
    ("The 21st century and 2nd place.", "The twenty-first century and second place.", [("twenty-first", "21st")]),
    # phone numbers and long digit strings are read digit by digit
    ("Call 555-123-4567.", "Call five five five one two three four five six seven.", []),
    ("e.g. this, i.e. that", "for example this, that is that.", [("for example", "e.g.")]),
]


def _source_of(original: str, spoken, phrase: str) -> str:
    at = spoken.text.index(phrase)
    start, end = spoken.source_span(at, at + len(phrase))
    return original[start:end]


@pytest.mark.parametrize(("original", "said", "spans"), CASES, ids=[case[0][:30] for case in CASES])
def test_normalisation_table(original, said, spans):
    spoken = normalize(original)
    assert spoken.text == said
    for phrase, source in spans:
        assert _source_of(original, spoken, phrase) == source, phrase


@pytest.mark.parametrize(("original", "said", "_"), CASES, ids=[case[0][:30] for case in CASES])
def test_every_character_maps_inside_the_original_and_in_order(original, said, _):
    mapped = normalize(original).mapped
    assert all(0 <= s <= e <= len(original) for s, e in zip(mapped.starts, mapped.ends, strict=True))
    # spans never go backwards: a segment's span is where its first word starts to where its last word ends
    assert list(mapped.starts) == sorted(mapped.starts)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n\t ",
        "\u200b" * 100,
        "\u200e\u200f\u202a\u202c\u2066\u2069",
        "👍🎉🇫🇷",
        "\x00\x01\x1b[0m",
        "**",
        "```\n```",
    ],
    ids=["empty", "blank", "zero-width", "bidi", "emoji", "control", "markup", "empty-code"],
)
def test_nothing_speakable_is_an_error(text):
    with pytest.raises(NothingToSpeak, match="nothing to speak"):
        normalize(text)


def test_verbatim_keeps_the_text_but_still_refuses_nothing():
    assert verbatim("Costs **$5**").text == "Costs **$5**"
    with pytest.raises(NothingToSpeak):
        verbatim("\u200b\u200b")


def test_code_blocks_can_be_read():
    assert normalize("```\nx = 1\n```", read_code_blocks=True).text == "x = one."


def test_other_languages_get_integers_and_keep_what_needs_a_grammar():
    assert normalize("Ich habe 3 Katzen und 3,5 Liter.", language="de-DE").text == "Ich habe drei Katzen und 3,5 Liter."
    assert normalize("J'ai 21 ans.", language="fr").text == "J'ai vingt et un ans."
    # a language num2words does not know keeps its digits; the markdown and emoji rules still apply
    assert normalize("**42** 🙂", language="zu").text == "42."


def test_lone_surrogates_and_huge_numbers_do_not_crash():
    assert normalize("a\ud800b").text == "ab."
    assert normalize("1" * 40).text == " ".join(["one"] * 40) + "."
    assert normalize("1" * 40 + "th").text == " ".join(["one"] * 40) + "."
    assert normalize("$" + "9" * 30 + ".99").text.startswith("nine nine")


def test_mapped_text_sub_keeps_spans():
    import re

    mapped = MappedText.identity("a 12 b").sub(re.compile(r"\d+"), lambda m: "twelve")
    assert mapped.text == "a twelve b"
    assert mapped.source_span(2, 8) == (2, 4)
    assert mapped.source_span(9, 10) == (5, 6)


def test_random_markdown_never_crashes_and_keeps_ordered_spans():
    """Fuzz: markdown-significant characters, digits, symbols, emoji, invisible characters in random order."""
    import random

    alphabet = list("abc XYZ 0123456789 .,;:!?-*_`#>|[]()<>&\\~$€%@/:\n\t\r") + ["👍", "\u200b", "\u202e", "é", "ß"]
    rng = random.Random(19)
    for _ in range(400):
        original = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 120)))
        try:
            mapped = normalize(original).mapped
        except NothingToSpeak:
            continue
        assert list(mapped.starts) == sorted(mapped.starts), repr(original)
        assert all(0 <= s <= e <= len(original) for s, e in zip(mapped.starts, mapped.ends, strict=True))
        # a letter that stands for one letter of the original is that letter (a copy, not a neighbour)
        for char, start, end in zip(mapped.text, mapped.starts, mapped.ends, strict=True):
            if end - start == 1 and char.isalpha() and original[start].isalpha():
                assert char == original[start], (repr(original), char, start)


def test_words_after_an_indented_code_block_map_to_themselves_not_into_the_block():
    """An indented block's content is not verbatim in the source (the indents go): the reader skips its lines."""
    original = "Intro text.\n\n    a = 1\n    Done.\n\nDone."
    spoken = normalize(original)
    assert spoken.text == "Intro text.\nDone."
    assert spoken.source_span(12, 17) == (len(original) - 5, len(original))
