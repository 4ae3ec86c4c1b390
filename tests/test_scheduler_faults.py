"""Fault injection into the stream scheduler: whatever raises, only the affected streams fail (INTERNAL, logged
with a traceback), the others complete, the next request is served, and no thread dies silently. A broken engine
fails every stream at once and refuses new requests."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import wait_for

from csm_tts.speech.request import GenerationRequest
from csm_tts.speech.scheduler import EngineBroken, StreamScheduler

SHORT = 6 * 80  # 3 chunks with the default schedule


class Sink:
    """Records a stream's output; `fail` names the method that raises (once it is called `after` times)."""

    def __init__(self, fail: str | None = None, after: int = 0, cancel_at_prepare: bool = False):
        self.chunks, self.errors = [], []
        self.fail, self.after, self.calls = fail, after, {"send_chunk": 0, "send_error": 0, "is_cancelled": 0}
        self.cancelled = cancel_at_prepare
        self.done = threading.Event()
        self.chunk_times: list[float] = []

    def _maybe_fail(self, method: str) -> None:
        self.calls[method] += 1
        if self.fail == method and self.calls[method] > self.after:
            self.done.set()
            raise ConnectionError(f"injected {method} failure")

    def send_chunk(self, stream, chunk):
        self._maybe_fail("send_chunk")
        self.chunks.append(chunk)
        self.chunk_times.append(time.monotonic())
        if chunk.is_last:
            self.done.set()

    def send_error(self, message, code):
        self._maybe_fail("send_error")
        self.errors.append((message, code))
        self.done.set()

    def is_cancelled(self):
        self._maybe_fail("is_cancelled")
        return self.cancelled

    @property
    def completed(self) -> bool:
        return bool(self.chunks) and self.chunks[-1].is_last and not self.errors


class FaultyEngine:
    """The real engine, with faults on demand: `fail_steps` batched steps raise, `fail_starts` prefills raise,
    `slow_prepare_s` delays building one prompt, `device_dead` makes the health probe fail."""

    def __init__(self, engine):
        self._engine = engine
        self.fail_steps = self.fail_starts = 0
        self.slow_prepare_s = 0.0
        self.device_dead = False
        self.prepared: list[str] = []
        self.started: list[str] = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def prepare(self, request):
        self.prepared.append(request.text)
        if self.slow_prepare_s and request.text.startswith("slow"):
            time.sleep(self.slow_prepare_s)
        return self._engine.prepare(request)

    def start(self, prompt, stream_id=None):
        self.started.append(prompt.request.text)
        if self.fail_starts:
            self.fail_starts -= 1
            raise RuntimeError("injected prefill failure")
        return self._engine.start(prompt, stream_id=stream_id)

    def step_many(self, streams):
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("injected step failure")
        return self._engine.step_many(streams)

    def check_health(self):
        if self.device_dead:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        return self._engine.check_health()


@pytest.fixture
def faulty(engine):
    return FaultyEngine(engine)


@pytest.fixture
def scheduler(faulty):
    messages, errors, broken = [], [], []
    sched = StreamScheduler(
        faulty, max_active=4, max_queued=8, logger=messages.append, error_logger=errors.append, on_broken=broken.append
    )
    sched.messages, sched.errors, sched.broken_calls = messages, errors, broken
    yield sched
    sched.close(timeout=60)


def submit(scheduler, sink, text="Hello.", ms=SHORT, **options):
    scheduler.submit(GenerationRequest(text, max_audio_length_ms=ms, seed=1, **options), sink)
    return sink


def assert_still_serving(scheduler):
    sink = submit(scheduler, Sink(), "Next request.")
    assert sink.done.wait(60) and sink.completed, sink.errors
    assert scheduler.broken is None


@pytest.mark.parametrize("method", ["send_chunk", "is_cancelled"])
def test_a_sink_that_raises_fails_only_its_own_stream(scheduler, method):
    others = [submit(scheduler, Sink()) for _ in range(2)]
    bad = submit(scheduler, Sink(fail=method, after=1), ms=2000)  # fails at its 2nd chunk of 5
    assert bad.done.wait(60)
    for sink in others:
        assert sink.done.wait(60) and sink.completed
    assert wait_for(lambda: scheduler.engine.streams_active == 0, timeout=10)  # every stream retired
    assert not bad.completed and bad.errors and bad.errors[0][1] == "INTERNAL" and "injected" in bad.errors[0][0]
    assert any("injected" in e for e in scheduler.errors)
    assert_still_serving(scheduler)


def test_a_sink_whose_send_error_raises_is_logged_and_the_rest_goes_on(scheduler):
    invalid = submit(scheduler, Sink(fail="send_error"), text="word " * 900, ms=90_000)  # too long: INVALID_ARG
    other = submit(scheduler, Sink())
    assert invalid.done.wait(60) and other.done.wait(60) and other.completed
    deadline = time.monotonic() + 10
    while not any("could not send its final INVALID_ARG" in e for e in scheduler.errors):
        assert time.monotonic() < deadline, scheduler.errors
        time.sleep(0.02)
    assert_still_serving(scheduler)


def test_a_failing_batched_step_fails_its_streams_and_the_next_request_is_served(scheduler, faulty):
    running = submit(scheduler, Sink(), ms=4000)
    assert wait_for(lambda: running.chunks)
    faulty.fail_steps = 1
    assert running.done.wait(60)
    assert running.errors and running.errors[0][1] == "INTERNAL" and "injected step failure" in running.errors[0][0]
    assert any("Traceback" in e and "injected step failure" in e for e in scheduler.errors)
    assert_still_serving(scheduler)


def test_a_failing_prefill_fails_that_request_only(scheduler, faulty):
    running = submit(scheduler, Sink(), ms=2000)
    assert wait_for(lambda: running.chunks)
    faulty.fail_starts = 1
    failed = submit(scheduler, Sink(), text="Fails at its prefill.")
    assert failed.done.wait(60) and failed.errors[0][1] == "INTERNAL" and "prefill" in failed.errors[0][0]
    assert running.done.wait(60) and running.completed
    assert_still_serving(scheduler)


def test_a_broken_device_fails_every_stream_and_refuses_new_requests(scheduler, faulty):
    sinks = [submit(scheduler, Sink(), ms=4000) for _ in range(3)]
    assert wait_for(lambda: all(s.chunks for s in sinks))
    faulty.device_dead = True
    faulty.fail_steps = 1
    for sink in sinks:
        assert sink.done.wait(30)
        assert sink.errors[-1][1] == "INTERNAL" and "illegal memory access" in sink.errors[-1][0]
    assert "illegal memory access" in scheduler.broken
    assert len(scheduler.broken_calls) == 1
    with pytest.raises(EngineBroken, match="refuses requests until restarted"):
        submit(scheduler, Sink())


def test_a_request_cancelled_while_queued_is_never_prepared_or_prefilled(scheduler, faulty):
    cancelled = submit(scheduler, Sink(cancel_at_prepare=True), text="Cancelled while queued.")
    assert cancelled.done.wait(30) and cancelled.errors == [("the request was cancelled", "CANCELLED")]
    assert "Cancelled while queued." not in faulty.prepared and "Cancelled while queued." not in faulty.started
    assert_still_serving(scheduler)


def test_building_a_long_prompt_does_not_stall_running_streams(scheduler, faulty):
    """Prompts (tokenizer, Mimi encoding of context audio) are built on their own thread."""
    running = submit(scheduler, Sink(), ms=3200)
    assert wait_for(lambda: len(running.chunks) >= 2)
    faulty.slow_prepare_s = 2.0
    slow = submit(scheduler, Sink(), text="slow prompt")
    assert running.done.wait(60) and running.completed and slow.done.wait(60) and slow.completed
    gaps = [b - a for a, b in zip(running.chunk_times, running.chunk_times[1:], strict=False)]
    assert max(gaps) < 1.5, gaps  # a 2 s preparation would show as a 2 s gap on the stepping thread


@pytest.mark.parametrize("active, queued", [(0, 8), (4, 0), (-1, 1)])
def test_scheduler_refuses_limits_that_cannot_work(engine, active, queued):
    with pytest.raises(ValueError, match="max_active >= 1"):
        StreamScheduler(engine, max_active=active, max_queued=queued)
