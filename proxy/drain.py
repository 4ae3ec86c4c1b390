"""Graceful shutdown: on SIGTERM the proxy drains before it stops, and liveness is split from readiness.

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

import asyncio
import logging
import signal
import time

from aiohttp import web

from proxy.logs import ACCESS_LOG_FORMAT
from proxy.web import DRAIN, TRITON

log = logging.getLogger("proxy")


class Drain:
    def __init__(self):
        self.started_at: float | None = None

    @property
    def active(self) -> bool:
        return self.started_at is not None

    def begin(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()


async def livez(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[DRAIN].active:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready"})


async def wait_for_streams(app: web.Application, limit_s: float, quiet_s: float = 0.5, poll_s: float = 0.05) -> int:
    """Wait until no Triton stream has been open for `quiet_s` (the last replies of a finished stream -- a WebSocket's
    "end" message, a WAV being encoded -- go out after its stream closes), or until `limit_s` passed. Returns how
    many streams were still open."""
    pool = app[TRITON]
    deadline = time.monotonic() + limit_s
    quiet_since = None
    while time.monotonic() < deadline:
        if pool.active_streams:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            break
        await asyncio.sleep(poll_s)
    return pool.active_streams


async def serve(app: web.Application, host: str, port: int, drain_s: float, access_log=None) -> None:
    """Run `app` until SIGTERM/SIGINT, then drain (see the module doc) and stop."""
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=10.0,
        access_log=access_log,
        access_log_format=ACCESS_LOG_FORMAT,
    )
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("listening on http://%s:%d", host, port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    drained: asyncio.Task | None = None

    async def drain_then_stop() -> None:
        app[DRAIN].begin()
        open_streams = app[TRITON].active_streams
        log.info("draining: not ready any more; %d streams in flight get up to %g s", open_streams, drain_s)
        left = await wait_for_streams(app, drain_s)
        if left:
            log.warning("drain time is up with %d streams still open; they are cut", left)
        else:
            log.info("drained: no stream in flight")
        stop.set()

    def on_signal(signum: int) -> None:
        nonlocal drained
        if drained is None:
            log.info("%s received", signal.Signals(signum).name)
            drained = asyncio.create_task(drain_then_stop())
        else:
            log.warning("second signal: stopping now")
            stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if drained is not None and not drained.done():
            drained.cancel()
        await runner.cleanup()  # stops listening, closes WebSockets with 1001, waits for handlers, closes Triton
