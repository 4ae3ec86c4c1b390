"""Many streams: what the Triton `watermarker` model keeps between requests."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from csm_tts.watermark.dsp import check_lookahead
from csm_tts.watermark.streaming import DEFAULT_LOOKAHEAD_FRAMES, StreamingWatermarker
from csm_tts.watermark.weights import DEFAULT_MESSAGE_SDR, WatermarkModel


class StreamError(ValueError):
    """A chunk that does not fit its stream (the message is user-facing)."""


class TooManyStreams(RuntimeError):
    pass


class StreamGone(RuntimeError):
    """A chunk of a stream whose state was dropped (evicted while idle, or cancelled)."""


@dataclass
class ChunkResult:
    audio: np.ndarray
    chunk_index: int  # responses sent for this stream before this one
    is_last: bool
    watermarked: bool
    key_id: str


@dataclass
class EvictedStream:
    stream_id: str
    chunks: int
    idle_s: float


@dataclass
class _StreamState:
    watermarker: StreamingWatermarker | None  # None: watermark off for this stream (audio passes unchanged)
    key_id: str
    last_seen: float
    next_index: int = 0  # chunk_index expected next
    samples: int = 0  # samples received in order so far (the next chunk's sample_offset)
    held: dict[int, tuple[np.ndarray, int, bool]] | None = None  # chunks that arrived early, by chunk_index
    sent: int = 0


class WatermarkStreams:
    """Per-stream watermark state keyed by stream id; chunks of a stream are applied in chunk_index order.

    A stream starts at chunk 0. A later chunk that arrives before its predecessor is held (its response carries no
    audio) and applied when the gap is filled; the response that applies the last chunk flushes the watermarker and
    says is_last. Streams that stop sending (abandoned) are dropped by `evict_idle`, cancelled ones by `drop`; a
    chunk that arrives for a dropped stream gets `StreamGone` instead of silently starting a broken stream.
    Thread-safe: one lock around every operation.
    """

    REMEMBER_DROPPED = 4096

    def __init__(
        self,
        model: WatermarkModel,
        lookahead_frames: int = DEFAULT_LOOKAHEAD_FRAMES,
        message_sdr: float = DEFAULT_MESSAGE_SDR,
        idle_timeout_s: float = 30.0,
        max_streams: int = 256,
        clock=None,
    ):
        self.model = model
        self.lookahead_frames = check_lookahead(model, lookahead_frames)
        self.message_sdr = message_sdr
        self.idle_timeout_s = idle_timeout_s
        self.max_streams = max_streams
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._streams: dict[str, _StreamState] = {}
        self._dropped: dict[str, str] = {}  # recently dropped stream id -> why (insertion-ordered, bounded)

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def __contains__(self, stream_id: str) -> bool:
        with self._lock:
            return stream_id in self._streams

    def process(
        self,
        stream_id: str,
        key: Sequence[int] | None,
        key_id: str,
        audio: np.ndarray,
        chunk_index: int,
        sample_offset: int,
        is_last: bool,
    ) -> ChunkResult:
        """Apply one chunk. key None: watermark off for this stream. Raises StreamError / TooManyStreams."""
        audio = np.ascontiguousarray(np.asarray(audio, dtype=np.float32).reshape(-1))
        with self._lock:
            state = self._streams.get(stream_id)
            if state is None:
                if stream_id in self._dropped:
                    raise StreamGone(f"stream {stream_id} was {self._dropped[stream_id]}")
                if chunk_index != 0 or sample_offset != 0:
                    raise StreamError(
                        f"stream {stream_id} is unknown here: its first chunk must be chunk 0 at "
                        f"sample 0, got chunk {chunk_index} at sample {sample_offset}"
                    )
                if len(self._streams) >= self.max_streams:
                    raise TooManyStreams(f"the watermarker holds {self.max_streams} streams already")
                watermarker = (
                    None
                    if key is None
                    else StreamingWatermarker(
                        self.model, key, lookahead_frames=self.lookahead_frames, message_sdr=self.message_sdr
                    )
                )
                state = self._streams[stream_id] = _StreamState(watermarker, key_id, self._clock(), held={})
            state.last_seen = self._clock()
            try:
                return self._apply(stream_id, state, audio, chunk_index, sample_offset, is_last)
            except Exception:
                self._streams.pop(stream_id, None)  # a broken stream keeps nothing
                raise

    def _apply(self, stream_id, state, audio, chunk_index, sample_offset, is_last) -> ChunkResult:
        if chunk_index < state.next_index or chunk_index in state.held:
            raise StreamError(f"stream {stream_id}: chunk {chunk_index} arrived twice")
        state.held[chunk_index] = (audio, sample_offset, is_last)
        parts, finished = [], False
        while state.next_index in state.held:
            chunk, offset, last = state.held.pop(state.next_index)
            if offset != state.samples:
                raise StreamError(
                    f"stream {stream_id}: chunk {state.next_index} starts at sample {offset}, expected {state.samples}"
                )
            state.samples += chunk.size
            state.next_index += 1
            w = state.watermarker
            parts.append(chunk if w is None else w.push(chunk))
            if last:
                if state.held:
                    raise StreamError(f"stream {stream_id}: chunks after the last one")
                if w is not None:
                    parts.append(w.flush())
                finished = True
        result = ChunkResult(
            audio=np.concatenate(parts) if parts else np.zeros(0, np.float32),
            chunk_index=state.sent,
            is_last=finished,
            watermarked=state.watermarker is not None,
            key_id=state.key_id,
        )
        state.sent += 1
        if finished:
            del self._streams[stream_id]
        return result

    def drop(self, stream_id: str, why: str = "cancelled") -> bool:
        with self._lock:
            found = self._streams.pop(stream_id, None) is not None
            self._remember(stream_id, why)
            return found

    def _remember(self, stream_id: str, why: str) -> None:
        self._dropped.pop(stream_id, None)
        self._dropped[stream_id] = why
        while len(self._dropped) > self.REMEMBER_DROPPED:
            del self._dropped[next(iter(self._dropped))]

    def evict_idle(self) -> list[EvictedStream]:
        """Drop every stream that received nothing for idle_timeout_s; returns what was dropped (for the log)."""
        now = self._clock()
        with self._lock:
            idle = [(sid, s) for sid, s in self._streams.items() if now - s.last_seen > self.idle_timeout_s]
            for sid, s in idle:
                del self._streams[sid]
                self._remember(
                    sid,
                    f"dropped after {now - s.last_seen:.1f} s without chunks (idle timeout {self.idle_timeout_s:g} s)",
                )
        return [EvictedStream(sid, s.next_index, now - s.last_seen) for sid, s in idle]
