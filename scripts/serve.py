"""`make serve`: the local stack on 127.0.0.1 — the real Triton server, then the proxy in front of it.

Uses the real CSM-1B checkpoint when CSM_MODEL_DIR points at one, else the tiny random demo checkpoint (and likewise
CSM_WATERMARK_MODEL_DIR for silentcipher). Ports: TRITON_HTTP_PORT (8003), TRITON_GRPC_PORT (8001),
TRITON_METRICS_PORT (8002), PROXY_PORT (8000). Ctrl-C stops both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from csm_tts.tooling.local_triton import TritonServer, TritonStartError  # noqa: E402
from csm_tts.tooling.model_repository import render  # noqa: E402


def main() -> int:
    env = os.environ
    csm_dir = env.get("CSM_MODEL_DIR") or str(ROOT / "checkpoints" / "csm-tiny")
    watermark_dir = env.get("CSM_WATERMARK_MODEL_DIR") or str(ROOT / "checkpoints" / "silentcipher-tiny")
    repo = render(
        ROOT / "build" / "model_repository", "cpu", {"csm_model_dir": csm_dir, "watermark_model_dir": watermark_dir}
    )
    server = TritonServer(
        repo,
        http_port=int(env.get("TRITON_HTTP_PORT", 8003)),
        grpc_port=int(env.get("TRITON_GRPC_PORT", 8001)),
        metrics_port=int(env.get("TRITON_METRICS_PORT", 8002)),
        log_path=ROOT / "build" / "triton.log",
    )
    print(f"starting Triton with CSM checkpoint {csm_dir} (log: {server.log_path}) ...", flush=True)
    try:
        server.start(timeout=600)
    except TritonStartError as e:
        print(e, file=sys.stderr)
        return 1
    print(
        f"Triton ready: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics http://127.0.0.1:{server.metrics_port}/metrics"
    )

    proxy = None
    if (ROOT / "proxy" / "__main__.py").exists():
        proxy_env = {
            **env,
            "TRITON_GRPC_URLS": env.get("TRITON_GRPC_URLS", server.grpc_url),
            "PROXY_HOST": env.get("PROXY_HOST", "127.0.0.1"),
            "PROXY_PORT": env.get("PROXY_PORT", "8000"),
        }
        proxy = subprocess.Popen([sys.executable, "-m", "proxy"], cwd=ROOT, env=proxy_env)
        print(
            f"proxy: http://{proxy_env['PROXY_HOST']}:{proxy_env['PROXY_PORT']} "
            "(GET /health, POST /generate, WS /stream, GET /demo in a browser)"
        )
    print("Ctrl-C to stop.", flush=True)

    stop = False

    def on_signal(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stop:
            if server.process.poll() is not None:
                print(f"Triton exited:\n{server.log_tail()}", file=sys.stderr)
                return 1
            if proxy is not None and proxy.poll() is not None:
                print("the proxy exited", file=sys.stderr)
                return 1
            time.sleep(0.5)
    finally:
        print("stopping ...", flush=True)
        if proxy is not None and proxy.poll() is None:
            proxy.send_signal(signal.SIGINT)
            try:
                proxy.wait(10)
            except subprocess.TimeoutExpired:
                proxy.kill()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
