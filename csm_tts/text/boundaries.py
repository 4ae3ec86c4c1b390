"""Where text may be cut: sentence ends (sentencex), clause ends and word ends.

sentencex (Wikimedia's segmenter, compiled, ~250 languages through fallback chains) handles abbreviations ("Dr.",
"e.g.", "U.S."), decimals, ellipses and closing quotes. It returns consecutive slices of the input; a boundary here
is the index where the next sentence starts, so the whitespace after a sentence belongs to it and slices between
boundaries put the text back together exactly.
"""

from __future__ import annotations

import re

from sentencex import segment

# A clause ends after , ; : or a dash, followed by a space (never inside "1,000" or "3:30").
_CLAUSE_END = re.compile(r"(?:[,;:]|\s[-–—]|[–—])\s+")
_WORD_END = re.compile(r"\s+")


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index].isspace():
        index += 1
    return index


def sentence_bounds(text: str, language: str = "en") -> list[int]:
    """Indices inside `text` (0 < i < len) where a sentence starts; the text's own end is not listed."""
    bounds: list[int] = []
    at = 0
    for sentence in segment(language, text):
        at += len(sentence)
        after = _skip_space(text, at)
        if 0 < after < len(text) and text[:after].strip() and (not bounds or bounds[-1] != after):
            bounds.append(after)
    return bounds


def clause_bounds(text: str) -> list[int]:
    return [match.end() for match in _CLAUSE_END.finditer(text) if 0 < match.end() < len(text)]


def word_bounds(text: str) -> list[int]:
    return [match.end() for match in _WORD_END.finditer(text) if 0 < match.end() < len(text)]


def utf8_size(text: str) -> int:
    """What a segment costs: its UTF-8 bytes, the unit of the length rule (csm_tts/speech/length_rule.py)."""
    return len(text.strip().encode("utf-8", "surrogatepass"))


def fitting_prefix(text: str, max_bytes: int) -> int:
    """The longest prefix length whose UTF-8 size, leading whitespace not counted, is at most max_bytes (at least one
    character, so a cut always makes progress)."""
    lead = len(text) - len(text.lstrip())
    data = text[lead:].encode("utf-8", "surrogatepass")
    if len(data) <= max_bytes:
        return len(text)
    end = max_bytes
    while end > 0 and data[end] & 0xC0 == 0x80:  # not inside a multi-byte character
        end -= 1
    return lead + max(1, len(data[:end].decode("utf-8", "surrogatepass")))


def budget_cut(text: str, max_bytes: int, language: str = "en", sentences: list[int] | None = None) -> int:
    """Where to cut a text too long for one segment: the last sentence, then clause, then word end that fits.
    `sentences`: the cuts already decided at sentence level (a stream's sentence starts and code-block ends, decided
    its own way)."""
    limit = fitting_prefix(text, max_bytes)
    if sentences is None:
        sentences = sentence_bounds(text, language)
    for bounds in (sentences, clause_bounds(text), word_bounds(text)):
        fitting = [bound for bound in bounds if bound <= limit and text[:bound].strip()]
        if fitting:
            return fitting[-1]
    return limit
