"""The marker files that let the watermarker stop csm_1b's streams (csm_tts/triton/cancellation.py)."""

import os
import subprocess

import pytest

from csm_tts.triton import cancellation

STREAM = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def markers(tmp_path, monkeypatch):
    directory = tmp_path / "markers"
    monkeypatch.setenv("CSM_CANCEL_DIR", str(directory))
    yield directory
    cancellation.close_all()


def test_a_marker_lives_from_acceptance_to_the_end_of_its_stream(markers):
    assert cancellation.open_marker(STREAM)
    assert sorted(p.name for p in markers.iterdir()) == [STREAM, f"{STREAM}.done"]
    assert cancellation.stop_reason(STREAM) is None
    cancellation.close_marker(STREAM)
    assert not any(markers.iterdir())


def test_a_cancelled_stream_loses_its_marker(markers):
    assert cancellation.open_marker(STREAM)
    assert cancellation.stop_stream(STREAM) and cancellation.stop_reason(STREAM) == ""
    assert not cancellation.stop_stream(STREAM)  # a second stop (another cancelled chunk) creates nothing
    assert not cancellation.stop_stream(STREAM, "INTERNAL: late")
    cancellation.close_marker(STREAM)
    assert not any(markers.iterdir())


def test_a_failed_stream_carries_the_watermarkers_error_to_csm_1b(markers):
    assert cancellation.open_marker(STREAM)
    assert cancellation.stop_stream(STREAM, "UNAVAILABLE: stream was dropped\nafter 30 s")
    assert cancellation.stop_stream(STREAM, "INTERNAL: a second failure")  # the first error is the one reported
    assert cancellation.stop_reason(STREAM) == "UNAVAILABLE: stream was dropped after 30 s"
    cancellation.close_marker(STREAM)
    assert not any(markers.iterdir())


def test_stopping_an_ended_or_unknown_stream_leaves_nothing(markers):
    assert not cancellation.stop_stream(STREAM)  # the stream ended before its last chunk was cancelled
    assert not cancellation.stop_stream(STREAM, "INTERNAL: failed after its end")  # never creates the file
    assert not markers.exists() or not any(markers.iterdir())
    assert not cancellation.stop_stream("../../etc/passwd") and not cancellation.open_marker("../x")


def test_the_watermarkers_progress_reaches_csm_1b(markers):
    assert cancellation.samples_done(STREAM) is None  # no stream: unknown, never a reason to hold one back
    assert not cancellation.report_progress(STREAM, 1920)  # an ended stream gets no file
    assert not markers.exists() or not any(markers.iterdir())
    assert cancellation.open_marker(STREAM)
    assert cancellation.samples_done(STREAM) == 0
    assert cancellation.report_progress(STREAM, 123_456_789) and cancellation.report_progress(STREAM, 3840)
    assert cancellation.samples_done(STREAM) == 3840  # overwritten whole, not appended
    assert cancellation.stop_stream(STREAM)  # a cancel removes the marker; the record stays until csm_1b ends
    assert cancellation.report_progress(STREAM, 5760) and cancellation.samples_done(STREAM) == 5760
    cancellation.close_marker(STREAM)
    assert not any(markers.iterdir()) and not cancellation.report_progress(STREAM, 7680)


def test_a_marker_is_created_once(markers):
    assert cancellation.open_marker(STREAM)
    assert not cancellation.open_marker(STREAM)  # the id is taken: refused, not shared
    assert cancellation.stop_reason(STREAM) is None  # and the first stream's marker is untouched


def test_unload_removes_what_is_left_and_the_directory(markers):
    other = "f" * 32
    assert cancellation.open_marker(STREAM) and cancellation.open_marker(other)
    cancellation.close_all()
    assert not markers.exists()


def test_directories_of_servers_that_are_gone_are_removed(tmp_path, monkeypatch):
    monkeypatch.delenv("CSM_CANCEL_DIR", raising=False)
    monkeypatch.setattr(cancellation, "_base", lambda: tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"csm-tts-cancel-{dead.pid}").mkdir()
    (tmp_path / f"csm-tts-cancel-{dead.pid}" / STREAM).touch()
    (tmp_path / f"csm-tts-cancel-{os.getpid()}").mkdir()  # a running process: kept
    removed = cancellation.remove_stale_dirs()
    assert [p.name for p in removed] == [f"csm-tts-cancel-{dead.pid}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"csm-tts-cancel-{os.getpid()}"]
