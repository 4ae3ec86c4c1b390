"""One stream's bookkeeping in the engine (its slots, RNG, frames, counters) and what it yields."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from csm_tts.speech.request import GenerationRequest


@dataclass(frozen=True)
class Prompt:
    """A request with its prompt built (tokenized text, Mimi-encoded context): everything before the prefill."""

    request: GenerationRequest
    embeds: torch.Tensor  # [1, positions, hidden]
    max_frames: int

    @property
    def length(self) -> int:
        return self.embeds.shape[1]


@dataclass(frozen=True)
class AudioChunk:
    index: int
    audio: np.ndarray  # float32, 24 kHz
    sample_offset: int
    is_last: bool
    finish_reason: str | None = None  # "eos" or "length" on the last chunk


class NoFreeSlot(RuntimeError):
    """Every batch slot is taken; the caller admits at most `max_streams` streams at a time."""


@dataclass(eq=False)
class Stream:
    """Per-stream bookkeeping: its slots in the engine (backbone batch, codec), RNG, frames and counters."""

    request: GenerationRequest
    stream_id: str
    max_frames: int
    prompt_length: int
    generator: torch.Generator | None
    kv_bytes_per_position: int
    slot: int | None = None  # the engine's batch slot, owned until the stream finishes or is released
    positions: int = 0  # positions of the backbone context filled (prompt, then one per frame fed back)
    # The engine's codec slot (the stream's decoder state), owned until its last chunk is taken or it is released.
    codec_slot: int | None = None
    pending: list[torch.Tensor] = field(default_factory=list)  # frames not yet cut into a chunk, each [32] on the CPU
    frames_generated: int = 0
    # The next chunk's frames, cut from `pending` when it fell due (`cut`); decoded by `CsmEngine.take_chunks`.
    due: list[torch.Tensor] | None = None
    due_is_last: bool = False
    chunk_index: int = 0
    samples_sent: int = 0
    finish_reason: str | None = None

    def cut(self) -> None:
        """The pending frames become the due chunk, and new frames start the next one (the stepping thread, once the
        chunk is due; the previous due chunk must have been taken)."""
        if self.due is not None:
            raise RuntimeError(f"stream {self.stream_id}: its previous chunk has not been taken yet")
        self.due, self.pending, self.due_is_last = self.pending, [], self.finished

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def kv_cache_bytes(self) -> int:
        """Backbone KV cache this stream's positions occupy (in its preallocated slot)."""
        return self.positions * self.kv_bytes_per_position
