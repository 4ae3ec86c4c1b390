"""Stopping csm_1b's streams from the watermarker (cancellation and failures across the `tts` ensemble).

Triton 2.51 passes a client's cancellation of an ensemble only to the requests of later steps (core PR #263): the
watermarker's requests see `is_cancelled()`, csm_1b's running request never does; and when the watermarker fails a
chunk, the ensemble stops forwarding csm_1b's output but lets csm_1b generate on. Worse, once any step has answered
with an error, the 2.51 ensemble ignores the responses of the steps still running, so it never sees csm_1b's final
response and the `tts` request stays in flight forever (a leaked request context, and no graceful shutdown). So the
watermarker never answers a chunk of a running csm_1b stream with an error: it stops the stream and lets csm_1b send
the stream's last response, the error included. The two models share one small fact per stream through a file, in a
directory both model processes see (they are stubs of the same `tritonserver` process, same parent PID, same host):

- csm_1b creates `<dir>/<stream_id>` when it accepts a request (`open_marker`) and removes it when the stream ends,
  however it ends (`close_marker`); at unload it removes whatever is left and the directory itself.
- the watermarker stops the stream (`stop_stream`): a cancelled chunk *deletes* the file (the client is gone: csm_1b
  ends the stream with an empty last chunk); a chunk it fails *writes the error* into the file (csm_1b ends the stream
  with that error). It never creates a file.
- csm_1b checks between frames (`stop_reason`, one stat call).

Flow control uses the same ownership: beside each marker csm_1b creates `<dir>/<stream_id>.done`, in which the
watermarker writes how many of the stream's audio samples it has taken off its queue so far, watermarked or dropped
(`report_progress`, a fixed-width overwrite without O_CREAT); csm_1b reads it (`samples_done`) and does not advance
a stream whose audio waits at the watermarker beyond a bound, so csm_1b never outruns the watermarker.

So a marker is created at most once per stream and only by its owner, a late or repeated stop has nothing to leave
behind, and nothing outlives the stream. Directories of servers that are gone (a killed server cannot clean up) are
removed by the server's own model processes when they see it gone (csm_tts/triton/watchdog.py), and otherwise by the
next csm_1b that starts (`remove_stale_dirs`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

_STREAM_ID = re.compile(r"[0-9a-f]{32}")  # csm_1b's stream ids (uuid4 hex)
_PREFIX = "csm-tts-cancel-"
_open: set[str] = set()  # markers this process created and has not closed yet
_lock = threading.Lock()


def _base() -> Path:
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def marker_dir(server_pid: int | None = None) -> Path:
    """The markers of the server `server_pid` (default: this model process's tritonserver, its parent)."""
    return Path(os.environ.get("CSM_CANCEL_DIR") or _base() / f"{_PREFIX}{server_pid or os.getppid()}")


def _progress_path(stream_id: str) -> Path:
    return marker_dir() / f"{stream_id}.done"


def open_marker(stream_id: str) -> bool:
    """csm_1b, when it accepts a request. False when the marker cannot be made (then the stream cannot be stopped
    from the watermarker, and `marker_gone` must not be asked: a missing file would read as a stop)."""
    if not _STREAM_ID.fullmatch(stream_id):
        return False
    directory = marker_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / stream_id).touch(exist_ok=False)
    except OSError:
        return False
    try:
        _progress_path(stream_id).touch(exist_ok=False)
    except OSError:
        _remove(directory, stream_id)
        return False
    with _lock:
        _open.add(stream_id)
    return True


def stop_reason(stream_id: str) -> str | None:
    """csm_1b, between frames: None while the stream may go on, "" when its client cancelled, else the error
    ("CODE: message") the watermarker stopped it with."""
    path = marker_dir() / stream_id
    try:
        if path.stat().st_size == 0:
            return None
        return path.read_text(errors="replace").splitlines()[0] or "INTERNAL: stopped by the watermarker"
    except FileNotFoundError:
        return ""
    except (OSError, IndexError):  # unreadable: keep going rather than stop a stream for nothing
        return None


def close_marker(stream_id: str) -> None:
    """csm_1b, when the stream has ended (its final response is sent, or could not be)."""
    with _lock:
        if stream_id not in _open:
            return
        _open.discard(stream_id)
    _remove(marker_dir(), stream_id)


def _remove(directory: Path, stream_id: str) -> None:
    for name in (stream_id, f"{stream_id}.done"):
        with contextlib.suppress(OSError):
            (directory / name).unlink(missing_ok=True)


_PROGRESS_WIDTH = 20  # digits: one fixed-width record, always overwritten whole


def report_progress(stream_id: str, samples: int) -> bool:
    """The watermarker: it has taken `samples` samples of csm_1b's stream `stream_id` off its queue (watermarked or
    dropped). False when the stream has ended (nothing is created) or the id is not csm_1b's."""
    if not _STREAM_ID.fullmatch(stream_id):
        return False
    try:
        descriptor = os.open(_progress_path(stream_id), os.O_WRONLY)  # no O_CREAT: an ended stream stays ended
    except OSError:
        return False
    try:
        os.pwrite(descriptor, f"{max(0, int(samples)):{_PROGRESS_WIDTH}d}".encode(), 0)
    except OSError:
        return False
    finally:
        os.close(descriptor)
    return True


def samples_done(stream_id: str, before_first_report: int | None = 0) -> int | None:
    """csm_1b: how many samples of its stream the watermarker has taken so far (`before_first_report` until its first
    report: None where a stream no watermarker reports on must run free); None when unknown (no marker, or an
    unreadable record: then csm_1b must not hold the stream back on it)."""
    try:
        record = _progress_path(stream_id).read_bytes()
    except OSError:
        return None
    if not record:
        return before_first_report
    try:
        return int(record[:_PROGRESS_WIDTH])
    except ValueError:
        return None


def stop_stream(stream_id: str, error: str | None = None) -> bool:
    """The watermarker: stop csm_1b's stream `stream_id`, cancelled (`error` None) or failed with `error`
    ("CODE: message", which csm_1b sends as the stream's last response). True when the stream was running; False
    when it has ended (or never was a csm_1b stream): then nothing is created and the caller reports any error."""
    if not _STREAM_ID.fullmatch(stream_id):
        return False
    path = marker_dir() / stream_id
    try:
        if error is None:
            path.unlink()
        else:
            descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)  # no O_CREAT: an ended stream stays ended
            with os.fdopen(descriptor, "w") as marker:
                marker.write(" ".join(error.split())[:2000] + "\n")
    except OSError:  # FileNotFoundError: the stream has ended already
        return False
    return True


def close_all() -> None:
    """csm_1b's unload: remove this process's markers, then the directory when no other instance still uses it."""
    with _lock:
        left = list(_open)
        _open.clear()
    directory = marker_dir()
    for stream_id in left:
        _remove(directory, stream_id)
    with contextlib.suppress(OSError):
        directory.rmdir()  # fails while another csm_1b instance still has streams: the last one removes it


def remove_dead_server_markers(server_pid: int) -> Path | None:
    """Once the server `server_pid` is gone (its models' watchers, csm_tts/triton/watchdog.py, or whoever reaped
    it): its directory, removed whole, returned. A configured CSM_CANCEL_DIR may be shared: it is left alone."""
    if os.environ.get("CSM_CANCEL_DIR"):
        return None
    directory = marker_dir(server_pid)
    if not directory.exists():
        return None
    shutil.rmtree(directory, ignore_errors=True)
    return directory


def remove_stale_dirs() -> list[Path]:
    """Directories left by servers that no longer run (named after their PID). Removed; returned for the log."""
    if os.environ.get("CSM_CANCEL_DIR"):
        return []
    pids = [path.name.removeprefix(_PREFIX) for path in _base().glob(f"{_PREFIX}*")]
    dead = [int(pid) for pid in pids if pid.isdigit() and int(pid) != os.getppid() and not _alive(int(pid))]
    return [path for pid in dead if (path := remove_dead_server_markers(pid)) is not None]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
