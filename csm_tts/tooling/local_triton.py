"""Start and stop the real `tritonserver` installed by scripts/install_triton.py, on loopback ports.

Used by `make serve`, the test suite and the benchmarks. Two facts make the binary from the PyPI wheel work here
(docs/development.md): the bundled libraries need LD_LIBRARY_PATH (the binary's relative RPATH no longer resolves once
copied), and the Python backend stub ignores PYTHONPATH, so the venv's `bin/` goes first on PATH, which is how the
stub finds the venv's site-packages (torch, transformers, this package).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from csm_tts.tooling.model_repository import render
from csm_tts.triton import cancellation, watchdog

ROOT = Path(__file__).resolve().parents[2]  # the repository
DEFAULT_TRITON_DIR = ROOT / ".triton"


class TritonStartError(RuntimeError):
    """The server exited or did not become ready; the message carries the end of its log."""


def terminate_with_parent() -> None:
    """A `preexec_fn` (in the child, between fork and exec): the kernel sends it SIGTERM when the thread that
    started it dies (Linux; only for a single-threaded parent such as `make serve`'s supervisor)."""
    _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the child only calls it


def group_members(group: int) -> dict[int, list[str]]:
    """The processes of process group `group` except its leader, zombies left out (they hold nothing): PID -> the
    Python-backend shared-memory regions named on its command line."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int(proc.name) == group or os.getpgid(int(proc.name)) != group:
                continue
            if watchdog.started_at(int(proc.name)) is not None:
                found[int(proc.name)] = watchdog.shm_regions(proc.name)
        except (OSError, ProcessLookupError):
            continue
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class TritonServer:
    model_repository: Path
    http_port: int = 8003
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_path: Path | None = None
    triton_dir: Path = DEFAULT_TRITON_DIR
    env: dict[str, str] = field(default_factory=dict)
    verbose: bool = False
    host: str = "127.0.0.1"  # any loopback address (127.x.y.z): several servers may share ports on different ones
    exit_timeout_s: int = 10
    stop_with_parent: bool = False  # SIGTERM when the process that started it dies (`make serve`'s supervisor)
    process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        cmd = [
            str(self.triton_dir / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.triton_dir / 'backends'}",
            f"--cache-directory={self.triton_dir / 'caches'}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--log-info=true",
        ]
        if self.verbose:
            cmd.append("--log-verbose=1")
        return cmd

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
        # The stub must load the same libpython patch release as the venv's stdlib.
        libdirs = [str(self.triton_dir / "lib"), sysconfig.get_config_var("LIBDIR") or ""]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libdirs + [env.get("LD_LIBRARY_PATH", "")] if p)
        env.update(self.env)
        return env

    def launch(self) -> subprocess.Popen:
        """Start the server and return at once (`wait_ready` waits for it). In a session of its own: its process
        group is the server and its Python stubs, which `remove_leftovers` relies on."""
        binary = self.triton_dir / "bin" / "tritonserver"
        if not binary.exists():
            raise TritonStartError(f"{binary} is missing: run `python scripts/install_triton.py` (or `make setup`)")
        if self.log_path is None:
            self.log_path = ROOT / "build" / f"triton-{self.http_port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # A restart appends to the log of the run before; the server keeps its own copy of the descriptor.
        with open(self.log_path, "ab" if self.process is not None else "wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,
                preexec_fn=terminate_with_parent if self.stop_with_parent else None,
            )
        return self.process

    def wait_ready(self, timeout: float = 120.0) -> TritonServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonStartError(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.is_ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise TritonStartError(f"tritonserver was not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def start(self, timeout: float = 120.0) -> TritonServer:
        self.launch()
        return self.wait_ready(timeout)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """Stop our own server by its PID (SIGINT lets Triton unload models and call finalize)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()  # the server alone: its stubs' watchers remove what the stubs own
                self.process.wait()
        self.remove_leftovers(grace_s=2.0)

    def model_processes(self) -> dict[int, list[str]]:
        """Its Python stubs and their watchers (`group_members`: the server runs in a session of its own, so its
        process group is nothing else, and outlives it)."""
        return group_members(self.process.pid)

    def model_stub(self, model: str) -> int | None:
        """The PID of the Python stub serving `model` (its command line names `<model>/1/model.py`), or None."""
        for pid in self.model_processes():
            with contextlib.suppress(OSError, IndexError, UnicodeDecodeError):
                if Path(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1].decode()).parent.parent.name == model:
                    return pid
        return None

    def remove_leftovers(self, grace_s: float = 0.0) -> list[str]:
        """Once the server has exited: what it left. Its stubs end by themselves (csm_tts/triton/watchdog.py) and are
        given `grace_s` to; the rest is killed, their shared-memory regions and the server's markers removed (a stub
        stopped while a model's finalize still waited for streams: the server exits after --exit-timeout-secs).
        Returns what had to be removed here."""
        deadline = time.monotonic() + grace_s
        while self.model_processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        left = self.model_processes()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        removed = [f"process {pid}" for pid in left]
        for name in (region for regions in left.values() for region in regions):
            with contextlib.suppress(FileNotFoundError):
                Path("/dev/shm", name).unlink()
                removed.append(f"/dev/shm/{name}")
        markers = cancellation.remove_dead_server_markers(self.process.pid)
        return removed + ([str(markers)] if markers else [])

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_local_triton(
    repo_dir: Path, csm_dir: Path, watermark_dir: Path, env: dict[str, str] | None = None, timeout: float = 240
) -> TritonServer:
    """Render the CPU model repository into `repo_dir` for these checkpoints and start Triton on free loopback
    ports (log: `repo_dir/../triton.log`). The tests and the benchmarks start their servers this way."""
    render(repo_dir, "cpu", {"csm_model_dir": str(csm_dir), "watermark_model_dir": str(watermark_dir)})
    server = TritonServer(
        repo_dir,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        log_path=Path(repo_dir).parent / "triton.log",
        env=dict(env or {}),
    )
    return server.start(timeout=timeout)
