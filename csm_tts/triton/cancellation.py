"""Cancellation across the `tts` ensemble.

Triton 2.51 passes a client's cancellation of an ensemble only to the requests of later steps (core PR #263): the
watermarker's requests see `is_cancelled()`, csm_1b's running request never does. So the watermarker tells csm_1b
through a marker file named after the stream, in a directory both model processes share: they are stubs of the same
`tritonserver` process (same parent PID), on the same host. csm_1b checks for the marker between frames.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

_STREAM_ID = re.compile(r"[0-9a-f]{32}")  # csm_1b's stream ids (uuid4 hex)


def marker_dir() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return Path(os.environ.get("CSM_CANCEL_DIR") or base / f"csm-tts-cancel-{os.getppid()}")


def signal_cancel(stream_id: str) -> None:
    if not _STREAM_ID.fullmatch(stream_id):
        return
    directory = marker_dir()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / stream_id).touch()


def take_cancel(stream_id: str) -> bool:
    """True (once) when the stream was cancelled downstream; removes the marker."""
    marker = marker_dir() / stream_id
    if not marker.exists():
        return False
    marker.unlink(missing_ok=True)
    return True
