"""The proxy's event-loop lag (how late a 10 ms sleep wakes up: p50, p99, max) while four MP3 streams of one
maximal 90 s chunk and the largest POST /generate (90 s, ~6 MB of base64) run, with Triton replaced by an instant
stand-in (csm_tts/tooling/loop_lag.py). Prints one JSON line.

    python scripts/bench_loop_lag.py                          # this checkout
    PYTHONPATH=/path/to/other/checkout python scripts/bench_loop_lag.py   # another version of the proxy
"""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp


async def main() -> dict:
    import proxy.app
    from csm_tts.tooling.loop_lag import InstantTriton, measure
    from proxy.settings import Settings

    proxy.app.TritonPool = InstantTriton  # every version's app builds its pool through this name
    try:
        from proxy.server import start_server
    except ImportError:  # before the proxy had proxy/server.py
        from proxy.app import start_server
    app = proxy.app.create_app(Settings(watermark_enabled=False, max_body_bytes=1 << 20))
    runner = await start_server(app, "127.0.0.1", 0)
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            result = await measure(session, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()
    return {"proxy": proxy.app.__file__, **result}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
    sys.exit(0)
