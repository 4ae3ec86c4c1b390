"""Characters that are never spoken: control, zero-width, bidirectional and private-use characters, and emoji.

LLM output carries them (emoji for tone, zero-width joiners inside emoji sequences, bidi marks around mixed-script
names, stray control bytes); the model would be given them raw. They are removed here, on the original text, so
the markdown parser and everything after it see clean text. Emoji are found with the `emoji` package (ZWJ
sequences, skin tones, flags and keycaps as one unit) rather than a code-point range that goes out of date;
terminal colour codes (ESC [ ... m) go whole.
"""

from __future__ import annotations

import re
import unicodedata

import emoji

from csm_tts.text.mapped import Builder, MappedText

# Terminal escape sequences (colour codes in pasted logs): ESC [ parameters final-byte.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
# Kept although in a removed category: layout the markdown parser and the sentence segmenter need.
_KEPT = {"\n", "\t"}
# Line and paragraph separators and a lone carriage return are line ends.
_LINE_ENDS = {"\u2028", "\u2029", "\r", "\x0b", "\x0c", "\x85"}
# Cc control, Cf format (zero-width space/joiners, bidi marks and isolates, soft hyphen, BOM), Co private use,
# Cs lone surrogates; Mn variation selectors only (other combining marks are letters' accents).
_REMOVED_CATEGORIES = {"Cc", "Cf", "Co", "Cs"}


def _is_removed(char: str) -> bool:
    if char in _KEPT:
        return False
    if unicodedata.category(char) in _REMOVED_CATEGORIES:
        return True
    point = ord(char)
    return 0xFE00 <= point <= 0xFE0F or 0xE0100 <= point <= 0xE01EF or point == 0x20E3


def clean_characters(text: str) -> MappedText:
    """The original text without unspeakable characters; an emoji between two letters becomes a space."""
    original = MappedText.identity(text)
    out = Builder()
    skip_to = {found["match_start"]: found["match_end"] for found in emoji.emoji_list(text)}
    skip_to.update((match.start(), match.end()) for match in _ANSI_ESCAPE.finditer(text))
    index = 0
    while index < len(text):
        char = text[index]
        if index in skip_to:
            end = skip_to[index]
            before, after = text[index - 1 : index], text[end : end + 1]
            if before.isalnum() and after.isalnum():
                out.replace(" ", index, end)
            index = end
            continue
        if char == "\r" and text[index + 1 : index + 2] == "\n":
            pass  # the "\n" that follows stands for the line end
        elif char in _LINE_ENDS:
            out.replace("\n", index, index + 1)
        elif not _is_removed(char):
            out.copy(original, index, index + 1)
        index += 1
    return out.build()


def is_speakable(text: str) -> bool:
    """Whether anything in `text` can be said: a letter or a digit of any script."""
    return any(unicodedata.category(char)[0] in "LN" for char in text)
