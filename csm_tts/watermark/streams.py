"""Many streams: what the Triton `watermarker` model keeps between requests."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from csm_tts.watermark.dsp import check_lookahead
from csm_tts.watermark.streaming import DEFAULT_LOOKAHEAD_FRAMES, StreamingWatermarker, watermark_together
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
class Chunk:
    """One chunk of a stream, as it arrives. key None: watermark off for this stream."""

    stream_id: str
    key: Sequence[int] | None
    key_id: str
    audio: np.ndarray
    chunk_index: int
    sample_offset: int
    is_last: bool


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
    unsent: np.ndarray | None = None  # output held back until it reaches the minimum message length


@dataclass
class _Plan:
    """What one pass does for one chunk: audio for the stream's watermarker, and whether the stream ends."""

    state: _StreamState
    audio: np.ndarray
    finished: bool


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
        min_chunk_samples: int = 0,
        pack_frames: int | None = None,
        clock=None,
    ):
        self.model = model
        self.lookahead_frames = check_lookahead(model, lookahead_frames)
        self.message_sdr = message_sdr
        self.idle_timeout_s = idle_timeout_s
        self.max_streams = max_streams
        self.min_chunk_samples = int(min_chunk_samples)
        self.pack_frames = pack_frames
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
        """Apply one chunk. key None: watermark off for this stream. Raises StreamError / TooManyStreams /
        StreamGone."""
        [result] = self.process_batch([Chunk(stream_id, key, key_id, audio, chunk_index, sample_offset, is_last)])
        if isinstance(result, Exception):
            raise result
        return result

    def process_batch(self, chunks: Sequence[Chunk]) -> list[ChunkResult | Exception]:
        """Apply one chunk of each of many streams in one pass (the networks run once per layer for all of them).
        A chunk that does not fit its stream gets its exception in its place and drops only its own stream."""
        if len({c.stream_id for c in chunks}) != len(chunks):
            raise ValueError("one pass takes at most one chunk per stream")
        with self._lock:
            plans: list[_Plan | Exception] = []
            for chunk in chunks:
                try:
                    plans.append(self._plan(chunk))
                except (StreamError, TooManyStreams, StreamGone) as e:
                    self._streams.pop(chunk.stream_id, None)  # a broken stream keeps nothing
                    plans.append(e)
            try:
                outputs = self._watermark(plans)
            except Exception:
                for chunk, plan in zip(chunks, plans, strict=True):
                    if not isinstance(plan, Exception):
                        self._streams.pop(chunk.stream_id, None)
                raise
            return [
                plan if isinstance(plan, Exception) else self._result(chunk.stream_id, plan, out)
                for chunk, plan, out in zip(chunks, plans, outputs, strict=True)
            ]

    def _plan(self, chunk: Chunk) -> _Plan:
        audio = np.ascontiguousarray(np.asarray(chunk.audio, dtype=np.float32).reshape(-1))
        stream_id, state = chunk.stream_id, self._streams.get(chunk.stream_id)
        if state is None:
            if stream_id in self._dropped:
                raise StreamGone(f"stream {stream_id} was {self._dropped[stream_id]}")
            if chunk.chunk_index != 0 or chunk.sample_offset != 0:
                raise StreamError(
                    f"stream {stream_id} is unknown here: its first chunk must be chunk 0 at "
                    f"sample 0, got chunk {chunk.chunk_index} at sample {chunk.sample_offset}"
                )
            if len(self._streams) >= self.max_streams:
                raise TooManyStreams(f"the watermarker holds {self.max_streams} streams already")
            watermarker = (
                None
                if chunk.key is None
                else StreamingWatermarker(
                    self.model, chunk.key, lookahead_frames=self.lookahead_frames, message_sdr=self.message_sdr
                )
            )
            state = self._streams[stream_id] = _StreamState(watermarker, chunk.key_id, self._clock(), held={})
        state.last_seen = self._clock()
        if chunk.chunk_index < state.next_index or chunk.chunk_index in state.held:
            raise StreamError(f"stream {stream_id}: chunk {chunk.chunk_index} arrived twice")
        state.held[chunk.chunk_index] = (audio, chunk.sample_offset, chunk.is_last)
        parts, finished = [], False
        while state.next_index in state.held:
            part, offset, last = state.held.pop(state.next_index)
            if offset != state.samples:
                raise StreamError(
                    f"stream {stream_id}: chunk {state.next_index} starts at sample {offset}, expected {state.samples}"
                )
            state.samples += part.size
            state.next_index += 1
            parts.append(part)
            if last:
                if state.held:
                    raise StreamError(f"stream {stream_id}: chunks after the last one")
                finished = True
        # Chunks released together go in as one push: the output does not depend on the chunking.
        return _Plan(state, np.concatenate(parts) if parts else np.zeros(0, np.float32), finished)

    def _watermark(self, plans: list[_Plan | Exception]) -> list[np.ndarray | None]:
        """Every planned stream's output of this pass: its pushes in one pass, then its flushes in another."""
        marked = [(i, p) for i, p in enumerate(plans) if isinstance(p, _Plan) and p.state.watermarker is not None]
        outputs: list[np.ndarray | None] = [p.audio if isinstance(p, _Plan) else None for p in plans]
        pushed = watermark_together([(p.state.watermarker, p.audio) for _, p in marked], self.pack_frames)
        ending = [(i, p) for i, p in marked if p.finished]
        flushed = watermark_together([(p.state.watermarker, None) for _, p in ending], self.pack_frames)
        for (i, _), out in zip(marked, pushed, strict=True):
            outputs[i] = out
        for (i, _), out in zip(ending, flushed, strict=True):
            outputs[i] = np.concatenate([outputs[i], out])
        return outputs

    def _result(self, stream_id: str, plan: _Plan, audio: np.ndarray) -> ChunkResult:
        """The response for a planned chunk. No message shorter than min_chunk_samples leaves except the stream's
        last: shorter output waits (this response carries none) and goes out with the next."""
        state = plan.state
        if state.unsent is not None:
            audio, state.unsent = np.concatenate([state.unsent, audio]), None
        if not plan.finished and audio.size < self.min_chunk_samples:
            state.unsent, audio = audio, np.zeros(0, np.float32)
        result = ChunkResult(
            audio=audio,
            chunk_index=state.sent,
            is_last=plan.finished,
            watermarked=state.watermarker is not None,
            key_id=state.key_id,
        )
        state.sent += 1
        if plan.finished:
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
