"""The side channel that lets the watermarker stop csm_1b when a tts client cancels."""

from csm_tts.triton.cancellation import signal_cancel, take_cancel


def test_a_signalled_stream_is_taken_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CSM_CANCEL_DIR", str(tmp_path))
    stream_id = "0123456789abcdef0123456789abcdef"
    assert not take_cancel(stream_id)
    signal_cancel(stream_id)
    assert take_cancel(stream_id) and not take_cancel(stream_id)
    assert not any(tmp_path.iterdir())


def test_ids_that_are_not_stream_ids_are_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("CSM_CANCEL_DIR", str(tmp_path))
    signal_cancel("../../etc/passwd")
    assert not any(tmp_path.iterdir())
