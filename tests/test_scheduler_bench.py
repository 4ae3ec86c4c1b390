"""scripts/bench_scheduler.py runs both schedulers (before the output stage split, from git, and now) and prints
one row per variant and stream count."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_scheduler_compares_before_and_after(capsys):
    try:
        subprocess.run(["git", "cat-file", "-e", "45dafa1"], cwd=ROOT, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.fail("the 'before' commit 45dafa1 is not in this clone (a shallow checkout?): fetch its history")
    spec = importlib.util.spec_from_file_location("bench_scheduler", ROOT / "scripts" / "bench_scheduler.py")
    module = sys.modules["bench_scheduler"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    module.main(["--streams", "1,2", "--frames", "4", "--rounds", "1"])
    rows = re.findall(r"^(before|after) +(\d+) +([\d.]+)% +([\d.]+) +([\d.]+)$", capsys.readouterr().out, re.M)
    assert sorted((name, int(n)) for name, n, *_ in rows) == [("after", 1), ("after", 2), ("before", 1), ("before", 2)]
    for _, _, outside, frames_per_s, audio_per_s in rows:
        assert 0 <= float(outside) < 100 and float(frames_per_s) > 0 and float(audio_per_s) > 0
