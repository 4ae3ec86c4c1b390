"""Numbers as words, through num2words (maintained, pure Python, cardinals, ordinals and years in 50+ languages)."""

from __future__ import annotations

from functools import lru_cache

from num2words import CONVERTER_CLASSES, num2words

# Beyond this many digits a number is read digit by digit (an id, a card number), as people do.
MAX_CARDINAL_DIGITS = 15
_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def has_words_for(language: str) -> bool:
    return language in CONVERTER_CLASSES


def _clean(words: str) -> str:
    # num2words groups thousands with commas, which a segmenter would take for clause ends.
    return words.replace(",", "")


@lru_cache(maxsize=4096)
def cardinal(digits: str, language: str = "en") -> str:
    """Words for an unsigned integer written with digits only ("1234"); a leading zero is read digit by digit."""
    if len(digits) > MAX_CARDINAL_DIGITS or (len(digits) > 1 and digits.startswith("0")):
        return digit_by_digit(digits, language)
    return _clean(num2words(int(digits), lang=language))


def digit_by_digit(digits: str, language: str = "en") -> str:
    if language == "en":
        return " ".join(_DIGITS[int(d)] for d in digits)
    return " ".join(_clean(num2words(int(d), lang=language)) for d in digits)


@lru_cache(maxsize=1024)
def ordinal(digits: str, language: str = "en") -> str:
    if len(digits) > MAX_CARDINAL_DIGITS:
        return digit_by_digit(digits, language)
    return _clean(num2words(int(digits), lang=language, to="ordinal"))


@lru_cache(maxsize=1024)
def year(digits: str, language: str = "en") -> str:
    return _clean(num2words(int(digits), lang=language, to="year"))


def decimal(written: str, language: str = "en") -> str:
    """Words for "1,234.56", "3.14", "2.0.1" (a version: every part a number): English separators."""
    parts = written.replace(",", "").split(".")
    if len(parts) == 1:
        return cardinal(parts[0], language)
    if len(parts) == 2:
        return f"{cardinal(parts[0], language)} point {digit_by_digit(parts[1], language)}"
    return " point ".join(cardinal(part, language) for part in parts)


def is_one(written: str) -> bool:
    return written.replace(",", "") in ("1", "1.0", "01")
