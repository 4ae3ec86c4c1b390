"""Shared fixtures: the tiny checkpoints and ONE real Triton server per test session (live tests)."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import pytest
import torch

from csm_tts.speech.engine import CsmEngine
from csm_tts.tooling.local_triton import TritonServer, start_local_triton

# The suite checks behaviour, not speed. torch's default two intra-op threads make the CPU models 5-50x slower
# whenever the shared machine is busy (docs/benchmarks.md); one thread keeps the tests steady. The suite's Triton
# gets one thread too (OMP_NUM_THREADS below): tests compare its audio bit for bit with the in-process engine, and
# the thread count changes how the codec's sums are split, hence the last bit.
CPU_THREADS = 1
torch.set_num_threads(CPU_THREADS)

ROOT = Path(__file__).resolve().parent.parent
TINY_CSM = ROOT / "checkpoints" / "csm-tiny"
TINY_WATERMARK = ROOT / "checkpoints" / "silentcipher-tiny"
# Long enough that a loaded CI machine never evicts a live stream between two chunks.
WATERMARK_IDLE_TIMEOUT_S = "20"
# "Fast" failure when Triton is down: the proxy's health RPC gives up after 0.5 s; a hang would last until the
# 60 s stream timeout. The margin lets a loaded CI machine pass.
FAST_FAIL_S = 3.0


def wait_for(condition, timeout: float = 60.0) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


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
    return CsmEngine.from_dir(tiny_csm_dir)


def start_triton(repo_dir: Path, csm_dir: Path, watermark_dir: Path, **env) -> TritonServer:
    """The suite's Triton: the public watermark key, watermarking on, an idle timeout a loaded CI box never hits."""
    env = {
        "CSM_WATERMARK_KEY": "",
        "CSM_WATERMARK_ENABLED": "true",
        "CSM_WATERMARK_IDLE_TIMEOUT_S": WATERMARK_IDLE_TIMEOUT_S,
        "OMP_NUM_THREADS": str(CPU_THREADS),
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


@pytest.fixture(scope="module")
async def http(proxy):
    """A client session on the module's `proxy` fixture (live_proxy.module_proxy), its base URL preset."""
    async with aiohttp.ClientSession(proxy.http) as session:
        yield session
