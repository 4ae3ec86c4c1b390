"""The segmenter for text that arrives in pieces: an LLM's tokens ("Hel", "lo", ",", " how") become segments that
are each worth one generation, cut as soon as it is safe to cut.

Rules, all decided on the text alone (so the same text gives the same segments however it was cut into pieces):

- a boundary counts only once a complete word follows it: "I saw Dr." may still become "I saw Dr. Smith"; and a
  sentence start is decided on the text up to the end of that word, never further (`_sentence_starts`);
- the first segment (of the stream, and again after each flush) is cut early to keep first audio low: at the first
  clause or sentence end ("Sure, " is a segment of its own; `first_min_chars` can ask for more), or, with none by
  `first_max_chars`, at the last word end before it (the first number of ElevenLabs' `chunk_length_schedule`);
  at 8 words/s this gives the first segment in 0.31 s instead of 1.38 s at the first sentence end (median of six
  LLM answers, scripts/bench_text_frontend.py);
- later segments end at sentence ends, at least `min_chars` long (so "Yes." does not become a generation of its own);
- no cut falls inside an open ``` code fence (the listing stays in one segment, which normalisation then skips),
  unless the budget forces one;
- a segment never exceeds the generation budget (`max_bytes`): a longer sentence is cut at its last clause end that
  fits, then at a word end (`boundaries.budget_cut`);
- `flush()` cuts whatever is waiting; text that has waited `max_wait_s` since its first character arrived is released
  at its last complete word when the caller polls (the clock is a parameter, so tests control time).

Offsets are in the whole received text, so each segment names its span of what the client sent.
"""

from __future__ import annotations

import re
import time
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass

from csm_tts.text.boundaries import budget_cut, clause_bounds, fitting_prefix, sentence_bounds, word_bounds
from csm_tts.text.budget import MAX_SEGMENT_BYTES

_SPACES = re.compile(r"\s+")
_WORD = re.compile(r"\S*")
_FENCE = re.compile(r"```")


def _solid_end(text: str, end: int) -> int:
    """The index after the last non-space character before `end`."""
    while end > 0 and text[end - 1].isspace():
        end -= 1
    return end


def _fence_ends(text: str, fences: list[int]) -> list[int]:
    """Where the line that closes a ``` code block ends (`fences`: where each ``` starts; every second one closes):
    a listing is a segment of its own."""
    line_ends = (text.find("\n", fence + 3) for fence in fences[1::2])
    return [end + 1 for end in line_ends if end >= 0]


@dataclass(frozen=True)
class StreamPolicy:
    first_min_chars: int = 1
    first_max_chars: int = 60
    early_first_cut: bool = True
    min_chars: int = 20
    max_bytes: int = MAX_SEGMENT_BYTES
    max_wait_s: float = 2.0
    language: str = "en"

    def __post_init__(self) -> None:
        if not 0 <= self.first_min_chars <= self.first_max_chars or self.first_max_chars < 1:
            raise ValueError("need 0 <= first_min_chars <= first_max_chars and first_max_chars >= 1")
        if self.first_max_chars > self.max_bytes:  # first_max_chars >= 1 (above), so max_bytes >= 1 too
            raise ValueError("need 1 <= first_max_chars <= max_bytes")
        if self.min_chars < 0 or not self.max_wait_s > 0:
            raise ValueError("min_chars must be >= 0 and max_wait_s > 0")


@dataclass(frozen=True)
class StreamSegment:
    """Text [start, end) of everything received so far, and why it was cut there."""

    text: str
    start: int
    end: int
    reason: str  # "first", "sentence", "budget", "flush", "waited"


class StreamSegmenter:
    def __init__(self, policy: StreamPolicy | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy or StreamPolicy()
        self._clock = clock
        self._buffer = ""
        self._offset = 0  # where the buffer starts in the received text
        self._first = True
        self._waiting_since: float | None = None
        self._arrivals: list[tuple[int, float]] = []  # (where a piece starts in the received text, when it came)
        self._sentence_decisions: dict[int, bool] = {}  # buffer index of a word -> does a sentence start there

    @property
    def pending(self) -> str:
        return self._buffer

    def feed(self, piece: str) -> list[StreamSegment]:
        """Take the next piece of text; return the segments it completes."""
        if piece:
            self._arrivals.append((self._offset + len(self._buffer), self._clock()))
        self._buffer += piece
        if self._waiting_since is None and self._buffer.strip():
            self._waiting_since = self._arrived_at(self._offset + len(self._buffer) - len(self._buffer.lstrip()))
        # Every rule waits for a complete word after a boundary, so only a piece with a space can settle a cut
        # (or a "word" already longer than a segment, which will be cut inside whatever follows).
        spaced = any(char.isspace() for char in piece) or self._overlong_word()
        settled = self._cut_settled() if spaced else []
        return settled + self.poll()

    def flush(self) -> list[StreamSegment]:
        """Cut everything that is waiting (the client said the text is complete for now)."""
        out = self._cut_settled(final=True)
        if self._buffer.strip():
            out.append(self._emit(len(self._buffer), "flush"))
        self._first = True
        return out

    def deadline(self) -> float | None:
        """When waiting text will be released if nothing else cuts it (clock time), or None."""
        if self._waiting_since is None:
            return None
        return self._waiting_since + self.policy.max_wait_s

    def poll(self) -> list[StreamSegment]:
        """Release text that has waited too long, at its last complete word."""
        due = self.deadline()
        if due is None or self._clock() < due:
            return []
        cut = self._horizon() if self._buffer[: self._horizon()].strip() else len(self._buffer)
        segment = self._emit(cut, "waited")
        if self._buffer.strip():  # a word still being written: give it a full wait of its own
            self._waiting_since = self._clock()
        return [segment]

    def _arrived_at(self, position: int) -> float:
        """When the piece holding `position` of the received text arrived."""
        while len(self._arrivals) > 1 and self._arrivals[1][0] <= position:
            self._arrivals.pop(0)
        return self._arrivals[0][1]

    def _horizon(self) -> int:
        """Where the last, perhaps incomplete, word starts: everything before it is complete words."""
        text = self._buffer
        end = len(text)
        while end > 0 and not text[end - 1].isspace():
            end -= 1
        return end

    def _overlong_word(self) -> bool:
        """The last word is still being written and is already longer than a segment may be (hostile input)."""
        return len(self._buffer) - self._horizon() > self.policy.max_bytes

    def _cut_settled(self, final: bool = False) -> list[StreamSegment]:
        out = []
        while self._buffer.strip():
            cut = self._next_cut(final)
            if cut is None:
                break
            out.append(self._emit(*cut))
        return out

    def _next_cut(self, final: bool) -> tuple[int, str] | None:
        text, policy = self._buffer, self.policy
        horizon = len(text) if final or self._overlong_word() else self._horizon()
        solid = _solid_end(text, horizon)  # a bound before this has a complete word after it
        limit = fitting_prefix(text, policy.max_bytes)
        # every cut falls before `reach`: look no further (a 10,000-character message is not rescanned per cut)
        reach = min(len(text), max(limit, policy.first_max_chars) + 64)
        window = text[:reach]
        fences = [match.start() for match in _FENCE.finditer(window)]
        closed = _fence_ends(window, fences)

        def usable(bound: int, least_chars: int) -> bool:
            # settled, long enough, and not inside an open code fence (a listing is cut whole)
            inside_fence = bisect_right(fences, bound - 3) % 2
            return bound < solid and not inside_fence and len(text[:bound].strip()) >= least_chars

        # Sentence starts cost a sentencex call each: they are decided only up to the first other candidate.
        if self._first and policy.early_first_cut:
            last, least = policy.first_max_chars, policy.first_min_chars
            others = sorted({*closed, *clause_bounds(window)})
            others = [b for b in others if b <= last and usable(b, least)][:1]
            sentences = [b for b in self._sentence_starts(others[0] if others else last, final) if usable(b, least)]
            if sentences or others:
                return min(sentences + others), "first"
            if last < solid:
                words = [b for b in word_bounds(window) if b <= last and text[:b].strip()]
                return (words[-1] if words else last), "first"
            return None
        fence_ends = [b for b in closed if b <= limit and usable(b, 0)]
        others = [b for b in fence_ends if usable(b, policy.min_chars)][:1]
        sentences = [b for b in self._sentence_starts(others[0] if others else limit, final) if usable(b, 0)]
        long_enough = [b for b in sentences if usable(b, policy.min_chars)] + others
        if long_enough:
            return min(long_enough), "sentence"
        if limit < _solid_end(text, len(text)) and limit < solid:
            bounds = sorted({*sentences, *fence_ends})
            return budget_cut(window, policy.max_bytes, policy.language, bounds), "budget"
        return None

    def _sentence_starts(self, until: int, final: bool) -> list[int]:
        """Sentence starts up to `until`, each decided by sentencex on the text up to the end of the word it starts,
        never more: sentencex looks further ahead than one word ("1. **Back up**" is cut after "1." until a later
        sentence end appears), and a decision must not depend on how much text has arrived. The text looked at
        starts at the sentence before, itself decided this way. Decisions are remembered (`_sentence_decisions`)."""
        text = self._buffer
        first_word = len(text) - len(text.lstrip())
        starts = []
        for space in _SPACES.finditer(text, 0, min(until + 1, len(text))):
            start = space.end()
            if start >= len(text) or start <= first_word:
                continue
            if start not in self._sentence_decisions:
                end = _WORD.match(text, start).end()
                if end == len(text) and not final:
                    break  # the word is still being written
                since = starts[-1] if starts else 0  # from the sentence before: its start is decided the same way
                bounds = sentence_bounds(text[since:end], self.policy.language)
                self._sentence_decisions[start] = start - since in bounds
            if self._sentence_decisions[start]:
                starts.append(start)
        return starts

    def _keep_sentence_decisions(self, cut: int) -> None:
        """After a cut, a decision still holds if the text it looked at is unchanged: a sentence start lies between
        the cut and it (the text looked at starts at the sentence before)."""
        kept, sentence_between = {}, False
        for start in sorted(self._sentence_decisions):
            decided = self._sentence_decisions[start]
            if start > cut and sentence_between:
                kept[start - cut] = decided
            if start >= cut and decided:
                sentence_between = True
        self._sentence_decisions = kept

    def _emit(self, cut: int, reason: str) -> StreamSegment:
        segment = StreamSegment(self._buffer[:cut], self._offset, self._offset + cut, reason)
        self._buffer = self._buffer[cut:]
        self._offset += cut
        self._keep_sentence_decisions(cut)
        self._first = False
        waiting = len(self._buffer) - len(self._buffer.lstrip())
        self._waiting_since = self._arrived_at(self._offset + waiting) if self._buffer.strip() else None
        return segment
