"""A model process that outlives its tritonserver is ended, and what the dead server cannot remove is removed.

The Python backend's stub has a check of its own (signal 0 to its server every 300 ms), but signal 0 reaches a
zombie: a server killed with SIGKILL and not yet reaped by its parent looks alive, and its stubs live on, re-parented,
holding the model and their shared memory (seen: two stubs and 1.1 GB, 150 s after the kill). A thread inside the
stub is not enough either: a stub caught in a call to its dead server (a log line, a metric) can wait forever
holding the GIL (seen: the watermarker), and then no Python thread runs again.

So each stub starts a small watcher process (`watch_server`, one line in a model's `initialize`; standard library
only, about 10 MB). Every 0.1 s it reads the server's /proc entry: gone, a zombie, or another process with the same
PID means the server is dead. Then it kills the stub (SIGKILL: nothing can be sent to a dead server, so there is
nothing to finish), removes the stub's shared-memory region (the server creates it, names it on the stub's command
line, and would have unlinked it) and the server's cancellation markers (csm_tts/triton/cancellation.py), writes one
line to stderr (the server's log file) and exits. When the stub ends first (the server unloads the model), the
watcher just exits. Outside a Triton stub (a test runs model.py in-process) `watch_server` does nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from csm_tts.triton import cancellation

SHM_REGION_PREFIX = "triton_python_backend_shm_region_"
SHM_DIR = Path("/dev/shm")
CHECK_INTERVAL_S = 0.1  # one small /proc read; the stub's own check runs every 0.3 s


@dataclass(frozen=True)
class Stub:
    """A Python-backend stub: its PID, its server's PID and start time (against PID reuse), its region."""

    pid: int
    server_pid: int
    server_started: int
    shm_region: str | None


def started_at(pid: int) -> int | None:
    """The start time of a running process (clock ticks since boot); None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def shm_regions(pid: int | str) -> list[str]:
    """The Python-backend shared-memory regions named on the command line of process `pid` (OSError when it is gone)."""
    arguments = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    return [a for a in arguments if a.startswith(SHM_REGION_PREFIX) and "/" not in a]


def this_stub(pid: int | str = "self") -> Stub | None:
    """The process `pid` (this one by default) as a stub of a running tritonserver, or None when it is not one."""
    try:
        regions = shm_regions(pid)
        stat = Path(f"/proc/{pid}/stat").read_text()
        own_pid, parent = int(stat.split()[0]), int(stat.rsplit(")", 1)[1].split()[1])
        parent_name = Path(f"/proc/{parent}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return None
    server_started = started_at(parent)
    if parent_name != "tritonserver" or not regions or server_started is None:
        return None
    return Stub(pid=own_pid, server_pid=parent, server_started=server_started, shm_region=regions[0])


class ServerWatch:
    """The watcher's loop (in its own process, a child of the stub)."""

    def __init__(self, stub: Stub, name: str, interval_s: float = CHECK_INTERVAL_S, shm_dir: Path = SHM_DIR):
        self.stub, self.name, self.interval_s, self.shm_dir = stub, name, interval_s, shm_dir

    def server_alive(self) -> bool:
        return started_at(self.stub.server_pid) == self.stub.server_started

    def stub_alive(self) -> bool:
        return os.getppid() == self.stub.pid

    def run(self) -> int:
        while True:
            if not self.server_alive():
                self.end_stub()
                return 0
            if not self.stub_alive():
                return 0  # the model was unloaded: the server cleans up after it
            time.sleep(self.interval_s)

    def end_stub(self) -> None:
        started = time.perf_counter()
        ended_here = self.stub_alive()  # else it ended by itself (an unload, or the stub's own check)
        if ended_here:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.stub.pid, signal.SIGKILL)  # first, so that it creates nothing more
        removed = self.clean_up()
        if ended_here or removed:  # after a clean shutdown there is nothing to say
            print(
                f"{self.name} tritonserver (pid {self.stub.server_pid}) is gone: "
                f"{'ended' if ended_here else 'found ended'} stub {self.stub.pid}, removed "
                f"{', '.join(map(str, removed)) or 'nothing'} ({1000 * (time.perf_counter() - started):.0f} ms)",
                file=sys.stderr,
                flush=True,
            )

    def clean_up(self) -> list[Path]:
        removed = []
        if self.stub.shm_region:
            region = self.shm_dir / self.stub.shm_region
            with contextlib.suppress(OSError):
                region.unlink()
                removed.append(region)
        markers = cancellation.remove_dead_server_markers(self.stub.server_pid)
        return removed + ([markers] if markers else [])


def launch(stub: Stub, name: str, shm_dir: Path = SHM_DIR) -> subprocess.Popen:
    """Start the watcher of `stub` (it must be this process: the watcher takes its parent for the stub)."""
    # In a stub, sys.executable is what the embedded interpreter found on PATH; make sure it is a Python.
    executable = sys.executable if os.path.basename(sys.executable or "").startswith("python") else None
    python = executable if executable and os.path.exists(executable) else shutil.which("python3")
    arguments = [str(stub.pid), str(stub.server_pid), str(stub.server_started), stub.shm_region or "", name]
    return subprocess.Popen(
        [python or "python3", "-m", "csm_tts.triton.watchdog", *arguments, str(shm_dir)],
        stdin=subprocess.DEVNULL,
        close_fds=True,
    )


_watcher: subprocess.Popen | None = None


def watch_server(name: str) -> subprocess.Popen | None:
    """In a model's `initialize`: start this stub's watcher (once). None outside a Triton stub."""
    global _watcher
    if _watcher is None:
        stub = this_stub()
        if stub is not None:
            try:
                _watcher = launch(stub, name)
            except OSError as e:  # no Python to run it: the model still loads, unwatched, and says so
                print(f"{name} no watcher for this model process: {e}", file=sys.stderr, flush=True)
    return _watcher


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the server's process group
    pid, server_pid, server_started, region, name, shm_dir = argv
    stub = Stub(int(pid), int(server_pid), int(server_started), region or None)
    return ServerWatch(stub, name, shm_dir=Path(shm_dir)).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
