"""Text that remembers where each of its characters came from.

Every stage of normalisation rewrites text; a client still needs to know which part of what it sent a segment of
audio speaks. `MappedText` keeps, for each output character, the half-open span of the ORIGINAL text it stands for.
A replacement maps all its characters to the span of what it replaced; an inserted character (a "." closing a
heading) maps to an empty span where it was inserted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class MappedText:
    text: str
    starts: tuple[int, ...]  # per character: where its source span starts in the original
    ends: tuple[int, ...]  # per character: where it ends (exclusive)

    @classmethod
    def identity(cls, text: str) -> MappedText:
        return cls(text, tuple(range(len(text))), tuple(range(1, len(text) + 1)))

    def __len__(self) -> int:
        return len(self.text)

    def source_span(self, start: int, end: int) -> tuple[int, int]:
        """The span of the original text that output characters [start, end) stand for."""
        if end > start:
            return min(self.starts[start:end]), max(self.ends[start:end])
        return self.position(start), self.position(start)

    def position(self, index: int) -> int:
        """Where in the original an empty range at output `index` sits."""
        if index < len(self.text):
            return self.starts[index]
        return self.ends[-1] if self.ends else 0

    def slice(self, start: int, end: int) -> MappedText:
        return MappedText(self.text[start:end], self.starts[start:end], self.ends[start:end])

    def sub(self, pattern: re.Pattern[str], replace: Callable[[re.Match[str]], str | None]) -> MappedText:
        """Like `pattern.sub`, keeping the map: `replace` returns the new text, or None to leave a match as it is."""
        matches = list(pattern.finditer(self.text))
        if not matches:
            return self
        out = Builder()
        done = 0
        for match in matches:
            if match.end() == match.start():
                continue
            new = replace(match)
            if new is None:
                continue
            out.copy(self, done, match.start())
            out.replace(new, *self.source_span(match.start(), match.end()))
            done = match.end()
        if done == 0:
            return self
        out.copy(self, done, len(self.text))
        return out.build()

    def strip(self) -> MappedText:
        head = len(self.text) - len(self.text.lstrip())
        return self.slice(head, len(self.text.rstrip()))


class Builder:
    """Assembles a MappedText piece by piece."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    @property
    def last_char(self) -> str:
        return self._text[-1][-1] if self._text else ""

    def copy(self, source: MappedText, start: int, end: int) -> None:
        if end > start:
            self._text.append(source.text[start:end])
            self._starts.extend(source.starts[start:end])
            self._ends.extend(source.ends[start:end])

    def replace(self, text: str, start: int, end: int) -> None:
        """`text` stands for the original span [start, end)."""
        if text:
            self._text.append(text)
            self._starts.extend([start] * len(text))
            self._ends.extend([end] * len(text))

    def insert(self, text: str) -> None:
        """Text that stands for nothing in the original (a pause), placed after what was built so far."""
        at = self._ends[-1] if self._ends else 0
        self.replace(text, at, at)

    def build(self) -> MappedText:
        return MappedText("".join(self._text), tuple(self._starts), tuple(self._ends))
