"""`make serve`: the local stack on 127.0.0.1 — the real Triton server and the proxy in front of it, supervised.

Uses the real CSM-1B checkpoint when CSM_MODEL_DIR points at one, else the tiny random demo checkpoint (and likewise
CSM_WATERMARK_MODEL_DIR for silentcipher). Ports: TRITON_HTTP_PORT (8003), TRITON_GRPC_PORT (8001),
TRITON_METRICS_PORT (8002), PROXY_PORT (8000). `--build-dir` holds the rendered model repository and triton.log.

Either process is restarted with backoff when it exits, the other one untouched: while Triton is down the proxy
answers 503 with Retry-After; a proxy SIGTERM restarts the proxy alone. Ctrl-C (or SIGTERM to this process) stops
both: the proxy drains first, then Triton. csm_tts/tooling/supervisor.py has the rules.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from csm_tts.tooling.local_triton import TritonServer, TritonStartError  # noqa: E402
from csm_tts.tooling.model_repository import render  # noqa: E402
from csm_tts.tooling.supervisor import ProcessChild, Supervisor, TritonChild  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build", help="model repository and Triton's log")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    env = os.environ
    csm_dir = env.get("CSM_MODEL_DIR") or str(ROOT / "checkpoints" / "csm-tiny")
    watermark_dir = env.get("CSM_WATERMARK_MODEL_DIR") or str(ROOT / "checkpoints" / "silentcipher-tiny")
    repo = render(
        args.build_dir / "model_repository",
        "cpu",
        {"csm_model_dir": csm_dir, "watermark_model_dir": watermark_dir},
    )
    server = TritonServer(
        repo,
        http_port=int(env.get("TRITON_HTTP_PORT", 8003)),
        grpc_port=int(env.get("TRITON_GRPC_PORT", 8001)),
        metrics_port=int(env.get("TRITON_METRICS_PORT", 8002)),
        log_path=args.build_dir / "triton.log",
    )
    children = [TritonChild(server)]
    print(f"Triton: CSM checkpoint {csm_dir}, log {server.log_path}, gRPC {server.grpc_url}", flush=True)
    if (ROOT / "proxy" / "__main__.py").exists():
        proxy_env = {
            **env,
            "TRITON_GRPC_URLS": env.get("TRITON_GRPC_URLS", server.grpc_url),
            "TRITON_METRICS_PORT": str(server.metrics_port),
            "PROXY_HOST": env.get("PROXY_HOST", "127.0.0.1"),
            "PROXY_PORT": env.get("PROXY_PORT", "8000"),
        }
        base = f"http://{proxy_env['PROXY_HOST']}:{proxy_env['PROXY_PORT']}"
        children.append(
            ProcessChild("proxy", [sys.executable, "-m", "proxy"], proxy_env, cwd=ROOT, ready_url=f"{base}/livez")
        )
        print(f"proxy: {base} (GET /health, POST /generate, WS /stream, GET /demo in a browser)", flush=True)
    print("Ctrl-C to stop.", flush=True)
    supervisor = Supervisor(children)
    supervisor.install_signal_handlers()
    try:
        return supervisor.run()
    except TritonStartError as e:  # the binary is missing
        print(e, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
