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
# Characters worth a closer look: anything but printable ASCII, newline and tab.
_SUSPECT = re.compile(r"[^\x20-\x7e\n\t]+")
_KEYCAP_BASES = set("#*0123456789")
# Kept although in a removed category: layout the markdown parser and the sentence segmenter need.
_KEPT = {"\n", "\t"}
# Line and paragraph separators and a lone carriage return are line ends.
_LINE_ENDS = {"\u2028", "\u2029", "\r", "\x0b", "\x0c", "\x85"}
# Cc control, Cf format (zero-width space/joiners, bidi marks and isolates, soft hyphen, BOM), Co private use,
# Cs lone surrogates. Combining marks stay (letters' accents), except those `_is_removed` names.
_REMOVED_CATEGORIES = {"Cc", "Cf", "Co", "Cs"}


def _is_removed(char: str) -> bool:
    if char in _KEPT:
        return False
    if unicodedata.category(char) in _REMOVED_CATEGORIES:
        return True
    point = ord(char)  # variation selectors (Mn) and the combining enclosing keycap U+20E3 (Me): emoji residue
    return 0xFE00 <= point <= 0xFE0F or 0xE0100 <= point <= 0xE01EF or point == 0x20E3


def _edits(text: str) -> list[tuple[int, int, str]]:
    """(start, end, replacement) for every unspeakable run, in order. Only runs outside printable ASCII are looked
    at (a keycap emoji starts with an ASCII "#", "*" or digit): plain English text costs one regex scan."""
    edits = [(match.start(), match.end(), "") for match in _ANSI_ESCAPE.finditer(text)]
    for run in _SUSPECT.finditer(text):
        start = run.start() - 1 if run.start() and text[run.start() - 1] in _KEYCAP_BASES else run.start()
        chunk = text[start : run.end()]
        skip_to = {start + found["match_start"]: start + found["match_end"] for found in emoji.emoji_list(chunk)}
        index = start
        while index < run.end():
            char = text[index]
            if index in skip_to:
                end = skip_to[index]
                between_letters = text[index - 1 : index].isalnum() and text[end : end + 1].isalnum()
                edits.append((index, end, " " if between_letters else ""))
                index = end
                continue
            if char == "\r" and text[index + 1 : index + 2] == "\n":
                edits.append((index, index + 1, ""))  # the "\n" that follows stands for the line end
            elif char in _LINE_ENDS:
                edits.append((index, index + 1, "\n"))
            elif _is_removed(char):
                edits.append((index, index + 1, ""))
            index += 1
    return sorted(edits, key=lambda edit: (edit[0], -edit[1]))


def clean_characters(text: str) -> MappedText:
    """The original text without unspeakable characters; an emoji between two letters becomes a space."""
    original = MappedText.identity(text)
    edits = _edits(text)
    if not edits:
        return original
    out = Builder()
    done = 0
    for start, end, replacement in edits:
        if start < done:
            continue  # inside an edit already made (an escape sequence's ESC, an emoji seen by two runs)
        out.copy(original, done, start)
        out.replace(replacement, start, end)
        done = end
    out.copy(original, done, len(text))
    return out.build()


def is_speakable(text: str) -> bool:
    """Whether anything in `text` can be said: a letter or a digit of any script."""
    return any(unicodedata.category(char)[0] in "LN" for char in text)
