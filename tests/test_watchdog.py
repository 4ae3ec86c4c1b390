"""The watcher that ends a model process whose tritonserver is gone (csm_tts/triton/watchdog.py), without Triton:
a plain process plays the server, its child plays the stub and starts the real watcher process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from polling import alive, wait_for

from csm_tts.triton import cancellation, watchdog

# The "stub": starts its watcher for the server (its parent), prints its PID, then stops itself, like a stub frozen in
# a call to its dead server (no Python thread of its own could run any more).
STUB = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from csm_tts.triton import watchdog
    shm_dir = Path(sys.argv[1])
    server = os.getppid()
    stub = watchdog.Stub(os.getpid(), server, watchdog.started_at(server), "triton_python_backend_shm_region_test")
    (shm_dir / stub.shm_region).write_bytes(b"x" * 4096)
    watcher = watchdog.launch(stub, "[test]", shm_dir=shm_dir)
    print(os.getpid(), watcher.pid, flush=True)
    if sys.argv[2] == "freeze":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        sys.stdin.readline()  # ends when the test closes its end
    """
)
# The "server": starts the stub and waits; killed by the test, which does not reap it (a zombie, as in the issue).
SERVER = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', sys.argv[1], *sys.argv[2:]]); time.sleep(600)"
)


def gone(pid: int) -> bool:
    return not alive(pid)


@pytest.fixture
def shm_dir(tmp_path):
    return tmp_path


def start(shm_dir: Path, mode: str, stdin=None):
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, STUB, str(shm_dir), mode], stdout=subprocess.PIPE, stdin=stdin, text=True
    )
    stub_pid, watcher_pid = map(int, server.stdout.readline().split())
    return server, stub_pid, watcher_pid


def test_a_frozen_stub_of_a_killed_unreaped_server_is_ended_and_its_region_and_markers_removed(shm_dir):
    server, stub_pid, watcher_pid = start(shm_dir, "freeze")
    try:
        markers = cancellation.marker_dir(server.pid)
        markers.mkdir(parents=True)
        (markers / ("0" * 32)).touch()
        wait_for(lambda: Path(f"/proc/{stub_pid}/stat").read_text().split()[2] == "T", 10)
        os.kill(server.pid, signal.SIGKILL)  # not reaped: signal 0 would still reach it
        # Checked every 0.1 s; 5 s is slack for a loaded machine (wait_for fails the test beyond it).
        wait_for(lambda: gone(stub_pid) and gone(watcher_pid), 5)
        assert not (shm_dir / "triton_python_backend_shm_region_test").exists()
        assert not markers.exists()
    finally:
        for pid in (stub_pid, watcher_pid):
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        server.kill()
        server.wait()
        server.stdout.close()


def test_a_stub_that_ends_while_its_server_runs_takes_its_watcher_along_and_nothing_is_removed(shm_dir):
    server, stub_pid, watcher_pid = start(shm_dir, "wait", stdin=subprocess.PIPE)
    try:
        server.stdin.close()  # the stub reads EOF and exits, as after an unload
        wait_for(lambda: gone(stub_pid) and gone(watcher_pid), 5)
        assert (shm_dir / "triton_python_backend_shm_region_test").exists()  # the server's to remove
        assert server.poll() is None
    finally:
        server.kill()
        server.wait()
        server.stdout.close()


def test_outside_a_triton_stub_nothing_is_started():
    assert watchdog.this_stub() is None
    assert watchdog.watch_server("[test]") is None
    assert watchdog.started_at(os.getpid()) is not None
