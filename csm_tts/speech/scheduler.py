"""Runs all active streams of one model instance, interleaved frame by frame, on three background threads.

Triton's `execute()` only validates and hands a request over (`submit`), so it returns at once and many requests
can be in flight on one instance. Like vLLM's engine core, stepping is split from output work:

- the *preparer* builds each queued request's prompt (tokenizing, Mimi encoding of context audio: up to a second
  for long contexts), so that work never stalls running streams;
- the *stepper* only runs batched frame steps: it admits prepared streams (prefill, at most one between two steps)
  and advances every stream that may run by one frame per round, cutting due chunks for the output stage (the
  engine's thread rule); a stream held back by the watermarker (flow_control.py) costs no step;
- the *output stage* checks each handed-over stream for cancellation (once per chunk, not every frame), decodes the
  due chunks of a round in one `engine.take_chunks` call, sends them in order and retires ended streams.

Admission is bounded: a full queue is refused (`ServerFull`); a queued request with no slot within `max_queue_wait_s`
(shorter while the watermarker is behind) gets UNAVAILABLE, before its prompt is built where it is not built yet.

Failures stay where they happen. A sink that raises (the client went away, a broken response sender) fails its own
stream; a batched step or decode that raises fails its streams; the others go on and the next request is served.
When the engine itself is broken (a probe computation on its device fails after an error, e.g. a CUDA error, or the
scheduler's own code fails), every stream fails at once with INTERNAL, `submit` refuses new requests with
`EngineBroken`, and `broken` says why (the adapter reports it and can take the server down for a restart).

An `observer` (csm_tts/triton/metrics.py) hears streams active/queued/held and each stage's time; never fatal.
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

from csm_tts.speech.engine import CsmEngine
from csm_tts.speech.flow_control import HOLD_POLL_S, FlowControl
from csm_tts.speech.jobs import EngineBroken, Job, SchedulerObserver, ServerFull, StreamSink
from csm_tts.speech.output_stage import OutputStage
from csm_tts.speech.request import GenerationRequest, InvalidRequest
from csm_tts.speech.stream import NoFreeSlot

log = logging.getLogger("csm_tts.speech.scheduler")
PREPARER_NICE = 5  # the prompt-building thread's CPU priority below the stepping thread's (Linux nice, 0-19)


class StreamScheduler(OutputStage):
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
        flow: FlowControl | None = None,
    ):
        if max_active < 1 or max_queued < 1:
            raise ValueError(f"need max_active >= 1 and max_queued >= 1, got {max_active} and {max_queued}")
        self.engine = engine
        self.max_active = min(max_active, engine.max_streams)  # a stream needs one of the engine's slots
        if self.max_active < max_active:
            logger(f"max_active_streams {max_active} lowered to the engine's {engine.max_streams} stream slots")
        self.max_queued = max_queued
        self.max_queue_wait_s = max_queue_wait_s
        self.flow = flow or FlowControl()
        if raised := self.flow.fit(engine.schedule.max_frames):  # a held stream must be able to finish a chunk
            logger(raised)
        self.observer = observer
        self.log = logger
        self.log_error = error_logger or logger
        self.on_broken = on_broken
        self.broken: str | None = None  # why the engine cannot serve any more
        self._waiting: collections.deque[Job] = collections.deque()  # submitted, prompt not built yet
        self._preparing: Job | None = None
        self._ready: collections.deque[Job] = collections.deque()  # prompt built, waiting for a batch slot
        self._active: list[Job] = []
        self._outbox: list[Job] = []  # handed to the output stage, in the order their chunks became due
        self._retired: list[Job] = []  # ended by the output stage; the stepper releases their slots
        self._held = 0
        self._wake = threading.Condition()
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._prepare_loop, name="csm-preparer", daemon=True),
            threading.Thread(target=self._loop, args=(self._step_next,), name="csm-stepper", daemon=True),
            threading.Thread(target=self._loop, args=(self._output_next,), name="csm-output", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, request: GenerationRequest, sink: StreamSink, stream_id: str | None = None) -> None:
        with self._wake:
            if self.broken is not None:
                raise EngineBroken(f"the speech engine failed and refuses requests until restarted: {self.broken}")
            if self._stopping:
                raise ServerFull("the model is shutting down")
            queued = self._queued()
            if queued >= self.max_queued:
                raise ServerFull(f"server is full ({len(self._active)} active streams, {queued} queued); retry later")
            self._waiting.append(Job(request, sink, stream_id))
            self._wake.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        """Let in-flight streams finish (bounded by `timeout`), then stop the threads."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _queued(self) -> int:
        return len(self._waiting) + len(self._ready) + (self._preparing is not None)

    # -- the threads ----------------------------------------------------------------------------------------------
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
            late = self._expired(time.monotonic())  # refused before any Mimi encoding is spent on them
            job = self._preparing = self._waiting.popleft() if self._waiting else None
        self._refuse_late(late)
        if job is None:
            return True
        try:
            self._prepare(job)
        finally:
            with self._wake:
                self._preparing = None
                self._wake.notify_all()
        return True

    def _step_next(self) -> bool:
        """One round of the stepper: refuse expired jobs, admit at most one, step every stream that may run."""
        with self._wake:
            while not (self._waiting or self._ready or self._active or self._retired):
                if self._stopping and self._preparing is None:
                    return False
                self._held = 0
                self._observe(lambda o: o.occupancy(0, self._queued(), 0))  # the last stream left: gauges go to 0
                self._wake.wait(0.5 if self._stopping else None)
            retired, self._retired = self._retired, []
            now = time.monotonic()
            late = self._expired(now)
            # At most one prefill between two batched steps, so a burst of new streams cannot freeze running ones.
            job = self._ready.popleft() if self._admissible(now) else None
            # A stream whose next chunk is due while its last one is still being decoded waits for the output stage.
            ready = self.engine.chunk_ready
            candidates = [j for j in self._active if not j.ended and not (j.handed_over and ready(j.stream))]
        for gone in retired:  # slots are released here, never while a step may use them
            self._release(gone)
        self._refuse_late(late)
        if job is not None:
            self._admit(job)
        stepping, checks = self._not_held(candidates, now)
        if stepping:
            self._step(stepping)
        due = [j for j in stepping if not j.handed_over and self.engine.chunk_ready(j.stream)]
        for ready in due:
            self.engine.cut_chunk(ready.stream)
        self._hand_over(checks + due)
        self._observe(lambda o: o.occupancy(len(self._active), self._queued(), self._held, self._behind(now)))
        if not stepping and job is None:
            self._idle()
        return True

    def _idle(self) -> None:
        """Nothing ran this round: wait for the output stage to hand a stream back, a new job, or (polling) the
        watermarker's progress and the queue's deadlines."""
        with self._wake:
            if self._retired or sum(1 for j in self._active if not j.handed_over and not j.ended) > self._held:
                return  # handed back or retired meanwhile
            if self._held or self._queued():
                self._wake.wait(HOLD_POLL_S if self._held else 0.05)
            elif not self._admissible(time.monotonic()):
                self._wake.wait(0.5 if self._stopping else None)

    def _not_held(self, jobs: list[Job], now: float) -> tuple[list[Job], list[Job]]:
        """The jobs to step this round, and held jobs due for a cancellation check (flow_control.py)."""
        stepping, checks, ended = self.flow.sort(jobs, now, self.log_error)
        self._held = len(jobs) - len(stepping)
        for seconds in ended:
            self._observe(lambda o, s=seconds: o.hold_ended(s))
        return stepping, checks

    def _step(self, stepping: list[Job]) -> None:
        try:
            started = time.perf_counter()
            self.engine.step_many([job.stream for job in stepping])
            elapsed = time.perf_counter() - started
            self._observe(lambda o: o.frame_step(elapsed, len(stepping)))
        except Exception as e:  # a failed batch fails its streams, not the server
            self._failed(stepping, e, "a batched step")
            self._hand_over(list(stepping))  # ended: the output stage retires them
            stepping.clear()

    def _hand_over(self, jobs: list[Job]) -> None:
        if jobs:
            with self._wake:
                for job in jobs:
                    if not job.handed_over:
                        job.handed_over = True
                        self._outbox.append(job)
                self._wake.notify_all()

    # -- admission ------------------------------------------------------------------------------------------------
    def _expired(self, now: float) -> list[tuple[Job, str]]:
        """Queued jobs that waited longer than they may for a slot, and why; holding the lock. In admission order, the
        first jobs have a free slot each (they only wait for their turn, one prefill a round) and never expire."""
        behind = self._behind(now)
        limit = self.flow.queue_wait_s(self.max_queue_wait_s, behind)
        if limit is None:
            return []
        slots = 0 if behind else self.max_active - len(self._active)
        order = [*self._ready, *([self._preparing] if self._preparing else []), *self._waiting]
        late = [j for j in order[slots:] if j is not self._preparing and now - j.queued_at > limit]
        for job in late:
            (self._ready if job.prompt is not None else self._waiting).remove(job)
        slot = f"no stream slot became free within {{:.1f}} s ({len(self._active)} streams active)"
        why = "the watermarker is behind real time (streams wait for it)" if behind else slot
        return [(job, why.format(now - job.queued_at)) for job in late]

    def _refuse_late(self, late: list[tuple[Job, str]]) -> None:
        for job, why in late:
            message = f"{why}; retry in a moment or on another server"
            self.log(f"refusing a queued request: {message}")
            self._send_error(job, message, "UNAVAILABLE")

    def _admissible(self, now: float) -> bool:
        return bool(self._ready) and len(self._active) < self.max_active and not self._behind(now)  # flow_control.py

    def _behind(self, now: float | None = None) -> bool:  # no stream left (cancelled ones ended): nobody waits
        return bool(self._active) and self.flow.behind(now)

    # -- one job ----------------------------------------------------------------------------------------------------
    def _prepare(self, job: Job) -> None:
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
        job.queued_at += took_ms / 1000  # the queue wait bound counts waiting, not building its own prompt
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

    def _admit(self, job: Job) -> None:
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

    def _release(self, job: Job) -> None:
        """Cancelled or failed streams still hold their engine slot (finished ones free theirs themselves)."""
        if job.stream is not None:
            try:
                self.engine.release(job.stream)
            except Exception as e:
                self.log_error(f"stream {job.name}: could not release its slot: {type(e).__name__}: {e}")
        if job.hold.since is not None:
            seconds, job.hold.since = time.monotonic() - job.hold.since, None
            self._observe(lambda o: o.hold_ended(seconds))

    def _observe(self, report) -> None:
        """Metrics must never stop the scheduler."""
        if self.observer is None:
            return
        try:
            report(self.observer)
        except Exception as e:
            self.log(f"metrics observer failed: {e}")

    # -- failures -----------------------------------------------------------------------------------------------------
    def _gone_before_start(self, job: Job) -> bool:
        """True when a waiting job was cancelled (it gets its final response) or its sink failed (it has failed)."""
        cancelled = self._cancelled(job)
        if cancelled:
            self.log("Cancelling the request before it started")
            self._end_cancelled(job)
        return cancelled is not False

    def _cancelled(self, job: Job) -> bool | None:
        """The sink's answer; None when asking failed (then the job has been failed)."""
        try:
            return bool(job.sink.is_cancelled())
        except Exception as e:
            self._fail(job, f"stream {job.name} failed: its cancellation check raised {type(e).__name__}: {e}")
            return None

    def _failed(self, jobs: list[Job], error: Exception, during: str) -> None:
        """An engine call raised. If the device still computes, only these jobs fail; otherwise the engine is broken."""
        trace = traceback.format_exc()
        try:
            self.engine.check_health()
        except Exception as probe:
            self._break(f"{type(error).__name__}: {error} (during {during}; device probe: {probe})", trace)
            return
        for job in jobs:
            self._fail(job, f"stream {job.name} failed during {during}: {type(error).__name__}: {error}", trace)

    def _fail(self, job: Job, message: str, trace: str | None = None) -> None:
        self.log_error(message + (f"\n{trace}" if trace else ""))
        self._send_error(job, message, "INTERNAL")

    def _send_error(self, job: Job, message: str, code: str) -> None:
        if not job.claim_end():
            return
        try:
            job.sink.send_error(message, code)
        except Exception as e:  # the client may be gone already; nothing more can be told
            self.log_error(f"stream {job.name}: could not send its final {code} response: {type(e).__name__}: {e}")

    def _end_cancelled(self, job: Job) -> None:
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
            self._active, self._outbox, self._retired = [], [], []
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
