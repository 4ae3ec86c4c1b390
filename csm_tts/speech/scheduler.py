"""Runs all active streams of one model instance, interleaved frame by frame, on two background threads.

Triton's `execute()` only validates and hands a request over (`submit`), so it returns at once and many requests
can be in flight on one instance. The *preparer* thread builds each queued request's prompt (tokenizing, Mimi
encoding of context audio: up to a second for long contexts), so that work never stalls running streams; the
*stepper* thread admits prepared streams (prefill, at most one between two steps), advances every active stream by
one frame per round, and sends a chunk whenever a stream's chunk schedule says so. A full queue is refused
(`ServerFull`, retry-able) instead of growing latency without bound, and a stream that waits longer than
`max_queue_wait_s` for a free slot is refused too (`UNAVAILABLE`, retry-able: another replica may have room).
Cancelled streams are dropped between frames, and a request cancelled while it waits is dropped before its prompt is
built or prefilled. Every stream that leaves gives its engine slot back.

Failures stay where they happen. A sink that raises (the client went away, a broken response sender) fails its own
stream; a batched step that raises fails the streams of that step; the others go on and the next request is served.
When the engine itself is broken (a probe computation on its device fails after an error, e.g. a CUDA error, or the
scheduler's own code fails), every stream fails at once with INTERNAL, `submit` refuses new requests with
`EngineBroken`, and `broken` says why (the adapter reports it and can take the server down for a restart).

An optional `observer` (csm_tts/triton/metrics.py in production) hears how many streams are active and queued and how
long each batched step took; a failing observer is logged, never fatal.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from csm_tts.speech.engine import CsmEngine
from csm_tts.speech.request import GenerationRequest, InvalidRequest
from csm_tts.speech.stream import AudioChunk, NoFreeSlot, Prompt, Stream

log = logging.getLogger("csm_tts.speech.scheduler")
PREPARER_NICE = 5  # the prompt-building thread's CPU priority below the stepping thread's (Linux nice, 0-19)


class ServerFull(RuntimeError):
    pass


class EngineBroken(RuntimeError):
    """The engine cannot serve any more (its device failed); the message says why."""


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
    prompt: Prompt | None = None
    stream: Stream | None = None
    ended: bool = False  # its final response was sent (or could not be): nothing more goes to its sink
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.stream.stream_id if self.stream is not None else (self.stream_id or "(queued)")


class SchedulerObserver(Protocol):
    def occupancy(self, active: int, queued: int) -> None: ...

    def frame_step(self, seconds: float, streams: int) -> None: ...


class StreamScheduler:
    def __init__(
        self,
        engine: CsmEngine,
        max_active: int = 8,
        max_queued: int = 32,
        logger: Callable[[str], None] = log.info,
        error_logger: Callable[[str], None] | None = None,
        on_broken: Callable[[str], None] | None = None,
        observer: SchedulerObserver | None = None,
        max_queue_wait_s: float | None = None,
    ):
        if max_active < 1 or max_queued < 1:
            raise ValueError(f"need max_active >= 1 and max_queued >= 1, got {max_active} and {max_queued}")
        self.engine = engine
        self.max_active = min(max_active, engine.max_streams)  # a stream needs one of the engine's slots
        if self.max_active < max_active:
            logger(f"max_active_streams {max_active} lowered to the engine's {engine.max_streams} stream slots")
        self.max_queued = max_queued
        self.max_queue_wait_s = max_queue_wait_s
        self.observer = observer
        self.log = logger
        self.log_error = error_logger or logger
        self.on_broken = on_broken
        self.broken: str | None = None  # why the engine cannot serve any more
        self._waiting: collections.deque[_Job] = collections.deque()  # submitted, prompt not built yet
        self._preparing: _Job | None = None
        self._ready: collections.deque[_Job] = collections.deque()  # prompt built, waiting for a batch slot
        self._active: list[_Job] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._prepare_loop, name="csm-preparer", daemon=True),
            threading.Thread(target=self._loop, args=(self._step_next,), name="csm-stepper", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def in_flight(self) -> int:
        with self._wake:
            return len(self._waiting) + len(self._ready) + len(self._active) + (self._preparing is not None)

    @property
    def healthy(self) -> bool:
        return self.broken is None

    def submit(self, request: GenerationRequest, sink: StreamSink, stream_id: str | None = None) -> None:
        with self._wake:
            if self.broken is not None:
                raise EngineBroken(f"the speech engine failed and refuses requests until restarted: {self.broken}")
            if self._stopping:
                raise ServerFull("the model is shutting down")
            queued = len(self._waiting) + len(self._ready) + (self._preparing is not None)
            if queued >= self.max_queued:
                raise ServerFull(f"server is full ({len(self._active)} active streams, {queued} queued); retry later")
            self._waiting.append(_Job(request, sink, stream_id))
            self._wake.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        """Let in-flight streams finish (bounded by `timeout`), then stop the threads."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- the two threads ------------------------------------------------------------------------------------------
    def _loop(self, work: Callable[[], bool]) -> None:
        """Run `work` until it says stop. Nothing escapes: a bug in the scheduler's own code breaks the engine loudly
        (every stream fails, requests are refused) instead of ending a thread silently with requests hanging."""
        while True:
            try:
                if not work():
                    return
            except Exception as e:
                self._break(f"the scheduler failed: {type(e).__name__}: {e}", traceback.format_exc())
                time.sleep(0.05)  # a loop that keeps failing must not spin

    def _prepare_loop(self) -> None:
        # Linux schedules threads as tasks with their own nice value: building a long prompt (seconds of Mimi
        # encoding on a CPU) then yields to the stepping thread, so a busy CPU slows the newcomer, not the streams.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREPARER_NICE)
        self._loop(self._prepare_next)

    def _prepare_next(self) -> bool:
        with self._wake:
            while not self._waiting and not self._stopping:
                self._wake.wait()
            if not self._waiting:
                return False  # stopping, nothing left to prepare
            job = self._preparing = self._waiting.popleft()
        try:
            self._prepare(job)
        finally:
            with self._wake:
                self._preparing = None
                self._wake.notify_all()
        return True

    def _step_next(self) -> bool:
        with self._wake:
            while not self._admissible() and not self._active:
                if self._stopping and not (self._waiting or self._ready or self._preparing):
                    return False
                self._wake.wait(0.5 if self._stopping else None)
            late = self._expired()
            # At most one prefill between two batched steps, so a burst of new streams cannot freeze running ones.
            job = self._ready.popleft() if self._admissible() else None
            queued = len(self._waiting) + len(self._ready) + (self._preparing is not None)
        for waited, expired in late:
            self._refuse_late(expired, waited)
        if job is not None:
            self._admit(job)
        if self._active:
            self._round()
        self._observe(lambda o: o.occupancy(len(self._active), queued))
        return True

    def _expired(self) -> list[tuple[float, _Job]]:
        """Prepared jobs that waited longer than `max_queue_wait_s` for a slot (oldest first); holding the lock."""
        expired = []
        now = time.monotonic()
        while self.max_queue_wait_s is not None and self._ready:
            waited = now - self._ready[0].queued_at
            if waited <= self.max_queue_wait_s:
                break
            expired.append((waited, self._ready.popleft()))
        return expired

    def _refuse_late(self, job: _Job, waited: float) -> None:
        message = (
            f"no stream slot became free within {waited:.1f} s ({len(self._active)} streams active); "
            "retry in a moment or on another server"
        )
        self.log(f"refusing a queued request: {message}")
        self._send_error(job, message, "UNAVAILABLE")

    def _admissible(self) -> bool:
        return bool(self._ready) and len(self._active) < self.max_active

    # -- one job ----------------------------------------------------------------------------------------------------
    def _prepare(self, job: _Job) -> None:
        if self._gone_before_start(job):
            return
        started = time.perf_counter()
        try:
            job.prompt = self.engine.prepare(job.request)
        except InvalidRequest as e:
            self._send_error(job, str(e), "INVALID_ARG")
            return
        except Exception as e:
            self._failed([job], e, "preparing its prompt")
            return
        took_ms = (time.perf_counter() - started) * 1000
        if job.request.context:
            self.log(
                f"prompt of {job.prompt.length} positions ({len(job.request.context)} context segments) "
                f"built in {took_ms:.0f} ms, beside the running streams"
            )
        with self._wake:
            if self.broken is not None:
                refused = True
            else:
                refused = False
                self._ready.append(job)
                self._wake.notify_all()
        if refused:
            self._send_error(job, f"the speech engine failed: {self.broken}", "INTERNAL")

    def _admit(self, job: _Job) -> None:
        if self._gone_before_start(job):
            return
        try:
            started = time.perf_counter()
            job.stream = self.engine.start(job.prompt, stream_id=job.stream_id)
            job.prompt = None  # the prefill holds what it needs
            # The prefill runs between two batched steps: this is how long a join stalls the running streams.
            self.log(
                f"stream {job.stream.stream_id} joined: prefill of {job.stream.prompt_length} positions took "
                f"{(time.perf_counter() - started) * 1000:.0f} ms ({len(self._active)} streams running)"
            )
        except InvalidRequest as e:
            self._send_error(job, str(e), "INVALID_ARG")
            return
        except NoFreeSlot as e:  # max_active keeps this from happening; if it does, another server may have room
            self._send_error(job, str(e), "UNAVAILABLE")
            return
        except Exception as e:  # a failure of one request must not stop the others
            self._failed([job], e, "starting")
            return
        with self._wake:
            self._active.append(job)

    def _round(self) -> None:
        """Advance every active stream by one frame in one batched step; send the chunks that are due."""
        done, stepping = [], []
        for job in self._active:
            if job.ended:  # failed from the other thread (a broken engine)
                done.append(job)
                continue
            cancelled = self._cancelled(job)
            if cancelled is None:  # its sink failed (and the stream with it)
                done.append(job)
            elif cancelled:
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
            self._failed(stepping, e, "a batched step")
            done.extend(stepping)
            stepping = []
        for job in stepping:
            stream = job.stream
            try:
                if self.engine.chunk_ready(stream) and not job.ended:
                    chunk = self.engine.take_chunk(stream)
                    job.ended = chunk.is_last
                    job.sink.send_chunk(stream, chunk)
            except Exception as e:
                self._fail(job, f"stream {stream.stream_id} failed: {type(e).__name__}: {e}", traceback.format_exc())
                done.append(job)
                continue
            if job.ended or (stream.finished and not stream.pending):
                done.append(job)
        for job in done:
            self._release(job)
        if done:
            with self._wake:
                self._active = [j for j in self._active if j not in done]
                self._wake.notify_all()

    def _release(self, job: _Job) -> None:
        """Cancelled or failed streams still hold their engine slot (finished ones free theirs themselves)."""
        if job.stream is not None:
            try:
                self.engine.release(job.stream)
            except Exception as e:
                self.log_error(f"stream {job.name}: could not release its slot: {type(e).__name__}: {e}")

    def _observe(self, report) -> None:
        """Metrics must never stop the scheduler."""
        if self.observer is None:
            return
        try:
            report(self.observer)
        except Exception as e:
            self.log(f"metrics observer failed: {e}")

    # -- failures -----------------------------------------------------------------------------------------------------
    def _gone_before_start(self, job: _Job) -> bool:
        """True when a waiting job was cancelled (it gets its final response) or its sink failed (it has failed)."""
        cancelled = self._cancelled(job)
        if cancelled:
            self.log("Cancelling the request before it started")
            self._end_cancelled(job)
        return cancelled is not False

    def _cancelled(self, job: _Job) -> bool | None:
        """The sink's answer; None when asking failed (then the job has been failed)."""
        try:
            return bool(job.sink.is_cancelled())
        except Exception as e:
            self._fail(job, f"stream {job.name} failed: its cancellation check raised {type(e).__name__}: {e}")
            return None

    def _failed(self, jobs: list[_Job], error: Exception, during: str) -> None:
        """An engine call raised. If the device still computes, only these jobs fail; otherwise the engine is broken."""
        trace = traceback.format_exc()
        try:
            self.engine.check_health()
        except Exception as probe:
            self._break(f"{type(error).__name__}: {error} (during {during}; device probe: {probe})", trace)
            return
        for job in jobs:
            self._fail(job, f"stream {job.name} failed during {during}: {type(error).__name__}: {error}", trace)

    def _fail(self, job: _Job, message: str, trace: str | None = None) -> None:
        self.log_error(message + (f"\n{trace}" if trace else ""))
        self._send_error(job, message, "INTERNAL")

    def _send_error(self, job: _Job, message: str, code: str) -> None:
        if job.ended:
            return
        job.ended = True
        try:
            job.sink.send_error(message, code)
        except Exception as e:  # the client may be gone already; nothing more can be told
            self.log_error(f"stream {job.name}: could not send its final {code} response: {type(e).__name__}: {e}")

    def _end_cancelled(self, job: _Job) -> None:
        """A cancelled request still gets its one final response (nobody may be listening any more)."""
        self._send_error(job, "the request was cancelled", "CANCELLED")

    def _break(self, reason: str, trace: str | None = None) -> None:
        """The engine cannot serve: fail every stream at once and refuse new requests."""
        with self._wake:
            first = self.broken is None
            if first:
                self.broken = reason
            jobs = [*self._waiting, *self._ready, *self._active]
            self._waiting.clear()
            self._ready.clear()
            self._active = []
            self._wake.notify_all()
        if first:
            self.log_error(
                f"the speech engine is broken, failing {len(jobs)} streams and refusing new requests: {reason}"
                + (f"\n{trace}" if trace else "")
            )
        for job in jobs:
            self._send_error(job, f"the speech engine failed: {reason}", "INTERNAL")
            self._release(job)
        if first and self.on_broken is not None:
            try:
                self.on_broken(reason)
            except Exception as e:
                self.log_error(f"on_broken failed: {type(e).__name__}: {e}")
