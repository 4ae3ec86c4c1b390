"""The watermarker's queue of chunks: what its batching thread takes for each pass, and what it drops.

The Triton `watermarker` is decoupled: `execute` only queues each chunk (`ChunkQueue.put`) and returns; one thread
takes passes (`next_pass`): at most one chunk per stream, in each stream's order, for one batched network pass
(`WatermarkStreams.process_batch`). When more streams wait than a pass takes, the chunks whose listeners need them
soonest go first: a chunk's playback deadline is when its stream's first chunk arrived plus the audio before it
(`progress - samples`). A new stream's first chunk is due at once, so it does not queue behind seconds of audio of
streams whose listeners have some in hand; a stream that fell behind real time is due before both.

Before each pass every queued chunk's request is asked whether it was cancelled; a stream with a cancelled chunk, or one
stopped by the adapter (`stop`, after a failure), loses every chunk it has queued, however long the queue: they come
back as `dropped`, to be answered without being watermarked. Triton 2.51 marks only the ensemble requests scheduled
after a client's cancel as cancelled, so a stream's older queued chunks learn of it from its newest one.

`request` is opaque here (the adapter's Triton request); `is_cancelled` is the adapter's question about it. Plain
Python, no Triton: tests/test_watermark_batching.py drives it directly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from csm_tts import SAMPLE_RATE


@dataclass
class QueuedChunk:
    stream_id: str
    samples: int  # audio samples in this chunk
    progress: int  # the stream's samples taken once this chunk is (sample_offset + samples): what csm_1b is told
    is_last: bool
    request: Any = None
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class Pass:
    batch: list[QueuedChunk]  # to watermark now: one per stream, oldest stream first
    dropped: list[QueuedChunk]  # of stopped or cancelled streams: to answer without audio
    cancelled: list[str]  # streams found cancelled in this pass (each reported once)


class ChunkQueue:
    REMEMBER_STOPPED = 4096

    def __init__(self, is_cancelled: Callable[[Any], bool], max_streams_per_pass: int = 64):
        if max_streams_per_pass < 1:
            raise ValueError("max_streams_per_pass must be at least 1")
        self.is_cancelled = is_cancelled
        self.max_streams_per_pass = max_streams_per_pass
        self._queue: list[QueuedChunk] = []
        self._stopped: dict[str, None] = {}  # insertion-ordered and bounded: recently stopped streams
        self._started: dict[str, float] = {}  # stream -> when its first chunk arrived (bounded like _stopped)
        self._samples = 0
        self._closed = False
        self._changed = threading.Condition()

    def put(self, chunk: QueuedChunk) -> None:
        with self._changed:
            if self._closed:
                raise RuntimeError("the watermarker is shutting down")
            self._queue.append(chunk)
            self._samples += chunk.samples
            if chunk.stream_id not in self._started:
                self._started[chunk.stream_id] = chunk.arrived
                _bound(self._started, self.REMEMBER_STOPPED)
            self._changed.notify()

    def stop(self, stream_id: str) -> None:
        """The stream is over for the watermarker: its queued and later chunks are dropped."""
        with self._changed:
            self._remember(stream_id)
            self._changed.notify()

    def stopped(self, stream_id: str) -> bool:
        with self._changed:
            return stream_id in self._stopped

    @property
    def depth(self) -> tuple[int, int]:
        """(chunks, audio samples) waiting."""
        with self._changed:
            return len(self._queue), self._samples

    def next_pass(self, timeout: float | None = None) -> Pass | None:
        """The next pass; None when nothing arrives within `timeout`, or the queue is closed and empty."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._queue or self._closed, timeout) or not self._queue:
                return None
            waiting = list(self._queue)
        # Asked without the lock (each question is a round trip to the server): execute() keeps queueing meanwhile.
        cancelled: list[str] = []
        for chunk in waiting:
            known = chunk.stream_id in cancelled or self.stopped(chunk.stream_id)
            if not known and self._asked_cancelled(chunk):
                cancelled.append(chunk.stream_id)
        with self._changed:
            for stream_id in cancelled:
                self._remember(stream_id)
            dropped = [c for c in self._queue if c.stream_id in self._stopped]
            for chunk in dropped:
                if chunk.is_last:  # nothing follows a stream's last chunk
                    self._stopped.pop(chunk.stream_id, None)
            stopped = {c.stream_id for c in dropped}
            heads: dict[str, QueuedChunk] = {}  # each stream's oldest chunk: later ones wait for it
            for chunk in self._queue:
                if chunk.stream_id not in stopped:
                    heads.setdefault(chunk.stream_id, chunk)
            batch = sorted(heads.values(), key=self._deadline)[: self.max_streams_per_pass]
            for chunk in (*dropped, *batch):
                if chunk.is_last:
                    self._started.pop(chunk.stream_id, None)
            gone = {id(c) for c in (*dropped, *batch)}
            self._queue = [c for c in self._queue if id(c) not in gone]
            self._samples = sum(c.samples for c in self._queue)
        return Pass(batch, dropped, cancelled)

    def close(self) -> list[QueuedChunk]:
        """No more chunks; returns what was still queued (to be answered)."""
        with self._changed:
            self._closed = True
            left, self._queue, self._samples = self._queue, [], 0
            self._changed.notify_all()
            return left

    def _asked_cancelled(self, chunk: QueuedChunk) -> bool:
        try:
            return bool(self.is_cancelled(chunk.request))
        except Exception:  # a question that fails says nothing: keep the chunk
            return False

    def _deadline(self, chunk: QueuedChunk) -> float:
        """When the stream's listener reaches this chunk, had every earlier one been answered on arrival."""
        return self._started.get(chunk.stream_id, chunk.arrived) + (chunk.progress - chunk.samples) / SAMPLE_RATE

    def _remember(self, stream_id: str) -> None:
        self._stopped.pop(stream_id, None)
        self._stopped[stream_id] = None
        _bound(self._stopped, self.REMEMBER_STOPPED)


def _bound(remembered: dict, size: int) -> None:
    """Forget the oldest entries of an insertion-ordered dict beyond `size` (streams that never sent a last chunk)."""
    while len(remembered) > size:
        del remembered[next(iter(remembered))]
