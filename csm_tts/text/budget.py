"""How much text one generation may take, and the split of a long text into segments that each fit.

The numbers, from the engine's limits:

- CSM-1B's backbone has 2,048 positions. A prompt takes one position per text token and one per 80 ms audio frame,
  for the segment's own text and audio AND for the context (earlier segments' text and audio, for voice continuity).
- The length rule (csm_tts/speech/length_rule.py) gives a text of N UTF-8 bytes an audio limit of 2 s + 150 ms x N,
  capped at 90 s: the cap is reached at 587 bytes, so anything longer could be cut off before it is all spoken.
- Read English runs at about 14 characters per second. CSM drifts or forgets its end-of-speech frame on long
  generations; other CSM servers keep one generation to 10-30 s of speech.

MAX_SEGMENT_BYTES = 400: about 29 s of speech, an audio limit of 62 s (775 frames, under the 90 s cap), and at
worst (one token per byte) 1,175 positions with its text, which leaves 873 positions for context: the previous
segment's text and ~25 s of its audio. `worst_case_positions` computes this from the length rule itself, and a test
pins it. Bytes, not characters, are counted, as the length rule does: a CJK character (3 bytes, ~250 ms of speech)
costs three times a Latin one.

The split: sentences are packed whole into a segment while they fit; a sentence longer than the budget is cut at its
last clause end that fits, then at a word end, and only a single "word" longer than the budget is cut inside.
"""

from __future__ import annotations

from dataclasses import dataclass

from csm_tts import FRAME_MS
from csm_tts.limits import MAX_AUDIO_LENGTH_MS
from csm_tts.speech.length_rule import default_audio_length_ms
from csm_tts.text.boundaries import budget_cut, sentence_bounds, utf8_size
from csm_tts.text.normalize import SpokenText

MAX_SEGMENT_BYTES = 400


def worst_case_positions(size_bytes: int, cap_ms: int = MAX_AUDIO_LENGTH_MS) -> int:
    """Positions a segment of `size_bytes` may take: one per byte of text (a byte-level worst case) plus its audio."""
    return size_bytes + default_audio_length_ms("x" * size_bytes, cap_ms) // FRAME_MS


@dataclass(frozen=True)
class Segment:
    """One generation's text: an exact slice [start, end) of the spoken text, and its span in the original."""

    text: str
    start: int
    end: int
    source_start: int
    source_end: int

    @property
    def speech(self) -> str:
        """What the model is given: the slice without the whitespace around it."""
        return self.text.strip()


def split_spoken(spoken: SpokenText, max_bytes: int = MAX_SEGMENT_BYTES, language: str = "en") -> list[Segment]:
    """Segments of `spoken.text`, each within max_bytes; their texts joined give the spoken text back."""
    return [
        Segment(spoken.text[start:end], start, end, *spoken.source_span(start, end))
        for start, end in split_ranges(spoken.text, max_bytes, language)
    ]


def split_ranges(text: str, max_bytes: int = MAX_SEGMENT_BYTES, language: str = "en") -> list[tuple[int, int]]:
    """[start, end) ranges covering `text` exactly, each within max_bytes (whitespace around it not counted)."""
    if max_bytes < 1:
        raise ValueError("max_bytes must be at least 1")
    pieces: list[tuple[int, int]] = []
    start = 0
    for end in [*sentence_bounds(text, language), len(text)]:
        while True:
            # a cut falls within max_bytes of the start: look no further than a window (a 10,000-character
            # "sentence" would otherwise be scanned whole for every cut)
            window = text[start : min(end, start + 4 * max_bytes)]
            if start + len(window) == end and utf8_size(window) <= max_bytes:
                break
            cut = start + budget_cut(window, max_bytes, language)
            pieces.append((start, cut))
            start = cut
        pieces.append((start, end))
        start = end
    packed: list[tuple[int, int]] = []
    for start, end in pieces:
        if packed and utf8_size(text[packed[-1][0] : end]) <= max_bytes:
            packed[-1] = (packed[-1][0], end)
        else:
            packed.append((start, end))
    return [(start, end) for start, end in packed if end > start]
