"""Runs all active streams of one model instance on one background thread, interleaved frame by frame.

Triton's `execute()` only validates and hands a request over (`submit`), so it returns at once and many requests
can be in flight on one instance; the scheduler thread admits queued streams (prefill), advances every active
stream by one frame per round, and sends a chunk whenever a stream's chunk schedule says so. A full queue is refused
(`ServerFull`, retry-able) instead of growing latency without bound, and a stream that waits longer than
`max_queue_wait_s` for a free slot is refused too (`UNAVAILABLE`, retry-able: another replica may have room).
Cancelled streams are dropped between frames. Every stream that leaves gives its engine slot back.
An optional `observer` (csm_tts/triton/metrics.py in production) hears how many streams are active and queued and how
long each batched step took.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Protocol

from csm_tts.speech.engine import AudioChunk, CsmEngine, GenerationRequest, InvalidRequest, Stream

log = logging.getLogger("csm_tts.speech.scheduler")


class ServerFull(RuntimeError):
    pass


class StreamSink(Protocol):
    """Where one request's output goes (a Triton response sender in production, a list in tests)."""

    def send_chunk(self, stream: Stream, chunk: AudioChunk) -> None: ...

    def send_error(
        self, message: str, code: str
    ) -> None: ...  # code: INVALID_ARG, UNAVAILABLE, INTERNAL or CANCELLED; ends the request

    def is_cancelled(self) -> bool: ...


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    sink: StreamSink
    stream_id: str | None = None
    stream: Stream | None = None
    queued_at: float = 0.0


class SchedulerObserver(Protocol):
    def occupancy(self, active: int, queued: int) -> None: ...

    def frame_step(self, seconds: float, streams: int) -> None: ...


class StreamScheduler:
    def __init__(
        self,
        engine: CsmEngine,
        max_active: int = 8,
        max_queued: int = 32,
        logger=log.info,
        observer: SchedulerObserver | None = None,
        max_queue_wait_s: float | None = None,
    ):
        self.engine = engine
        self.observer = observer
        self.max_active = min(max_active, engine.max_streams)  # a stream needs one of the engine's slots
        if self.max_active < max_active:
            logger(f"max_active_streams {max_active} lowered to the engine's {engine.max_streams} stream slots")
        self.max_queued = max_queued
        self.max_queue_wait_s = max_queue_wait_s
        self.log = logger
        self._queue: collections.deque[_Job] = collections.deque()
        self._active: list[_Job] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="csm-scheduler", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        with self._wake:
            return len(self._queue) + len(self._active)

    def submit(self, request: GenerationRequest, sink: StreamSink, stream_id: str | None = None) -> None:
        with self._wake:
            if self._stopping:
                raise ServerFull("the model is shutting down")
            if len(self._queue) >= self.max_queued:
                raise ServerFull(
                    f"server is full ({len(self._active)} active streams, {len(self._queue)} queued); retry later"
                )
            self._queue.append(_Job(request, sink, stream_id, queued_at=time.monotonic()))
            self._wake.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Let in-flight streams finish (bounded by `timeout`), then stop the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    # -- the scheduler thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._active and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self._queue and not self._active:
                    return
                expired = self._expired_jobs()
                # At most one prefill between two batched steps, so a burst of new streams cannot freeze running ones.
                job = self._queue.popleft() if self._queue and len(self._active) < self.max_active else None
            for waited, late in expired:
                self._refuse_late(late, waited)
            if job is not None:
                self._admit(job)
            if self._active:
                self._round()
            self._observe(lambda o: o.occupancy(len(self._active), len(self._queue)))

    def _expired_jobs(self) -> list[tuple[float, _Job]]:
        """Queued jobs that waited longer than `max_queue_wait_s` (oldest first); called holding the lock."""
        expired = []
        now = time.monotonic()
        while self.max_queue_wait_s is not None and self._queue:
            waited = now - self._queue[0].queued_at
            if waited <= self.max_queue_wait_s:
                break
            expired.append((waited, self._queue.popleft()))
        return expired

    def _refuse_late(self, job: _Job, waited: float) -> None:
        message = (
            f"no stream slot became free within {waited:.1f} s ({len(self._active)} streams active, "
            f"{len(self._queue)} queued); retry in a moment or on another server"
        )
        self.log(f"refusing a queued request: {message}")
        with contextlib.suppress(Exception):  # the client may be gone already
            job.sink.send_error(message, "UNAVAILABLE")

    def _admit(self, job: _Job) -> None:
        if job.sink.is_cancelled():
            self.log("Cancelling the request before it started")
            self._end_cancelled(job)
            return
        try:
            started = time.perf_counter()
            job.stream = self.engine.start(job.request, stream_id=job.stream_id)
            # The prefill runs between two batched steps: this is how long a join stalls the running streams.
            self.log(
                f"stream {job.stream.stream_id} joined: prefill of {job.stream.prompt_length} positions took "
                f"{(time.perf_counter() - started) * 1000:.0f} ms ({len(self._active)} streams running)"
            )
        except InvalidRequest as e:
            job.sink.send_error(str(e), "INVALID_ARG")
            return
        except Exception as e:  # a failure of one request must not stop the others
            self._fail(job, f"stream failed to start: {e}")
            return
        with self._wake:
            self._active.append(job)

    def _round(self) -> None:
        """Advance every active stream by one frame in one batched step; send the chunks that are due."""
        done, stepping = [], []
        for job in self._active:
            if job.sink.is_cancelled():
                self.log(f"Cancelling the request {job.stream.stream_id} after {job.stream.frames_generated} frames")
                self._end_cancelled(job)
                done.append(job)
            else:
                stepping.append(job)
        try:
            started = time.perf_counter()
            self.engine.step_many([job.stream for job in stepping])
            elapsed = time.perf_counter() - started
            self._observe(lambda o: o.frame_step(elapsed, len(stepping)))
        except Exception as e:  # a failed batch fails its streams, not the server
            for job in stepping:
                self._fail(job, f"stream {job.stream.stream_id} failed: {e}")
            done.extend(stepping)
            stepping = []
        for job in stepping:
            stream = job.stream
            try:
                if self.engine.chunk_ready(stream):
                    job.sink.send_chunk(stream, self.engine.take_chunk(stream))
            except Exception as e:
                self._fail(job, f"stream {stream.stream_id} failed: {e}")
                done.append(job)
                continue
            if stream.finished and not stream.pending:
                done.append(job)
        for job in done:
            self.engine.release(job.stream)  # cancelled or failed streams still hold their slot
        if done:
            with self._wake:
                self._active = [j for j in self._active if j not in done]

    def _observe(self, report) -> None:
        """Metrics must never stop the scheduler."""
        if self.observer is None:
            return
        try:
            report(self.observer)
        except Exception as e:
            self.log(f"metrics observer failed: {e}")

    def _fail(self, job: _Job, message: str) -> None:
        self.log(f"{message}\n{traceback.format_exc()}")
        try:
            job.sink.send_error(message, "INTERNAL")
        except Exception as e:  # the client may be gone already
            self.log(f"could not report the failure: {e}")

    def _end_cancelled(self, job: _Job) -> None:
        """A cancelled request still gets its one final response (nobody may be listening any more)."""
        with contextlib.suppress(Exception):
            job.sink.send_error("the request was cancelled", "CANCELLED")
