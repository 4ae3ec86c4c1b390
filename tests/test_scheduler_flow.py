"""Flow control and the output stage of the stream scheduler, without Triton: a sink whose watermark progress the
test controls stands in for the response sender and the watermarker's progress record."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import wait_for

from csm_tts import SAMPLE_RATE
from csm_tts.speech.flow_control import HELD_CHECK_S, FlowControl, Hold
from csm_tts.speech.request import GenerationRequest
from csm_tts.speech.scheduler import StreamScheduler

LONG = 4000  # ms: 50 frames, chunks of 2, 4, 8, 10, 10, 10, 6 frames


class ProgressSink:
    """A tts stream's sink: `done` is what the watermarker has taken (None: a direct client, never held)."""

    def __init__(self, done: int | None = 0):
        self.done = done
        self.chunks, self.errors, self.cancel_checks = [], [], 0
        self.cancelled = False
        self.stream = None
        self.ended = threading.Event()
        self.first = threading.Event()
        self.threads: set[str] = set()

    def send_chunk(self, stream, chunk):
        self.stream = stream
        self.chunks.append(chunk)
        self.threads.add(threading.current_thread().name)
        self.first.set()
        if chunk.is_last:
            self.ended.set()

    def send_error(self, message, code):
        self.errors.append((message, code))
        self.ended.set()

    def is_cancelled(self):
        self.cancel_checks += 1
        return self.cancelled

    def samples_done(self):
        return self.done

    def catch_up(self):
        """The watermarker takes everything sent so far."""
        self.done = sum(c.audio.size for c in self.chunks)


class Observer:
    def __init__(self):
        self.held, self.holds, self.decodes, self.sends, self.steps, self.occupancy_seen = [], [], [], [], [], []
        self.behind = []

    def occupancy(self, active, queued, held=0, behind=False):
        self.held.append(held)
        self.behind.append(behind)
        self.occupancy_seen.append((active, queued, held))

    def frame_step(self, seconds, streams):
        self.steps.append(streams)

    def chunks_decoded(self, seconds, chunks):
        self.decodes.append(chunks)

    def chunk_sent(self, seconds):
        self.sends.append(seconds)

    def hold_ended(self, seconds):
        self.holds.append(seconds)


class RecordingEngine:
    """The real engine; records which thread steps and decodes, and which jobs were prepared and started."""

    def __init__(self, engine, slow_prepare_s: float = 0.0):
        self._engine = engine
        self.slow_prepare_s = slow_prepare_s
        self.prepared, self.started, self.batches = [], [], []
        self.threads = {"step": set(), "decode": set()}

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def prepare(self, request):
        self.prepared.append(request.text)
        if request.text.startswith("slow"):
            time.sleep(self.slow_prepare_s)
        return self._engine.prepare(request)

    def start(self, prompt, stream_id=None):
        self.started.append(prompt.request.text)
        return self._engine.start(prompt, stream_id=stream_id)

    def step_many(self, streams):
        self.threads["step"].add(threading.current_thread().name)
        return self._engine.step_many(streams)

    def take_chunks(self, streams):
        self.threads["decode"].add(threading.current_thread().name)
        self.batches.append(len(streams))
        return self._engine.take_chunks(streams)


@pytest.fixture
def recording(engine):
    return RecordingEngine(engine)


def scheduler_for(engine, **options):
    messages, observer = [], Observer()
    options.setdefault("flow", FlowControl(max_unwatermarked_s=0.8, behind_queue_wait_s=0.2))
    sched = StreamScheduler(engine, logger=messages.append, observer=observer, **options)
    sched.messages, sched.observer_seen = messages, observer
    return sched


def submit(sched, sink, text="Hello.", ms=LONG, seed=1):
    sched.submit(GenerationRequest(text, max_audio_length_ms=ms, seed=seed), sink)
    return sink


def test_a_held_stream_is_not_stepped_and_resumes_when_the_watermarker_takes_its_audio(recording):
    sched = scheduler_for(recording, max_active=2, max_queued=2)
    try:
        sink = submit(sched, ProgressSink(done=0))
        # 0.8 s (10 frames, the largest chunk) may be ahead of the watermarker: the 2- and 4-frame chunks are sent,
        # 4 frames of the 8-frame chunk are made, then the stream is held.
        assert wait_for(lambda: len(sink.chunks) == 2 and sink.stream.frames_generated == 2 + 4 + 4)
        frames = sink.stream.frames_generated
        time.sleep(0.3)
        assert sink.stream.frames_generated == frames and len(sink.chunks) == 2, "a held stream was stepped"
        assert 1 in sched.observer_seen.held
        sink.catch_up()  # the watermarker reports progress: the stream runs again, one more chunk, held again
        assert wait_for(lambda: len(sink.chunks) == 3)
        assert sink.stream.frames_generated > frames
        assert sched.observer_seen.holds and sched.observer_seen.holds[0] >= 0.25  # held since ~frame 10, before 0.3 s
        deadline = time.monotonic() + 60
        while not sink.ended.is_set() and time.monotonic() < deadline:  # a watermarker that keeps up: to its end
            sink.catch_up()
            time.sleep(0.01)
        assert sink.chunks[-1].is_last and not sink.errors
        assert sink.stream.frames_generated == LONG // 80
    finally:
        sink.cancelled = True  # a failed check must not leave a held stream in the session's engine
        sched.close()


def test_direct_clients_and_unreporting_sinks_are_never_held(recording):
    sched = scheduler_for(recording, max_active=2, max_queued=2)
    try:
        direct = submit(sched, ProgressSink(done=None), ms=2000)
        assert direct.ended.wait(60) and direct.chunks[-1].is_last and not direct.errors
        assert set(sched.observer_seen.held) == {0}

        class Unreadable(ProgressSink):
            def samples_done(self):
                raise OSError("the progress record is gone")

        broken = submit(sched, Unreadable(done=0), ms=2000)
        assert broken.ended.wait(60) and broken.chunks[-1].is_last and not broken.errors
        assert set(sched.observer_seen.held) == {0}
        assert any("could not be read: the progress record is gone" in m for m in sched.messages)
    finally:
        sched.close()


def test_no_stream_starts_while_the_watermarker_is_behind_and_the_queue_is_refused_at_once(recording):
    sched = scheduler_for(recording, max_active=4, max_queued=4, max_queue_wait_s=30.0)
    try:
        held = submit(sched, ProgressSink(done=0))  # the watermarker never takes anything: behind real time
        assert wait_for(lambda: len(held.chunks) == 2) and wait_for(lambda: sched.flow.behind())
        assert wait_for(lambda: sched.observer_seen.behind[-1])  # what the csm_tts_watermarker_behind gauge shows
        asked = time.monotonic()
        late = submit(sched, ProgressSink(), text="Refused while the watermarker is behind.")
        assert late.ended.wait(10)
        took = time.monotonic() - asked
        assert not late.chunks and len(late.errors) == 1
        message, code = late.errors[0]
        assert code == "UNAVAILABLE" and "watermarker is behind" in message and "retry" in message
        # behind_queue_wait_s is 0.2 s, not max_queue_wait_s (30 s); the slack is for a busy machine.
        assert took < 3.0, took
        assert "Refused while the watermarker is behind." not in recording.started  # never prefilled
        held.cancelled = True  # the client leaves: noticed by a check while held, though it makes no chunk
        assert held.ended.wait(5 * HELD_CHECK_S + 5)
        assert held.errors == [("the request was cancelled", "CANCELLED")]
        assert wait_for(lambda: recording.streams_active == 0)
        assert wait_for(lambda: not sched.observer_seen.behind[-1])  # nobody waits any more: not behind
    finally:
        held.cancelled = True
        sched.close()


def test_flow_control_hold_and_behind_rules():
    flow, hold = FlowControl(max_unwatermarked_s=1.0), Hold(first_sent_at=100.0)
    # 2 s of audio watermarked 1 s after the first chunk: held (3 s sent), but its listener has audio to spare.
    assert flow.held(hold, 5 * SAMPLE_RATE, 2 * SAMPLE_RATE, now=101.0) and not flow.behind(101.0)
    # 2 s watermarked after 3 s: the listener ran dry, the watermarker is the bottleneck.
    assert flow.held(hold, 5 * SAMPLE_RATE, 2 * SAMPLE_RATE, now=103.0) and flow.behind(103.0)
    assert not flow.behind(103.0 + 1.5)  # forgotten once no held stream is behind for a while
    assert not flow.held(hold, 5 * SAMPLE_RATE, None, now=104.0)  # unknown progress never holds
    assert not FlowControl(max_unwatermarked_s=None).held(hold, 10**9, 0, now=104.0)
    assert flow.queue_wait_s(30.0, behind=True) == flow.behind_queue_wait_s and flow.queue_wait_s(30.0, False) == 30.0
    with pytest.raises(ValueError, match="max_unwatermarked_s"):
        FlowControl(max_unwatermarked_s=0)
    small = FlowControl(max_unwatermarked_s=0.5)
    assert "raised to 800" in small.fit(max_chunk_frames=10) and small.max_unwatermarked_s == 0.8
    assert small.fit(max_chunk_frames=10) is None and FlowControl(None).fit(50) is None


def test_an_expired_queued_job_is_refused_before_its_prompt_is_built(engine):
    slow = RecordingEngine(engine, slow_prepare_s=1.5)
    sched = scheduler_for(slow, max_active=1, max_queued=4, max_queue_wait_s=0.3, flow=FlowControl(None))
    try:
        # 20 s of audio: it must hold the slot past the slow prompt and the wait (4 s ran out on a quiet box).
        running = submit(sched, ProgressSink(None), text="Takes the only slot.", ms=20_000)
        assert running.first.wait(30)
        first = submit(sched, ProgressSink(None), text="slow prompt", ms=800)
        assert wait_for(lambda: "slow prompt" in slow.prepared)
        expired = submit(sched, ProgressSink(None), text="Expires in the queue.", ms=800)
        assert expired.ended.wait(10)
        assert expired.errors and expired.errors[0][1] == "UNAVAILABLE"
        assert not first.ended.is_set(), "refused while the prompt before it was still being built, not after"
        assert first.ended.wait(60)
        assert not running.ended.is_set(), "the 20 s stream ended first: this machine is too fast for the test"
        assert first.errors[0][1] == "UNAVAILABLE"  # built, then no slot for 0.3 s
        assert "Expires in the queue." not in slow.prepared  # no tokenizing, no Mimi encoding of its context
        running.cancelled = True
    finally:
        sched.close()


def test_jobs_with_a_free_slot_wait_for_their_turn_not_against_the_clock(engine):
    """Admission is one prefill per round: in a burst the last of the jobs that have a slot may wait longer than
    max_queue_wait_s for its turn, and is still served; only jobs with no slot expire."""
    slow = RecordingEngine(engine)
    sched = scheduler_for(slow, max_active=4, max_queued=8, max_queue_wait_s=0.01, flow=FlowControl(None))
    try:
        sinks = [submit(sched, ProgressSink(None), f"Burst {i}.", ms=400, seed=i) for i in range(6)]
        assert all(s.ended.wait(60) for s in sinks)
        served = [s for s in sinks if s.chunks and s.chunks[-1].is_last and not s.errors]
        assert len(served) >= 4 and all(s.errors[0][1] == "UNAVAILABLE" for s in sinks if s not in served)
    finally:
        sched.close()


def test_cancellation_is_checked_once_per_chunk_not_every_frame(recording):
    sched = scheduler_for(recording, max_active=2, max_queued=2, flow=FlowControl(None))
    try:
        sink = submit(sched, ProgressSink(None), ms=LONG)
        assert sink.ended.wait(60) and sink.chunks[-1].is_last
        # One check before its prompt is built, one before its prefill, then one per chunk: 7 chunks, 50 frames.
        assert sink.cancel_checks == len(sink.chunks) + 2 == 9
    finally:
        sched.close()


def test_the_output_stage_decodes_and_sends_off_the_frame_loop_in_order(recording):
    sched = scheduler_for(recording, max_active=4, max_queued=4, flow=FlowControl(None))
    try:
        sinks = [submit(sched, ProgressSink(None), f"Stream {i} speaks.", ms=2000, seed=i) for i in range(4)]
        assert all(s.ended.wait(60) for s in sinks)
        for sink in sinks:
            assert [c.index for c in sink.chunks] == list(range(len(sink.chunks)))
            offsets = [c.sample_offset for c in sink.chunks]
            assert offsets == [sum(c.audio.size for c in sink.chunks[:i]) for i in range(len(sink.chunks))]
            assert sink.chunks[-1].is_last and not sink.errors and sink.threads == {"csm-output"}
        assert recording.threads == {"step": {"csm-stepper"}, "decode": {"csm-output"}}
        assert max(recording.batches) > 1, "streams due in one round are decoded by one take_chunks call"
        seen = sched.observer_seen
        assert sum(seen.decodes) == sum(len(s.chunks) for s in sinks) == len(seen.sends)
        assert max(a for a, _, _ in seen.occupancy_seen) == 4
        assert wait_for(lambda: seen.occupancy_seen[-1] == (0, 0, 0))  # the gauges fall back once the last one left
    finally:
        sched.close()


def test_batched_streams_still_equal_their_solo_runs_through_the_output_stage(recording, engine):
    """The output stage hands a stream back after each chunk and decodes the chunks due in a round together: what
    each stream hears does not change (to float rounding: a batched decode sums in another order, ~2e-7)."""
    import numpy as np

    sched = scheduler_for(recording, max_active=3, max_queued=3, flow=FlowControl(None))
    try:
        # Joining one round apart, one frame shorter each: their last chunks fall due in the same round.
        requests = [
            GenerationRequest(f"Number {i}.", temperature=0, max_audio_length_ms=(14 - i) * 80) for i in range(3)
        ]
        sinks = [ProgressSink(None) for _ in requests]
        for request, sink in zip(requests, sinks, strict=True):
            sched.submit(request, sink)
        assert all(sink.ended.wait(60) for sink in sinks)
        assert max(recording.batches) > 1, "no two streams were decoded in one call"
    finally:
        sched.close()
    for request, sink in zip(requests, sinks, strict=True):  # the solo runs once nothing else runs
        solo = np.concatenate([c.audio for c in engine.generate(request)])
        assert np.abs(np.concatenate([c.audio for c in sink.chunks]) - solo).max() <= 5e-6
