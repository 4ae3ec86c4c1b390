"""Waiting for a process-level condition with a bound (supervisor and watchdog tests)."""

from __future__ import annotations

import time

import pytest
from conftest import wait_for as poll

from csm_tts.triton.watchdog import started_at


def alive(pid: int) -> bool:
    """Running (a zombie holds nothing and counts as gone)."""
    return started_at(pid) is not None


def wait_for(condition, timeout_s: float = 10.0, what: str = "the condition") -> float:
    """Seconds until `condition()` held; fails the test after `timeout_s` (conftest.wait_for, which only answers)."""
    started = time.monotonic()
    if not poll(condition, timeout_s):
        pytest.fail(f"{what}: not within {timeout_s:.0f} s")
    return time.monotonic() - started
