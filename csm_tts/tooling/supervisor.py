"""`make serve`'s supervisor: keeps tritonserver and the proxy running, each restarted with backoff when it exits.

What it does, and why (scripts/serve.py runs it):
- Triton exits (a crash, a kill, csm_1b asking for a restart after an engine failure): the proxy stays up and answers
  503 with Retry-After, as in production; what the dead server left (stubs, shared memory, markers) is removed; it is
  started again after the backoff delay. Its log file keeps every run.
- The proxy exits (SIGTERM included: it drains first, docs/api.md): it is started again after the backoff; Triton is
  not touched. A proxy SIGTERM is how one restarts the proxy alone; the stack stops through the supervisor.
- Backoff: 1 s, doubling up to 30 s; a run that lasted 60 s starts it again at 1 s. Every exit and restart is logged.
- A child that exits before it was ever ready on its first start (a bad checkpoint, a port in use, an invalid setting)
  stops everything with exit code 1: a configuration error shows at once instead of looping.
- SIGINT (Ctrl-C) or SIGTERM to the supervisor: the proxy drains and stops first (streams in flight still have
  Triton), then Triton unloads its models and stops; exit code 0. A second signal kills both at once.
- The children run in sessions of their own (a terminal's Ctrl-C reaches the supervisor alone, which decides the
  order) and get SIGTERM from the kernel if the supervisor itself is killed (PR_SET_PDEATHSIG): no orphans.

The supervisor is single-threaded: signal handlers only set flags; a loop checks its children every `tick_s`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Protocol

from csm_tts.tooling.local_triton import TritonServer, terminate_with_parent

log = logging.getLogger("supervisor")


@dataclass
class Backoff:
    first_s: float = 1.0
    factor: float = 2.0
    max_s: float = 30.0
    stable_s: float = 60.0  # a run at least this long was not a crash loop: the next delay is `first_s` again
    _next_s: float | None = field(default=None, init=False, repr=False)

    def delay(self, ran_s: float) -> float:
        """The wait before the next start of a child whose run lasted `ran_s`."""
        if self._next_s is None or ran_s >= self.stable_s:
            self._next_s = self.first_s
        delay, self._next_s = self._next_s, min(self.max_s, self._next_s * self.factor)
        return delay


class Child(Protocol):
    """A process the supervisor keeps running."""

    name: str
    stop_timeout_s: float  # how long a graceful stop may take before the kill

    def launch(self) -> int: ...  # start it; its PID

    def exit_code(self) -> int | None: ...  # None while it runs (reaps it once it has exited)

    def is_ready(self) -> bool: ...

    def terminate(self) -> None: ...  # ask it to stop gracefully

    def kill(self) -> None: ...

    def after_exit(self) -> list[str]: ...  # remove what it left; what had to be removed

    def exit_details(self) -> str: ...  # for the log (e.g. the end of its own log)


def exit_description(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


class TritonChild:
    """tritonserver (csm_tts/tooling/local_triton.py); stopped with SIGINT (models unload, finalize runs)."""

    name = "triton"

    def __init__(self, server: TritonServer, stop_timeout_s: float = 30.0, leftover_grace_s: float = 2.0):
        self.server, self.stop_timeout_s, self.leftover_grace_s = server, stop_timeout_s, leftover_grace_s
        server.stop_with_parent = True

    def launch(self) -> int:
        return self.server.launch().pid

    def exit_code(self) -> int | None:
        return self.server.process.poll()

    def is_ready(self) -> bool:
        return self.server.is_ready()

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.server.process.send_signal(signal.SIGINT)

    def kill(self) -> None:
        # The server alone: its stubs' watchers then end the stubs and remove their shared memory (csm_tts/triton/
        # watchdog.py); killing the whole group would kill the watchers too and leave the regions behind.
        with contextlib.suppress(ProcessLookupError):
            self.server.process.kill()
        self.server.process.wait()

    def after_exit(self) -> list[str]:
        # The watchers need a fraction of a second; what is left after the grace is killed and removed here.
        return self.server.remove_leftovers(grace_s=self.leftover_grace_s)

    def exit_details(self) -> str:
        return f"end of {self.server.log_path}:\n{self.server.log_tail(15)}"


class ProcessChild:
    """A command (the proxy), ready once `ready_url` answers 200; stopped with SIGTERM."""

    def __init__(self, name: str, argv: list[str], env: dict, cwd=None, ready_url=None, stop_timeout_s=40.0):
        self.name, self.argv, self.env, self.cwd = name, argv, env, cwd
        self.ready_url, self.stop_timeout_s = ready_url, stop_timeout_s
        self.process: subprocess.Popen | None = None

    def launch(self) -> int:
        self.process = subprocess.Popen(
            self.argv, env=self.env, cwd=self.cwd, start_new_session=True, preexec_fn=terminate_with_parent
        )
        return self.process.pid

    def exit_code(self) -> int | None:
        return self.process.poll()

    def is_ready(self) -> bool:
        if self.ready_url is None:
            return True
        try:
            with urllib.request.urlopen(self.ready_url, timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def after_exit(self) -> list[str]:
        return []

    def exit_details(self) -> str:
        return ""


@dataclass
class _State:
    child: Child
    backoff: Backoff
    pid: int | None = None
    started: float = 0.0
    ready: bool = False
    ever_ready: bool = False
    restart_at: float | None = None  # set while it waits for its next start


class Supervisor:
    def __init__(self, children: list[Child], tick_s: float = 0.2, start_timeout_s: float = 600.0, backoff=Backoff):
        self.states = [_State(child, backoff()) for child in children]
        self.tick_s, self.start_timeout_s = tick_s, start_timeout_s
        self.stopping = False
        self.forced = False
        self.restarts = {child.name: 0 for child in children}

    def request_stop(self, signum=None, frame=None) -> None:
        """The signal handler: the first signal stops the stack gracefully, a second one at once."""
        if self.stopping:
            self.forced = True
        self.stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGTERM, self.request_stop)

    def run(self) -> int:
        """Until a stop is requested (0) or a first start fails (1); the children are stopped either way."""
        try:
            for state in self.states:
                self._launch(state)
            while not self.stopping:
                for state in self.states:
                    if not self._check(state):
                        return 1
                time.sleep(self.tick_s)
            return 0
        finally:
            self._stop_all()

    def _launch(self, state: _State) -> None:
        state.pid = state.child.launch()
        state.started, state.ready, state.restart_at = time.monotonic(), False, None
        log.info("%s started (pid %d)", state.child.name, state.pid)

    def _check(self, state: _State) -> bool:
        """One look at a child: False when the supervisor must give up."""
        child, now = state.child, time.monotonic()
        if state.restart_at is not None:
            if now >= state.restart_at:
                self.restarts[child.name] += 1
                self._launch(state)
            return True
        code = child.exit_code()
        if code is None:
            if state.ready:
                return True
            if child.is_ready():
                state.ready = state.ever_ready = True
                log.info("%s ready (pid %d) after %.1f s", child.name, state.pid, now - state.started)
                return True
            if now - state.started <= self.start_timeout_s:
                return True
            log.error("%s not ready after %.0f s: killing it", child.name, self.start_timeout_s)
            child.kill()
            code = child.exit_code()
        ran_s = now - state.started
        details = child.exit_details()
        log.error(
            "%s (pid %d) exited after %.1f s: %s%s",
            child.name,
            state.pid,
            ran_s,
            exit_description(code),
            details and "; " + details,
        )
        self._report_leftovers(child)
        if not state.ever_ready:
            log.error("%s never became ready: stopping (fix the error above, then start again)", child.name)
            return False
        delay = state.backoff.delay(ran_s)
        state.restart_at = now + delay
        log.info("%s restarts in %.1f s", child.name, delay)
        return True

    def _stop_all(self) -> None:
        """The proxy first (it drains its streams while Triton still serves them), then Triton."""
        for state in reversed(self.states):
            child = state.child
            if state.pid is None or state.restart_at is not None:
                continue  # not running: never started, or waiting for its next start
            if child.exit_code() is not None:
                self._report_leftovers(child)
                continue
            log.info("stopping %s (pid %d)", child.name, state.pid)
            if not self.forced:
                child.terminate()
                deadline = time.monotonic() + child.stop_timeout_s
                while child.exit_code() is None and not self.forced and time.monotonic() < deadline:
                    time.sleep(0.1)
            if child.exit_code() is None:
                log.warning("%s did not stop%s: killing it", child.name, "" if self.forced else " in time")
                child.kill()
            log.info("%s stopped: %s", child.name, exit_description(child.exit_code()))
            self._report_leftovers(child)

    @staticmethod
    def _report_leftovers(child: Child) -> None:
        removed = child.after_exit()
        if removed:
            log.warning("%s left behind, removed: %s", child.name, ", ".join(removed))
