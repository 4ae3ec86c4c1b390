"""Normalisation for speech: the one entry point that turns what a client sent into what the model is asked to say.

    original --characters--> clean --markdown--> plain --verbalize--> words --tidy--> spoken

Every stage keeps a `MappedText`, so any range of the spoken text maps back to its span of the original (what a
client sent), which is how a segment of audio reports the text it speaks. Text with nothing speakable left (only
emoji, markup, invisible or control characters) is refused with `NothingToSpeak`; the endpoints answer 400.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from csm_tts.text.characters import clean_characters, is_speakable
from csm_tts.text.mapped import MappedText
from csm_tts.text.markdown import markdown_to_speech
from csm_tts.text.verbalize import verbalize

# Emphasis and code markers markdown-it leaves as text when they are unmatched (an LLM's half-closed "**"), and the
# pipes of a table row cut off from its header (a streamed segment).
_STRAY_MARKUP = re.compile(r"\*{2,}|_{2,}|~{2,}|`+|\|+")
# Only what needs rewriting matches: runs of blanks, a blank other than " ", blanks around a line break.
_SPACES = re.compile(r"[^\S\n]{2,}|[^\S\n ]")
_LINE_BREAKS = re.compile(r" \n\s*|\n\s+")
# What removing an emoji or a marker can leave: "Great job 👍!" -> "Great job !".
_SPACE_BEFORE_PUNCTUATION = re.compile(r" +(?=[.,!?;:])")


class NothingToSpeak(ValueError):
    """The text has no letter or digit left to say."""


@dataclass(frozen=True)
class SpokenText:
    """What the model is asked to say, and for each character where it came from in what the client sent."""

    original: str
    mapped: MappedText

    @property
    def text(self) -> str:
        return self.mapped.text

    def source_span(self, start: int, end: int) -> tuple[int, int]:
        return self.mapped.source_span(start, end)


def base_language(language: str) -> str:
    """'en-US', 'en_GB', 'EN' -> 'en'."""
    return re.split(r"[-_]", language.strip(), maxsplit=1)[0].lower() or "en"


def normalize(text: str, *, language: str = "en", read_code_blocks: bool = False) -> SpokenText:
    """Markdown, code, URLs, e-mail addresses, emoji, invisible characters, numbers and the like to words."""
    mapped = clean_characters(text)
    mapped = markdown_to_speech(mapped, read_code_blocks=read_code_blocks)
    mapped = verbalize(mapped, base_language(language))
    return _checked(text, _tidy(mapped))


def verbatim(text: str) -> SpokenText:
    """The text as sent (normalisation off), still refused when there is nothing in it to say."""
    return _checked(text, MappedText.identity(text))


def _tidy(mapped: MappedText) -> MappedText:
    mapped = mapped.sub(_STRAY_MARKUP, lambda _: "")
    mapped = mapped.sub(_SPACES, lambda _: " ")
    mapped = mapped.sub(_LINE_BREAKS, lambda _: "\n")
    mapped = mapped.sub(_SPACE_BEFORE_PUNCTUATION, lambda _: "")
    return mapped.strip()


def _checked(original: str, mapped: MappedText) -> SpokenText:
    if not is_speakable(mapped.text):
        raise NothingToSpeak(
            "the text has nothing to speak: after removing markup, emoji, invisible and control characters "
            "no letter or digit is left"
        )
    return SpokenText(original, mapped)
