"""The scheduler's output stage, on its own thread: cancellation checks, codec decoding, sending, retiring.

The stepper cuts a stream's chunk when it is due (`engine.cut_chunk`) and hands the stream over (or, while the
watermarker holds it back, now and then for a cancellation check); it goes on stepping the stream meanwhile, but
cuts its next chunk only once the stream is handed back (the engine's thread rule, csm_tts/speech/engine.py). One
round takes every stream handed over since the last round, in that order: a stream's chunks leave in order, and the
due chunks of a round are decoded by one `engine.take_chunks` call. Ended streams go back to the stepper, which
releases their slots (a step may be using them while they end here).
"""

from __future__ import annotations

import threading
import time
import traceback

from csm_tts.speech.jobs import Job


class OutputStage:
    """Part of `StreamScheduler` (a base class): its state (lock, active streams, outbox) is the scheduler's."""

    _wake: threading.Condition
    _outbox: list[Job]
    _active: list[Job]
    _retired: list[Job]
    _stopping: bool
    _threads: list[threading.Thread]

    def _output_next(self) -> bool:
        """One round of the output stage: the streams handed over since the last round, in order."""
        with self._wake:
            while not self._outbox:
                if self._stopping and not self._threads[1].is_alive():
                    return False
                self._wake.wait(0.5 if self._stopping else None)
            jobs, self._outbox = self._outbox, []
        due, back, done = [], [], []
        for job in jobs:
            if job.ended:  # failed from another thread
                done.append(job)
                continue
            cancelled = self._cancelled(job)  # once per chunk (and now and then while held), not every frame
            if cancelled is None:  # its sink failed (and the stream with it)
                done.append(job)
            elif cancelled:
                self.log(f"Cancelling the request {job.stream.stream_id} after {job.stream.frames_generated} frames")
                self._end_cancelled(job)
                done.append(job)
            else:
                (due if job.stream.due is not None else back).append(job)  # a chunk, or a check while held
        if due:
            self._decode_and_send(due, back, done)
        with self._wake:
            for job in back:
                job.handed_over = False
            if done:  # their slots are released by the stepper: it may be stepping them right now
                self._active = [j for j in self._active if j not in done]
                self._retired.extend(done)
            self._wake.notify_all()
        return True

    def _decode_and_send(self, due: list[Job], back: list[Job], done: list[Job]) -> None:
        try:
            started = time.perf_counter()
            chunks = self.engine.take_chunks([job.stream for job in due])
            elapsed = time.perf_counter() - started
            self._observe(lambda o: o.chunks_decoded(elapsed, len(due)))
        except Exception as e:
            self._failed(due, e, "decoding audio")
            done.extend(due)
            return
        for job, chunk in zip(due, chunks, strict=True):
            stream = job.stream
            try:
                started = time.perf_counter()
                if job.ended or (chunk.is_last and not job.claim_end()):
                    done.append(job)  # failed from another thread meanwhile: its final response is sent
                    continue
                job.sink.send_chunk(stream, chunk)
                elapsed = time.perf_counter() - started
                self._observe(lambda o, s=elapsed: o.chunk_sent(s))
            except Exception as e:
                self._fail(job, f"stream {stream.stream_id} failed: {type(e).__name__}: {e}", traceback.format_exc())
                done.append(job)
                continue
            if job.hold.first_sent_at is None:
                job.hold.first_sent_at = time.monotonic()
            (done if job.ended else back).append(job)
