"""Running the app: `serve` (what `python -m proxy` does: until SIGTERM/SIGINT, then the drain) and `start_server`
(tests, scripts), both through one `runner` (handler cancellation on, so a client that disconnects from a streaming
request cancels its Triton stream too).

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

from proxy.appkeys import CONNECTIONS, DRAIN, SETTINGS, TRITON

log = logging.getLogger("proxy")


# After an answer given before a body was read in full (401, 408, 413), how long the rest may still arrive so the
# client reads the answer rather than a reset (aiohttp's default: 10 s, which a slow body would use in full).
LINGER_S = 2.0


async def runner(app: web.Application, shutdown_timeout: float = 10.0) -> web.AppRunner:
    """An AppRunner, set up, with the connection limits of proxy/connections.py installed on its server. aiohttp's
    access log is off: the observe middleware writes one line per request (proxy/logs.py `access_line`), also for the
    requests aiohttp's would miss (client-aborted ones, WebSocket sessions)."""
    made = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout,
        access_log=None,
        keepalive_timeout=app[SETTINGS].keepalive_s,
        lingering_time=LINGER_S,
    )
    await made.setup()
    app[CONNECTIONS].install(made.server)
    return made


async def start_server(app: web.Application, host: str, port: int, shutdown_timeout: float = 10.0) -> web.AppRunner:
    """Run `app` on host:port (0 = a free port; see `runner.addresses`) the way `python -m proxy` does."""
    started = await runner(app, shutdown_timeout)
    await web.TCPSite(started, host, port).start()
    return started


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


async def serve(app: web.Application, host: str, port: int, drain_s: float) -> None:
    """Run `app` until SIGTERM/SIGINT, then drain (see the module doc) and stop."""
    served = await runner(app)
    await web.TCPSite(served, host, port).start()
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
        await served.cleanup()  # stops listening, closes WebSockets with 1001, waits for handlers, closes Triton
