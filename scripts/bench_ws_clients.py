"""N copies of the documented WebSocket client (docs/api.md) at once against a running proxy (`make serve`).

Each client opens `WS /stream`, sends the documented two short texts one after the other, each as `{"text": ...}`
with no options (so the server's defaults apply, as for any client that knows nothing about them), waits for each
reply, then says done. Printed: per-reply latency (p50 / p90 / max), the audio length of the replies, the wall time of
the whole run, and failures (an error reply, a closed socket, or no reply within --timeout).

    make serve                                                # in another terminal (or PROXY_PORT=... make serve)
    .venv/bin/python scripts/bench_ws_clients.py --url ws://127.0.0.1:8000/stream --clients 20 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import time
from pathlib import Path

import numpy as np
import soundfile
import websockets

TEXTS = ("Hello there.", "How are you?")  # the documented client's two chunks


async def client(url: str, texts: tuple[str, ...], timeout_s: float, extra: dict) -> list[dict]:
    replies = []
    async with websockets.connect(url, max_size=None, open_timeout=timeout_s) as ws:
        for text in texts:
            sent = time.perf_counter()
            await ws.send(json.dumps({"text": text, **extra}))
            try:
                reply = json.loads(await asyncio.wait_for(ws.recv(), timeout_s))
            except TimeoutError:
                replies.append({"text": text, "error": f"no reply within {timeout_s:g} s"})
                return replies
            latency = time.perf_counter() - sent
            if "audio_base64" not in reply:
                replies.append({"text": text, "error": reply.get("error", str(reply)), "latency_s": latency})
                continue
            audio, rate = soundfile.read(io.BytesIO(base64.b64decode(reply["audio_base64"])))
            replies.append({"text": text, "latency_s": latency, "audio_s": audio.size / rate})
        await ws.send(json.dumps({"done": True}))
        await asyncio.wait_for(ws.recv(), timeout_s)
    return replies


async def run(url: str, clients: int, timeout_s: float, extra: dict) -> dict:
    started = time.perf_counter()
    results = await asyncio.gather(
        *(client(url, TEXTS, timeout_s, extra) for _ in range(clients)), return_exceptions=True
    )
    wall = time.perf_counter() - started
    replies, failures = [], []
    for result in results:
        if isinstance(result, BaseException):
            failures.append(f"{type(result).__name__}: {result}")
            continue
        for reply in result:
            if "error" in reply:
                failures.append(f"{reply['text']!r}: {reply['error']}")
            else:
                replies.append(reply)
    latencies = np.array([r["latency_s"] for r in replies]) if replies else np.zeros(1)
    return {
        "clients": clients,
        "replies": len(replies),
        "expected_replies": clients * len(TEXTS),
        "failures": failures,
        "latency_s_p50": float(np.percentile(latencies, 50)),
        "latency_s_p90": float(np.percentile(latencies, 90)),
        "latency_s_max": float(latencies.max()),
        "audio_s_per_reply": sorted({round(r["audio_s"], 2) for r in replies}),
        "wall_s": wall,
        "options": extra,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="ws://127.0.0.1:8000/stream")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=300.0, help="longest wait for one reply (s)")
    parser.add_argument(
        "--options", default="{}", help="JSON added to every text message, e.g. '{\"watermark\": false}'"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report = asyncio.run(run(args.url, args.clients, args.timeout, json.loads(args.options)))
    print(
        f"{report['clients']} clients x {len(TEXTS)} texts {report['options'] or ''}: {report['replies']}/"
        f"{report['expected_replies']} replies, {len(report['failures'])} failures; reply latency p50 "
        f"{report['latency_s_p50']:.1f} s, p90 {report['latency_s_p90']:.1f} s, max {report['latency_s_max']:.1f} s; "
        f"audio per reply {report['audio_s_per_reply']} s; wall {report['wall_s']:.1f} s"
    )
    for failure in report["failures"][:5]:
        print("  failure:", failure)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
