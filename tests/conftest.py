"""Shared fixtures: the tiny checkpoints and ONE real Triton server per test session (live tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from csm_tts.tooling.local_triton import TritonServer, start_local_triton

ROOT = Path(__file__).resolve().parent.parent
TINY_CSM = ROOT / "checkpoints" / "csm-tiny"
TINY_WATERMARK = ROOT / "checkpoints" / "silentcipher-tiny"
# Long enough that a loaded CI machine never evicts a live stream between two chunks.
WATERMARK_IDLE_TIMEOUT_S = "20"
# "Fast" failure when Triton is down: the proxy's health RPC gives up after 0.5 s; a hang would last until the
# 60 s stream timeout. The margin lets a loaded CI machine pass.
FAST_FAIL_S = 3.0


def require_dir(path: Path, how: str) -> Path:
    if not (path / ".complete").exists():
        pytest.fail(f"{path} is missing or incomplete: {how} (or run `make setup`)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def tiny_csm_dir() -> Path:
    return require_dir(TINY_CSM, f"python scripts/make_tiny_checkpoint.py {TINY_CSM}")


@pytest.fixture(scope="session")
def tiny_watermark_dir() -> Path:
    return require_dir(TINY_WATERMARK, f"python scripts/make_tiny_watermark_checkpoint.py {TINY_WATERMARK}")


@pytest.fixture(scope="session")
def engine(tiny_csm_dir):
    import torch

    from csm_tts.speech.engine import CsmEngine

    # The served csm_1b runs one torch thread (cpu_threads in its config); the same count here keeps float
    # reductions in the same order, so in-process audio equals served audio bit for bit.
    torch.set_num_threads(1)
    return CsmEngine.from_dir(tiny_csm_dir)


def start_triton(repo_dir: Path, csm_dir: Path, watermark_dir: Path, **env) -> TritonServer:
    """The suite's Triton: the public watermark key, watermarking on, an idle timeout a loaded CI box never hits."""
    env = {
        "CSM_WATERMARK_KEY": "",
        "CSM_WATERMARK_ENABLED": "true",
        "CSM_WATERMARK_IDLE_TIMEOUT_S": WATERMARK_IDLE_TIMEOUT_S,
        **env,
    }
    return start_local_triton(repo_dir, csm_dir, watermark_dir, env)


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory, tiny_csm_dir, tiny_watermark_dir):
    """The real tritonserver on free loopback ports, serving the rendered CPU repository with the tiny models."""
    server = start_triton(tmp_path_factory.mktemp("triton") / "model_repository", tiny_csm_dir, tiny_watermark_dir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def grpc_url(triton_server) -> str:
    return triton_server.grpc_url
