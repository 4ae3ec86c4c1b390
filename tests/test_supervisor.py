"""`make serve`'s supervisor (csm_tts/tooling/supervisor.py) with plain processes as children; the live test with
tritonserver and the proxy is tests/test_supervisor_live.py."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from polling import alive, wait_for

from csm_tts.tooling.supervisor import Backoff, ProcessChild, Supervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
# Ignores SIGTERM: only a kill stops it.
STUBBORN = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"]


def ignores_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        ignored = int(next(line for line in status if line.startswith("SigIgn:")).split()[1], 16)
    return bool(ignored & (1 << (signal.SIGTERM - 1)))


def quick_backoff():
    return Backoff(first_s=0.2, factor=2.0, max_s=1.0, stable_s=60.0)


class Running:
    """A supervisor's run() in a thread (signal handlers are the script's business; here request_stop is called)."""

    def __init__(self, supervisor: Supervisor):
        self.supervisor, self.result = supervisor, None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self):
        self.result = self.supervisor.run()

    def pid(self, name: str) -> int | None:
        state = next(s for s in self.supervisor.states if s.child.name == name)
        return state.pid if state.restart_at is None else None

    def stop(self, timeout_s: float = 20.0) -> int:
        self.supervisor.request_stop()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive()
        return self.result


def test_backoff_doubles_to_its_cap_and_a_stable_run_starts_it_again():
    backoff = Backoff(first_s=1, factor=2, max_s=30, stable_s=60)
    assert [backoff.delay(ran_s=5) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.delay(ran_s=61) == 1
    assert backoff.delay(ran_s=1) == 2


def test_a_child_that_exits_is_restarted_alone_with_backoff_and_logged(caplog):
    caplog.set_level(logging.INFO, "supervisor")
    children = [ProcessChild("triton", SLEEPER, dict(os.environ)), ProcessChild("proxy", SLEEPER, dict(os.environ))]
    running = Running(Supervisor(children, tick_s=0.05, backoff=quick_backoff))
    try:
        wait_for(lambda: running.pid("triton") and running.pid("proxy"))
        wait_for(lambda: all(s.ever_ready for s in running.supervisor.states))
        first_triton, proxy = running.pid("triton"), running.pid("proxy")
        for _ in range(3):
            killed = running.pid("triton")
            os.kill(killed, signal.SIGKILL)
            wait_for(lambda k=killed: running.pid("triton") not in (None, k))
        assert running.supervisor.restarts == {"triton": 3, "proxy": 0}
        assert running.pid("proxy") == proxy and alive(proxy)  # untouched
        assert running.pid("triton") != first_triton
    finally:
        assert running.stop() == 0
    text = caplog.text
    assert text.count("killed by SIGKILL") == 3
    delays = [r.getMessage() for r in caplog.records if "restarts in" in r.getMessage()]
    assert delays == ["triton restarts in 0.2 s", "triton restarts in 0.4 s", "triton restarts in 0.8 s"]
    assert not alive(proxy)


def test_a_child_that_fails_its_first_start_stops_everything_with_exit_code_1():
    children = [
        ProcessChild("triton", SLEEPER, dict(os.environ)),
        ProcessChild(
            "proxy", [sys.executable, "-c", "raise SystemExit(2)"], dict(os.environ), ready_url="http://127.0.0.1:1/"
        ),
    ]
    supervisor = Supervisor(children, tick_s=0.05, backoff=quick_backoff)
    started = time.monotonic()
    assert supervisor.run() == 1
    assert time.monotonic() - started < 15
    triton = children[0].process
    assert triton.poll() is not None  # stopped with the supervisor


def test_a_stop_stops_the_last_child_first_and_a_second_stop_kills_at_once(caplog):
    caplog.set_level(logging.INFO, "supervisor")
    triton = ProcessChild("triton", SLEEPER, dict(os.environ))
    proxy = ProcessChild("proxy", STUBBORN, dict(os.environ), stop_timeout_s=60)
    running = Running(Supervisor([triton, proxy], tick_s=0.05, backoff=quick_backoff))
    wait_for(lambda: proxy.process is not None and ignores_sigterm(proxy.process.pid))
    running.supervisor.request_stop()
    time.sleep(0.5)
    assert running.thread.is_alive() and proxy.process.poll() is None  # SIGTERM ignored: it waits for it
    started = time.monotonic()
    assert running.stop() == 0  # the second signal
    assert time.monotonic() - started < 10
    assert proxy.process.returncode == triton.process.returncode == -signal.SIGKILL
    order = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopping")]
    assert [m.split()[1] for m in order] == ["proxy", "triton"]


SUPERVISED = textwrap.dedent(
    """
    import os, sys
    from csm_tts.tooling.supervisor import ProcessChild, Supervisor
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    children = [ProcessChild(name, sleeper, dict(os.environ)) for name in ("triton", "proxy")]
    supervisor = Supervisor(children, tick_s=0.05)
    supervisor.install_signal_handlers()
    sys.exit(supervisor.run())
    """
)


def children_of(pid: int) -> list[int]:
    found = []
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                with open(f"/proc/{proc}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(proc))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_the_supervisors_end_ends_its_children(how):
    """SIGINT / SIGTERM: a clean stop, exit code 0. SIGKILL: the kernel sends the children SIGTERM (no orphans)."""
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISED])
    try:
        wait_for(lambda: len(children_of(supervisor.pid)) == 2)
        children = children_of(supervisor.pid)
        supervisor.send_signal(how)
        assert supervisor.wait(20) == (0 if how != signal.SIGKILL else -signal.SIGKILL)
        wait_for(lambda: not any(alive(pid) for pid in children), 5)
    finally:
        supervisor.kill()
        supervisor.wait()
