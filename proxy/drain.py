"""Graceful shutdown: on SIGTERM the proxy drains before it stops (`Drain` says whether it does; proxy/server.py
runs it), and liveness is split from readiness (proxy/endpoints/info.py).

- `GET /livez`: 200 while the process answers at all (Kubernetes liveness: restart only a hung proxy).
- `GET /readyz`: 200 until a drain starts, then 503 at once (Kubernetes readiness: stop routing here). It does not
  depend on Triton: during a Triton outage every proxy stays ready and keeps answering the API's JSON 503s, rather
  than all of them leaving the Service and clients getting connection errors from the ingress.
- `GET /health` stays the full report (Triton replicas, models, watermark) for people and dashboards.

SIGTERM (or SIGINT): readiness flips, new requests and new streams (a WebSocket's next text included) get 503 with
Retry-After, streams in flight finish for up to PROXY_DRAIN_S; then the server stops listening, open WebSockets are
closed with 1001 (going away) and the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import time


class Drain:
    def __init__(self):
        self.started_at: float | None = None

    @property
    def active(self) -> bool:
        return self.started_at is not None

    def begin(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()
