"""A bounded mixed soak of a running stack through its public API (loopback only), with the processes' growth.

    python scripts/soak.py --base http://127.0.0.1:8000 --triton-port 8001 --duration 180 --clients 4

`--clients` loops run for `--duration` seconds (each operation bounded by `--op-timeout`), each taking the next
operation of the mix in turn: a WebSocket stream (stream mode, binary s16le, checked: seq without gaps, samples
adding up, a clean 1000 close), a WebSocket cancel (cancel after the first audio), an abrupt WebSocket disconnect
(the TCP connection aborted mid-stream, no close frame), OpenAI `pcm` and `mp3` downloads (checked), an aborted
download (the connection dropped after the first bytes) and `POST /generate` (the WAV checked). Each failure is
counted by kind (operation and what went wrong); refusals (503, 429) are failures too, and so are streams or
WebSockets the proxy still reports open (GET /health) 15 s after the last operation.

The proxy (the process listening on the `--base` port), tritonserver (listening on `--triton-port`) and each of its
Python stubs are sampled before, after a warm-up (the first 10% of the run: first-use allocations) and at the end:
resident memory, open files, and the shared memory they map under /dev/shm. Growth is end minus warm-up.
Exit code 0 when no operation failed; `--json` writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import ipaddress
import json
import math
import os
import socket
import statistics
import struct
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import websockets

TEXT = "The soak goes on, one sentence at a time."
LENGTH = {"max_audio_length_ms": 1000}


class Failure(Exception):
    """An operation's outcome that is not what the API promises; `kind` is what the summary counts."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


def expect(condition: bool, kind: str) -> None:
    if not condition:
        raise Failure(kind)


async def ws_stream(session: aiohttp.ClientSession, ws_base: str) -> None:
    async with session.ws_connect(f"{ws_base}/stream?mode=stream&binary=true&format=s16le") as ws:
        await ws.send_json({"text": TEXT, **LENGTH})
        seq, samples = 0, 0
        while True:
            message = await ws.receive()
            if message.type == aiohttp.WSMsgType.BINARY:
                got_seq, _, _, n = struct.unpack_from("<IIII", message.data)
                expect(got_seq == seq and len(message.data) == 16 + 2 * n, "audio frame out of order or short")
                seq, samples = seq + 1, samples + n
                continue
            expect(message.type == aiohttp.WSMsgType.TEXT, f"socket ended early ({message.type.name})")
            event = json.loads(message.data)
            expect(event.get("type") != "error", f"error message: {str(event.get('error'))[:60]}")
            expect(event.get("seq") == seq, "message out of order")
            seq += 1
            if event.get("type") == "end":
                expect(event["samples"] == samples and samples > 0, "end's samples differ from the audio")
                break
        await ws.send_json({"done": True})
        expect(json.loads((await ws.receive()).data).get("type") == "closed", "no closed message")
        expect((await ws.receive()).type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1000, "not closed with 1000")


async def ws_cancel(session: aiohttp.ClientSession, ws_base: str) -> None:
    async with session.ws_connect(f"{ws_base}/stream?mode=stream") as ws:
        await ws.send_json({"text": TEXT, "max_audio_length_ms": 10_000})
        event = await ws.receive_json()
        expect(event.get("type") == "audio", f"no audio first: {event.get('type')}")
        await ws.send_json({"cancel": True})
        while (event := await ws.receive_json()).get("type") in ("audio", "end"):
            pass
        expect(event.get("type") == "cancelled", f"no cancelled reply: {event.get('type')}")
        await ws.send_json({"done": True})
        expect((await ws.receive_json()).get("type") == "closed", "no closed message")


async def ws_abrupt(session: aiohttp.ClientSession, ws_base: str) -> None:
    async with websockets.connect(f"{ws_base}/stream?mode=stream", open_timeout=30) as ws:
        await ws.send(json.dumps({"text": TEXT, "max_audio_length_ms": 10_000}))
        expect(json.loads(await ws.recv()).get("type") == "audio", "no audio first")
        ws.transport.abort()  # no close frame: the connection is simply gone


async def speech(session: aiohttp.ClientSession, response_format: str) -> bytes:
    body = {"model": "tts-1", "voice": "alloy", "input": TEXT, "response_format": response_format, **LENGTH}
    async with session.post("/v1/audio/speech", json=body) as response:
        expect(response.status == 200, f"HTTP {response.status}")
        return await response.read()


async def openai_pcm(session: aiohttp.ClientSession, ws_base: str) -> None:
    audio = await speech(session, "pcm")
    expect(len(audio) >= 2 * 1920 and len(audio) % 2 == 0, "pcm body short or odd")


async def openai_mp3(session: aiohttp.ClientSession, ws_base: str) -> None:
    audio = await speech(session, "mp3")
    expect(audio[:3] == b"ID3" or (len(audio) > 2 and audio[0] == 0xFF and audio[1] & 0xE0 == 0xE0), "not an MP3")


async def aborted_download(session: aiohttp.ClientSession, ws_base: str) -> None:
    body = {"text": TEXT, "max_audio_length_ms": 10_000, "response_format": "mp3"}
    async with session.post("/generate/audio", json=body) as response:
        expect(response.status == 200, f"HTTP {response.status}")
        expect(len(await response.content.readany()) > 0, "no first bytes")
        response.close()  # drops the connection mid-body


async def generate(session: aiohttp.ClientSession, ws_base: str) -> None:
    async with session.post("/generate", json={"text": TEXT, **LENGTH}) as response:
        expect(response.status == 200, f"HTTP {response.status}")
        answer = await response.json()
    wav = base64.b64decode(answer["audio_base64"])
    expect(wav[:4] == b"RIFF" and len(wav) > 44 and answer["duration_ms"] > 0, "not a WAV with audio")


MIX = [ws_stream, ws_cancel, ws_abrupt, openai_pcm, openai_mp3, aborted_download, generate]


SETTLE_S = 15.0  # how long the stack may take to end what the aborted operations left running


async def settled(session: aiohttp.ClientSession) -> dict:
    """Waits until the proxy reports no stream and no WebSocket open (GET /health); what is still open, else {}.
    A /health without these counts (a proxy that hides them) is taken as settled after SETTLE_S."""
    deadline, left = time.monotonic() + SETTLE_S, {}
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        async with session.get("/health") as response:
            proxy = (await response.json(content_type=None)).get("proxy") or {}
        left = {k: proxy[k] for k in ("active_streams", "websockets") if proxy.get(k)}
        if not left and ("active_streams" in proxy or "websockets" in proxy):
            return {}
    return left


# ---- processes -------------------------------------------------------------------------------------------------


def listener(port: int) -> int | None:
    """The PID of the process listening on TCP `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                    return int(proc.name)
            except OSError:
                continue
    return None


def stack_processes(proxy_port: int, triton_port: int) -> dict[str, int]:
    """Role -> PID: the proxy, tritonserver, one stub per model ("stub csm_1b")."""
    found = {}
    if (proxy := listener(proxy_port)) is not None:
        found["proxy"] = proxy
    if (triton := listener(triton_port)) is not None:
        found["tritonserver"] = triton
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == triton:
                    model_py = Path((proc / "cmdline").read_bytes().split(b"\0")[1].decode())
                    found[f"stub {model_py.parent.parent.name}"] = int(proc.name)
            except (OSError, IndexError, ValueError):
                continue
    return found


def sample(pid: int) -> dict | None:
    """Resident memory (MB), open files, /dev/shm mapped (MB) of `pid`; None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
        files = len(os.listdir(f"/proc/{pid}/fd"))
        maps = [line.split(None, 5) for line in Path(f"/proc/{pid}/maps").read_text().splitlines()]
        shm = {m[5].removesuffix(" (deleted)") for m in maps if len(m) == 6 and m[5].startswith("/dev/shm/")}
    except (OSError, StopIteration):
        return None
    shm_bytes = sum(os.stat(p).st_size for p in shm if os.path.exists(p))
    return {"rss_mb": rss_kb / 1024, "open_files": files, "shm_mb": shm_bytes / 2**20, "pid": pid}


def snapshot(roles: dict[str, int]) -> dict[str, dict | None]:
    return {role: sample(pid) for role, pid in roles.items()}


# ---- the run ---------------------------------------------------------------------------------------------------


async def soak(args) -> dict:
    port = urlsplit(args.base).port or 80
    ws_base = "ws" + args.base.removeprefix("http")
    roles = stack_processes(port, args.triton_port)
    before = snapshot(roles)
    done: dict[str, list[float]] = collections.defaultdict(list)
    errors: collections.Counter = collections.Counter()
    deadline = time.monotonic() + args.duration
    warm = {}
    ops = iter(range(sys.maxsize))

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            n = next(ops)
            if args.max_ops and n >= args.max_ops:
                return
            operation = MIX[n % len(MIX)]
            started = time.monotonic()
            try:
                await asyncio.wait_for(operation(session, ws_base), args.op_timeout)
                done[operation.__name__].append(time.monotonic() - started)
            except Failure as e:
                errors[f"{operation.__name__}: {e.kind}"] += 1
            except (asyncio.TimeoutError, TimeoutError):
                errors[f"{operation.__name__}: timeout after {args.op_timeout:g} s"] += 1
            except Exception as e:  # a transport error is an outcome to count, not a reason to stop
                errors[f"{operation.__name__}: {type(e).__name__}"] += 1

    async def warm_up_snapshot() -> None:
        await asyncio.sleep(args.duration / 10)
        warm.update(snapshot(roles))

    timeout = aiohttp.ClientTimeout(total=args.op_timeout + 5)
    started = time.monotonic()
    async with aiohttp.ClientSession(args.base, timeout=timeout) as session:
        sampler = asyncio.create_task(warm_up_snapshot())
        await asyncio.gather(*(client(session) for _ in range(args.clients)))
        sampler.cancel()
        left_open = await settled(session)
    if left_open:
        errors[f"stack: still open {SETTLE_S:g} s after the run: {left_open}"] += 1
    after = snapshot(roles)
    return {
        "base": args.base,
        "duration_s": round(time.monotonic() - started, 1),
        "clients": args.clients,
        "operations": {
            k: {
                "ok": len(v),
                "p50_s": round(statistics.median(v), 3),
                "p95_s": round(sorted(v)[math.ceil(0.95 * len(v)) - 1], 3),
            }
            for k, v in sorted(done.items())
        },
        "ok": sum(len(v) for v in done.values()),
        "errors": dict(errors.most_common()),
        "processes": {
            role: {"before": before.get(role), "warm": warm.get(role) or before.get(role), "end": after.get(role)}
            for role in roles
        },
    }


def report(result: dict) -> str:
    errors = sum(result["errors"].values())
    lines = [
        f"soak: {result['duration_s']} s against {result['base']}, {result['clients']} clients: "
        f"{result['ok'] + errors} operations, {errors} errors",
        f"{'operation':<18}{'ok':>6}{'p50 s':>9}{'p95 s':>9}",
    ]
    lines += [f"{k:<18}{v['ok']:>6}{v['p50_s']:>9.2f}{v['p95_s']:>9.2f}" for k, v in result["operations"].items()]
    lines.append("errors by kind: " + ("none" if not errors else ""))
    lines += [f"  {count:>5}  {kind}" for kind, count in result["errors"].items()]
    lines.append(f"{'process':<18}{'pid':>8}  {'RSS MB before/warm/end':<26}{'open files':<16}{'shm MB warm/end':<16}")
    for role, s in result["processes"].items():
        b, w, e = s["before"], s["warm"], s["end"]
        if not (b and w and e):
            lines.append(f"{role:<18}  gone or replaced during the run")
            continue
        lines.append(
            f"{role:<18}{e['pid']:>8}  {b['rss_mb']:>6.0f} {w['rss_mb']:>6.0f} {e['rss_mb']:>6.0f} "
            f"({e['rss_mb'] - w['rss_mb']:+.0f})    {w['open_files']:>4} -> {e['open_files']:<4}    "
            f"{w['shm_mb']:>5.1f} -> {e['shm_mb']:<5.1f}"
        )
    return "\n".join(lines)


def loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="http://127.0.0.1:8000", help="the proxy (loopback only)")
    parser.add_argument("--triton-port", type=int, default=8001, help="a port tritonserver listens on (gRPC)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds, at most 3600")
    parser.add_argument("--clients", type=int, default=4, help="concurrent loops, at most 32")
    parser.add_argument("--max-ops", type=int, default=0, help="stop after this many operations (0: no limit)")
    parser.add_argument("--op-timeout", type=float, default=60.0, help="seconds one operation may take")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if not loopback(args.base):
        parser.error(f"{args.base} is not a loopback address: the soak only runs against a local stack")
    if not (0 < args.duration <= 3600 and 1 <= args.clients <= 32 and args.op_timeout > 0):
        parser.error("--duration must be in (0, 3600], --clients in [1, 32], --op-timeout > 0")
    result = asyncio.run(soak(args))
    print(report(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
