"""What the endpoints call: text in, generation-sized segments of speech out, each with its span of what the client
sent. Normalisation is on unless a request turns it off (`normalize: false`; on the ElevenLabs surface
`apply_text_normalization=off`).
"""

from __future__ import annotations

from csm_tts.text.budget import MAX_SEGMENT_BYTES, Segment, split_spoken
from csm_tts.text.incremental import StreamSegment
from csm_tts.text.normalize import NothingToSpeak, SpokenText, normalize, verbatim


def _spoken(text: str, normalized: bool, language: str) -> SpokenText:
    return normalize(text, language=language) if normalized else verbatim(text)


def spoken_segments(
    text: str, *, normalized: bool = True, language: str = "en", max_bytes: int = MAX_SEGMENT_BYTES
) -> list[Segment]:
    """A whole text as segments (raises NothingToSpeak): `segment.speech` is what one generation says."""
    return split_spoken(_spoken(text, normalized, language), max_bytes, language)


def spoken_stream_segment(
    segment: StreamSegment,
    *,
    normalized: bool = True,
    language: str = "en",
    max_bytes: int = MAX_SEGMENT_BYTES,
    base: int = 0,
) -> list[Segment]:
    """One cut of a text stream as segments, spans in the whole received text (`base`: where the segmenter's text
    starts in it). Empty when it has nothing to say (a code block, emoji): a stream skips it rather than failing.
    Normalisation can lengthen text ("$1,234,567" is eleven words), so the result is split again to the budget."""
    try:
        spoken = _spoken(segment.text, normalized, language)
    except NothingToSpeak:
        return []
    offset = base + segment.start
    return [
        Segment(s.text, s.start, s.end, s.source_start + offset, s.source_end + offset)
        for s in split_spoken(spoken, max_bytes, language)
    ]
