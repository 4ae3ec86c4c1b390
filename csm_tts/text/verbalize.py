"""Written forms to spoken words: URLs, e-mail addresses, phone numbers, currency, percentages, dates, times,
ordinals, units and plain numbers.

Each class is one regular expression over the markdown-free text and a function that says the match; `MappedText.sub`
keeps every word's span in the original. The words themselves come from num2words. Rules run in order, and a rule's
output is words, so a later rule never reads a number twice ("$5" is money before "5" is a number).

English has the full set. Other languages get the language-neutral rules (URLs and e-mail addresses as written, but
without the scheme and path) and plain integers in words when num2words knows the language; their decimals,
currency, dates, times and units stay as written, because their conventions (decimal commas, day-month order, case
and gender of the unit) need grammars we do not have.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from csm_tts.text import numbers
from csm_tts.text.mapped import MappedText

Rule = tuple[re.Pattern[str], Callable[[re.Match[str], str], str | None]]

_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_MONTHS = (
    *("January", "February", "March", "April", "May", "June"),
    *("July", "August", "September", "October", "November", "December"),
)
_MONTH = (
    r"(?P<month>Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_DAY = r"(?P<day>3[01]|[12]\d|0?[1-9])"
# "p.m." keeps its last dot when a sentence ends there ("at 3 p.m. Then ..."), so the sentence still ends.
_AMPM = r"(?P<ampm>[AaPp]\.?[Mm]\b(?:\.(?!\s+[A-Z]|\s*$))?)"

# symbol: (one, many, hundredth one, hundredth many)
_CURRENCIES = {
    "$": ("dollar", "dollars", "cent", "cents"),
    "USD": ("dollar", "dollars", "cent", "cents"),
    "€": ("euro", "euros", "cent", "cents"),
    "EUR": ("euro", "euros", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"),
    "GBP": ("pound", "pounds", "penny", "pence"),
    "¥": ("yen", "yen", "", ""),
    "₹": ("rupee", "rupees", "paisa", "paise"),
}
_SCALES = {"k": "thousand", "m": "million", "mn": "million", "b": "billion", "bn": "billion"}
# unit: (one, many). Not "in" (a preposition far more often than inches), not "A" or "min" alone after words.
_UNITS = {
    "km/h": ("kilometre per hour", "kilometres per hour"),
    "mph": ("mile per hour", "miles per hour"),
    "km": ("kilometre", "kilometres"),
    "m": ("metre", "metres"),
    "cm": ("centimetre", "centimetres"),
    "mm": ("millimetre", "millimetres"),
    "mi": ("mile", "miles"),
    "ft": ("foot", "feet"),
    "kg": ("kilogram", "kilograms"),
    "g": ("gram", "grams"),
    "mg": ("milligram", "milligrams"),
    "lb": ("pound", "pounds"),
    "lbs": ("pound", "pounds"),
    "oz": ("ounce", "ounces"),
    "°C": ("degree Celsius", "degrees Celsius"),
    "°F": ("degree Fahrenheit", "degrees Fahrenheit"),
    "°": ("degree", "degrees"),
    "ms": ("millisecond", "milliseconds"),
    "s": ("second", "seconds"),
    "sec": ("second", "seconds"),
    "min": ("minute", "minutes"),
    "h": ("hour", "hours"),
    "hrs": ("hour", "hours"),
    "KB": ("kilobyte", "kilobytes"),
    "kB": ("kilobyte", "kilobytes"),
    "MB": ("megabyte", "megabytes"),
    "GB": ("gigabyte", "gigabytes"),
    "TB": ("terabyte", "terabytes"),
    "Hz": ("hertz", "hertz"),
    "kHz": ("kilohertz", "kilohertz"),
    "MHz": ("megahertz", "megahertz"),
    "GHz": ("gigahertz", "gigahertz"),
    "W": ("watt", "watts"),
    "kW": ("kilowatt", "kilowatts"),
    "mL": ("millilitre", "millilitres"),
    "ml": ("millilitre", "millilitres"),
    "L": ("litre", "litres"),
}
_UNIT = "|".join(re.escape(unit) for unit in sorted(_UNITS, key=len, reverse=True))


def _dotted(name: str, language: str) -> str:
    if language != "en":
        return name
    spoken = {".": " dot ", "_": " underscore ", "-": " dash ", "+": " plus "}
    return "".join(spoken.get(char, char) for char in name)


def _url(match: re.Match[str], language: str) -> str:
    # The host is what a listener can use; a path or query read aloud is noise.
    host = re.sub(r"^(?:https?://)?(?:www\.)?", "", match.group(0), flags=re.IGNORECASE)
    host = re.split(r"[/:?#]", host, maxsplit=1)[0]
    return _dotted(host, language)


def _email(match: re.Match[str], language: str) -> str:
    at = " at " if language == "en" else " @ "
    return _dotted(match["user"], language) + at + _dotted(match["domain"], language)


def _phone(match: re.Match[str], language: str) -> str:
    groups = re.findall(r"\d+", match.group(0))
    plus = "plus " if match.group(0).startswith("+") else ""
    return plus + " ".join(numbers.digit_by_digit(group, language) for group in groups)


def _money(match: re.Match[str], language: str) -> str:
    one, many, cent, cents = _CURRENCIES[match["symbol"] or match["code"]]
    amount = match["amount"] or match["amount2"]
    scale = match["scale"]
    if scale:
        scale_word = _SCALES.get(scale.lower(), scale.lower())
        return f"{numbers.decimal(amount)} {scale_word} {many}"
    whole, _, fraction = amount.replace(",", "").partition(".")
    said = f"{numbers.cardinal(whole)} {one if whole == '1' else many}"
    if fraction and len(fraction) == 2 and cent:
        hundredths = f"{numbers.cardinal(fraction.lstrip('0') or '0')} {cent if fraction == '01' else cents}"
        if whole.strip("0") == "":
            said = hundredths
        elif fraction != "00":
            said += f" and {hundredths}"
    elif fraction:
        said = f"{numbers.decimal(amount)} {many}"
    return said


def _percent(match: re.Match[str], language: str) -> str:
    return f"{_signed(match['sign'])}{numbers.decimal(match['amount'])} percent"


def _signed(sign: str | None) -> str:
    return "minus " if sign else ""


def _ampm(ampm: str | None) -> str:
    if not ampm:
        return ""
    return " " + " ".join(ampm.replace(".", "").upper())


def _clock(match: re.Match[str], language: str) -> str:
    hour, minute = match["hour"], match["minute"]
    said = numbers.cardinal(str(int(hour)))
    if minute == "00" and not match["ampm"]:
        said += " o'clock" if int(hour) <= 12 else " hundred"
    elif not minute or minute == "00":
        pass
    elif minute.startswith("0"):
        said += f" oh {numbers.cardinal(minute[1])}"
    else:
        said += f" {numbers.cardinal(minute)}"
    return said + _ampm(match["ampm"])


def _month(written: str) -> str:
    return next(month for month in _MONTHS if month.startswith(written[:3].title()))


def _with_year(said: str, year: str | None) -> str:
    return f"{said} {numbers.year(year)}" if year else said


def _date(month: str, day: str, year: str | None) -> str:
    return _with_year(f"{month} {numbers.ordinal(str(int(day)))}", year)


def _month_day(match: re.Match[str], language: str) -> str:
    return _date(_month(match["month"]), match["day"], match["year"])


def _day_month(match: re.Match[str], language: str) -> str:
    return _with_year(f"the {numbers.ordinal(str(int(match['day'])))} of {_month(match['month'])}", match["year"])


def _iso_date(match: re.Match[str], language: str) -> str:
    return _date(_MONTHS[int(match["m"]) - 1], match["d"], match["y"])


def _slash_date(match: re.Match[str], language: str) -> str | None:
    first, second = int(match["a"]), int(match["b"])
    month, day = (first, second) if first <= 12 else (second, first)  # US order unless impossible
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return None
    return _date(_MONTHS[month - 1], str(day), match["y"])


def _year_range(match: re.Match[str], language: str) -> str:
    return f"{numbers.year(match['a'])} to {numbers.year(match['b'])}"


def _ordinal(match: re.Match[str], language: str) -> str:
    return numbers.ordinal(match["n"])


def _decade(match: re.Match[str], language: str) -> str:
    said = numbers.year(match["y"])
    return said[:-1] + "ies" if said.endswith("y") else said + "s"


def _year(match: re.Match[str], language: str) -> str:
    return f"{match['word']} {numbers.year(match['y'])}"


def _unit(match: re.Match[str], language: str) -> str:
    one, many = _UNITS[match["unit"]]
    amount = match["amount"]
    return f"{_signed(match['sign'])}{numbers.decimal(amount)} {one if numbers.is_one(amount) else many}"


def _number(match: re.Match[str], language: str) -> str:
    return f"{_signed(match['sign'])}{numbers.decimal(match['amount'])}"


def _integer(match: re.Match[str], language: str) -> str:
    return numbers.cardinal(match.group(0), language)


_SIGN = r"(?:(?<![\w.,])(?P<sign>[-−]))?"
_NEUTRAL: list[Rule] = [
    (re.compile(r"\b(?:https?://|www\.)[^\s<>\"'()\[\]]*[^\s<>\"'()\[\].,;:!?]", re.IGNORECASE), _url),
    (re.compile(r"(?<![\w.+-])(?P<user>[\w.+-]+)@(?P<domain>[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)"), _email),
]
_ENGLISH: list[Rule] = [
    (
        re.compile(
            r"(?<![\w+])(?:\+\d{1,3}[ .-])?\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}(?!\d)|(?<![\w-])\d{3}-\d{4}(?![\w-])"
        ),
        _phone,
    ),
    (
        re.compile(
            rf"(?:(?P<symbol>[$€£¥₹])\s?(?P<amount>{_NUMBER})|(?P<code>USD|EUR|GBP)\s?(?P<amount2>{_NUMBER}))"
            r"(?:\s?(?P<scale>thousand|million|billion|trillion|[kKmMbB]n?)\b)?"
        ),
        _money,
    ),
    (re.compile(rf"{_SIGN}(?P<amount>{_NUMBER})\s?%"), _percent),
    (re.compile(r"\b(?P<y>\d{4})-(?P<m>0[1-9]|1[0-2])-(?P<d>0[1-9]|[12]\d|3[01])\b"), _iso_date),
    (re.compile(r"(?<![\d/])(?P<a>\d{1,2})/(?P<b>\d{1,2})/(?P<y>\d{4})(?![\d/])"), _slash_date),
    (re.compile(r"(?<![\w.-])(?P<a>1[1-9]\d\d|20\d\d)\s?[–-]\s?(?P<b>1[1-9]\d\d|20\d\d)(?![\w.-])"), _year_range),
    # "3-5 days", "10:30-11:30": a dash between two numbers is "to" (dates and phone numbers are words by now)
    (re.compile(r"(?<=\d)\s?[–—-]\s?(?=\d)"), lambda m, lang: " to "),
    (re.compile(rf"\b{_MONTH}\.?\s+{_DAY}(?:st|nd|rd|th)?\b(?:,?\s+(?P<year>\d{{4}})\b)?"), _month_day),
    (re.compile(rf"\b{_DAY}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH}\b\.?(?:,?\s+(?P<year>\d{{4}})\b)?"), _day_month),
    (
        re.compile(rf"(?<![\d:.])(?P<hour>[01]?\d|2[0-3]):(?P<minute>[0-5]\d)(?::[0-5]\d)?(?![\d:])(?:\s?{_AMPM})?"),
        _clock,
    ),
    (re.compile(rf"(?<![\d:.])(?P<hour>1[0-2]|0?[1-9])(?P<minute>)\s?{_AMPM}"), _clock),
    (re.compile(r"\b(?P<n>\d+)(?:st|nd|rd|th)\b"), _ordinal),
    (re.compile(r"\b(?P<y>1[1-9]\d0|20\d0)s\b"), _decade),
    (
        re.compile(
            r"\b(?P<word>[Ii]n|[Ss]ince|by|[Ff]rom|until|of|year|[Dd]uring|before|after)\s+(?P<y>1[1-9]\d\d|20\d\d)\b(?![.,]\d)"
        ),
        _year,
    ),
    (re.compile(rf"{_SIGN}(?P<amount>{_NUMBER})\s?(?P<unit>{_UNIT})(?![\w/°])"), _unit),
    (re.compile(rf"{_SIGN}(?<![\w.])(?P<amount>\d+(?:\.\d+){{2,}}|{_NUMBER})(?![\w])"), _number),
    (re.compile(r"\be\.g\.(?=\s)"), lambda m, lang: "for example"),
    (re.compile(r"\bi\.e\.(?=\s)"), lambda m, lang: "that is"),
    (re.compile(r"(?<=\s)&(?=\s)"), lambda m, lang: "and"),
    (re.compile(r"#(?=\d)"), lambda m, lang: "number "),
]
# Other languages: integers only, never part of a decimal written either way ("3,5" and "3.5" stay).
_INTEGERS: list[Rule] = [(re.compile(r"(?<![\w.,])\d+(?!\w|[.,]\d)"), _integer)]


@lru_cache(maxsize=64)
def rules_for(language: str) -> list[Rule]:
    if language == "en":
        return _NEUTRAL + _ENGLISH
    return _NEUTRAL + (_INTEGERS if numbers.has_words_for(language) else [])


def verbalize(text: MappedText, language: str = "en") -> MappedText:
    for pattern, say in rules_for(language):
        text = text.sub(pattern, lambda match, say=say: say(match, language))
    return text
