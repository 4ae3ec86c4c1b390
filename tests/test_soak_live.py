"""scripts/soak.py against the live test stack (the session's Triton, `python -m proxy` as a process): one operation
of each kind of the mix, no error, every process of the stack found and sampled. The long run's figures are in
docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT
from live_proxy import wait_until_healthy

from csm_tts.tooling.local_triton import free_port

pytestmark = pytest.mark.live
SOAK = ROOT / "scripts" / "soak.py"


async def test_one_round_of_the_soak_mix_passes_and_reports_every_process(triton_server, tmp_path):
    port = free_port()
    env = {**os.environ, "TRITON_GRPC_URLS": triton_server.grpc_url, "PROXY_PORT": str(port), "PROXY_HOST": "127.0.0.1"}
    proxy = subprocess.Popen([sys.executable, "-m", "proxy"], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    try:
        await wait_until_healthy(f"http://127.0.0.1:{port}")
        figures = tmp_path / "soak.json"
        run = subprocess.run(
            [sys.executable, str(SOAK), "--base", f"http://127.0.0.1:{port}", "--triton-port",
             str(triton_server.grpc_port), "--clients", "2", "--max-ops", "7", "--duration", "120",
             "--json", str(figures)],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        result = json.loads(figures.read_text())
        assert result["errors"] == {}
        assert {name: v["ok"] for name, v in result["operations"].items()} == {
            name: 1
            for name in (
                "aborted_download",
                "generate",
                "openai_mp3",
                "openai_pcm",
                "ws_abrupt",
                "ws_cancel",
                "ws_stream",
            )
        }
        processes = result["processes"]
        assert set(processes) == {"proxy", "tritonserver", "stub csm_1b", "stub watermarker"}
        assert processes["proxy"]["end"]["pid"] == proxy.pid
        assert all(p["end"]["rss_mb"] > 0 and p["end"]["open_files"] > 0 for p in processes.values())
        assert processes["stub csm_1b"]["end"]["shm_mb"] >= 1  # its region (1 MB at least) is mapped
        assert "errors by kind: none" in run.stdout
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(60)


def test_the_soak_refuses_a_non_loopback_target():
    run = subprocess.run(
        [sys.executable, str(SOAK), "--base", "http://192.0.2.1:8000", "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "not a loopback address" in run.stderr
