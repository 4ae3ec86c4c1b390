"""Stopping csm_1b's streams from the watermarker (cancellation and failures across the `tts` ensemble).

Triton 2.51 passes a client's cancellation of an ensemble only to the requests of later steps (core PR #263): the
watermarker's requests see `is_cancelled()`, csm_1b's running request never does; and when the watermarker fails a
chunk, the ensemble stops forwarding csm_1b's output but lets csm_1b generate on. So the two models share one
small fact per stream through a file, in a directory both model processes see (they are stubs of the same
`tritonserver` process, same parent PID, same host):

- csm_1b creates `<dir>/<stream_id>` when it accepts a request (`open_marker`) and removes it when the stream ends,
  however it ends (`close_marker`); at unload it removes whatever is left and the directory itself.
- the watermarker *deletes* the file to stop the stream (`stop_stream`): on a cancelled chunk, on any chunk it
  fails, and on the chunk of a stream it evicted. It never creates one.
- csm_1b checks between frames whether the file is still there (`marker_gone`, one stat call).

So a marker is created at most once per stream and only by its owner, a late or repeated stop has nothing to leave
behind, and nothing outlives the stream. Directories of servers that are gone (a killed server cannot clean up) are
removed by the next csm_1b that starts (`remove_stale_dirs`).
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


def marker_dir() -> Path:
    return Path(os.environ.get("CSM_CANCEL_DIR") or _base() / f"{_PREFIX}{os.getppid()}")


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
    with _lock:
        _open.add(stream_id)
    return True


def marker_gone(stream_id: str) -> bool:
    """csm_1b, between frames: True when the watermarker has stopped this stream."""
    return not (marker_dir() / stream_id).exists()


def close_marker(stream_id: str) -> None:
    """csm_1b, when the stream has ended (its final response is sent, or could not be)."""
    with _lock:
        if stream_id not in _open:
            return
        _open.discard(stream_id)
    with contextlib.suppress(OSError):
        (marker_dir() / stream_id).unlink(missing_ok=True)


def stop_stream(stream_id: str) -> bool:
    """The watermarker: stop csm_1b's stream `stream_id` (a no-op when it has ended). True when it was running."""
    if not _STREAM_ID.fullmatch(stream_id):
        return False
    try:
        (marker_dir() / stream_id).unlink()
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
        with contextlib.suppress(OSError):
            (directory / stream_id).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        directory.rmdir()  # fails while another csm_1b instance still has streams: the last one removes it


def remove_stale_dirs() -> list[Path]:
    """Directories left by servers that no longer run (named after their PID). Removed; returned for the log."""
    if os.environ.get("CSM_CANCEL_DIR"):
        return []
    removed = []
    for path in _base().glob(f"{_PREFIX}*"):
        pid = path.name.removeprefix(_PREFIX)
        if not pid.isdigit() or int(pid) == os.getppid() or _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
