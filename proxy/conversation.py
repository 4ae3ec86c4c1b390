"""Voice continuity: the earlier chunks of one conversation turn become context segments for the next chunk.

CSM-1B keeps a speaker's voice steady when it sees the earlier text *and* audio. Its context window holds 2048
positions: about one per text token, one per 80 ms audio frame of context, plus the frames it is asked to generate.
`Conversation.context_for` picks the newest segments that fit (dropping the oldest first) using a generous estimate;
if the engine still says the prompt is too long, the caller drops more (proxy/generation.py). The budget's defaults
are csm_tts/limits.py's (PROXY_CONTEXT_* override them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from csm_tts import FRAME_MS, SAMPLE_RATE, SAMPLES_PER_FRAME, limits
from csm_tts.speech.length_rule import default_audio_length_ms
from csm_tts.speech.request import ContextSegment


@dataclass(frozen=True)
class ContextBudget:
    positions: int = limits.MODEL_POSITIONS
    tokens_per_byte: float = limits.CONVERSATION_TOKENS_PER_BYTE
    max_audio_s: float = limits.CONVERSATION_MAX_AUDIO_S
    max_segments: int = limits.CONVERSATION_MAX_SEGMENTS

    @classmethod
    def from_settings(cls, settings) -> ContextBudget:
        return cls(
            positions=settings.context_positions,
            tokens_per_byte=settings.context_tokens_per_byte,
            max_audio_s=settings.context_max_audio_s,
            max_segments=settings.context_max_segments,
        )

    def text_cost(self, text: str) -> int:
        return math.ceil(len(text.encode("utf-8")) * self.tokens_per_byte) + limits.CONTEXT_SEGMENT_OVERHEAD

    def segment_cost(self, segment: ContextSegment) -> int:
        return self.text_cost(segment.text) + math.ceil(segment.audio.size / SAMPLES_PER_FRAME) + 1

    def request_cost(self, text: str, max_audio_length_ms: int | None) -> int:
        """Positions of the text and of the audio it may produce: without a limit, the model's default for this
        text (csm_tts/speech/length_rule.py; its cap cannot be known here, so the rule's own value counts)."""
        if max_audio_length_ms is None:
            max_audio_length_ms = default_audio_length_ms(text, limits.MAX_AUDIO_LENGTH_MS)
        return self.text_cost(text) + max_audio_length_ms // FRAME_MS


@dataclass
class Conversation:
    """The finished chunks of one conversation, oldest first: a WebSocket or ElevenLabs session, one /stream/chunks
    request, or one long text's segments."""

    budget: ContextBudget
    segments: list[ContextSegment] = field(default_factory=list)

    def add(self, speaker: int, text: str, audio: np.ndarray) -> None:
        if audio.size == 0:
            return
        self.segments.append(ContextSegment(speaker, text, np.asarray(audio, dtype=np.float32)))
        # Keep no more than could ever be used.
        del self.segments[: max(0, len(self.segments) - self.budget.max_segments)]

    def context_for(self, text: str, max_audio_length_ms: int | None) -> list[ContextSegment]:
        free = self.budget.positions - self.budget.request_cost(text, max_audio_length_ms)
        max_samples = int(self.budget.max_audio_s * SAMPLE_RATE)
        chosen: list[ContextSegment] = []
        samples = 0
        for segment in reversed(self.segments):
            cost = self.budget.segment_cost(segment)
            if cost > free or samples + segment.audio.size > max_samples or len(chosen) >= self.budget.max_segments:
                break
            chosen.append(segment)
            free -= cost
            samples += segment.audio.size
        chosen.reverse()
        return chosen
