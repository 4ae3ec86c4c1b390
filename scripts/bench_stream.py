"""Streaming benchmark: time to first audio, gaps, stalls, real-time factor and throughput, per target and concurrency.

    python scripts/bench_stream.py --fixed-frames 25 --concurrency 1,2,4,8 --json out.json
    python scripts/bench_stream.py --target tts,csm_1b --grpc-url 127.0.0.1:8001 --fixed-frames 25
    python scripts/bench_stream.py --target ws,generate --proxy-url http://127.0.0.1:8000 --fixed-frames 25

Targets:
  tts       the `tts` ensemble (csm_1b -> watermarker) over Triton's gRPC bidirectional stream
  csm_1b    the `csm_1b` model alone, same protocol
  ws        the proxy's WebSocket /stream in its low-latency mode (?mode=stream&binary=true&context=false):
            one socket per client, one text message per request, audio as binary frames until the `end` message
  generate  the proxy's POST /generate: not streaming, so its "first audio" is the whole clip
  speech_pcm, speech_mp3
            the proxy's OpenAI-compatible POST /v1/audio/speech with response_format pcm / mp3: the streamed file,
            "first audio" being its first bytes (for mp3 a chunk's duration is estimated from its size at the
            encoder's constant 64 kbit/s)

Each of N requests (--requests; default 3 x concurrency, at least 8) takes the next text of the committed set
benchmarks/texts.json (mixed lengths) and seed = its index, so every target gets the same requests. C clients
(--concurrency, a sweep) each send one request at a time (closed loop). Levels run in order; within a level the
targets run one after another, and --rounds R splits the requests into R rounds that each visit every target, so that
ratios between targets see the same load on a shared machine.

Per (target, concurrency): time to first byte (the first response or bytes, empty or not), time to first audio
(p50/p90/p99, first non-empty chunk after the request was sent), time to the first 100 ms of playable audio (when the
audio received so far first reaches PLAYABLE_S: what a player needs to start), gaps
between chunks (p50/p90/p99), stalls (a chunk that arrived after the audio delivered before it had finished playing,
playback starting at the first chunk: an audible gap), real-time factor (time from request to last chunk / audio
duration; p50), aggregate audio seconds per wall second, and errors.

--fixed-frames N: seeded, fixed-length requests (ignore_eos, exactly N frames of 80 ms), so that random-weight
checkpoints give comparable numbers. The proxy refuses `ignore_eos` (a benchmark-only field) and accepts
max_audio_length_ms from 1000 ms; random weights practically never emit the all-zero EOS frame, so the length is
still fixed there.

Without --grpc-url it starts its own Triton (csm_tts/tooling/local_triton.py, CPU profile, --model-dir /
--watermark-dir); without --proxy-url it starts `python -m proxy` (PROXY_PORT, TRITON_GRPC_URLS, TRITON_MODEL =
--proxy-model) when the ws or generate target is asked for. Output: a table and ratios on stdout; --json PATH writes
a JSON list with one object per (target, concurrency[, watermark]).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from csm_tts import FRAME_MS, SAMPLE_RATE  # noqa: E402
from csm_tts.tooling.local_triton import free_port, start_local_triton  # noqa: E402
from csm_tts.tooling.stream_stats import percentile, playback_stalls  # noqa: E402

TARGETS = ("tts", "csm_1b", "ws", "generate", "speech_pcm", "speech_mp3")
DEFAULT_TARGETS = ("tts", "csm_1b", "ws", "generate")
GRPC_TARGETS = ("tts", "csm_1b")
PROXY_TARGETS = ("ws", "generate", "speech_pcm", "speech_mp3")
MP3_BYTES_PER_S = 64_000 / 8  # proxy/formats.py: MP3 at a constant 64 kbit/s
PROXY_MIN_AUDIO_MS = 1000  # csm_tts/limits.py: max_audio_length_ms 1000-90000
WS_FRAME_HEADER = struct.Struct("<IIII")  # proxy/endpoints/websocket.py: seq, chunk_id, index, samples
TEXTS_FILE = ROOT / "benchmarks" / "texts.json"
DEFAULT_MODEL_DIR = ROOT / "checkpoints" / "csm-tiny"
DEFAULT_WATERMARK_DIR = ROOT / "checkpoints" / "silentcipher-tiny"
PLAYABLE_S = 0.1  # audio a player needs before it starts (the watermarker's minimum message, issue 20)


@dataclass
class RequestResult:
    index: int
    arrivals: list[float] = field(default_factory=list)  # seconds after the request was sent, one per chunk
    durations: list[float] = field(default_factory=list)  # seconds of audio in each chunk
    error: str | None = None

    def audible(self) -> tuple[list[float], list[float]]:
        """Arrivals and durations of the chunks that carry audio (an empty last chunk only closes the stream)."""
        pairs = [(a, d) for a, d in zip(self.arrivals, self.durations, strict=True) if d > 0]
        return [a for a, _ in pairs], [d for _, d in pairs]

    def playable(self, seconds: float = PLAYABLE_S) -> float | None:
        """When the audio received so far first reached `seconds` (None: it never did)."""
        total = 0.0
        for arrival, duration in zip(self.arrivals, self.durations, strict=True):
            total += duration
            if total >= seconds - 1e-9:
                return arrival
        return None


def summarize(target: str, concurrency: int, results: list[RequestResult], wall_s: float, extra: dict) -> dict:
    ok = [r for r in results if r.error is None and r.arrivals]
    errors = [r.error or "no audio" for r in results if r not in ok]
    ttfb, ttfa, playable, gaps, rtfs, stalls, stalled, audio = [], [], [], [], [], 0, 0, 0.0
    for r in ok:
        ttfb.append(r.arrivals[0] * 1000)
        arrivals, durations = r.audible()
        if not arrivals:
            continue
        ttfa.append(arrivals[0] * 1000)
        if (playable_s := r.playable()) is not None:
            playable.append(playable_s * 1000)
        gaps += [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
        duration = sum(durations)
        audio += duration
        rtfs.append(r.arrivals[-1] / duration)
        n, _ = playback_stalls(arrivals, durations)
        stalls += n
        stalled += bool(n)
    pcts = lambda values: {f"p{q}": percentile(values, q) for q in (50, 90, 99)}  # noqa: E731
    return {
        "target": target,
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(errors),
        "error_samples": sorted(set(e[:200] for e in errors))[:3],
        "ttfb_ms": pcts(ttfb),
        "ttfa_ms": pcts(ttfa),
        "playable_100ms_ms": pcts(playable),
        "gap_ms": pcts(gaps),
        "stalls": stalls,
        "stalled_requests": stalled,
        "rtf": {"p50": percentile(rtfs, 50), "p90": percentile(rtfs, 90), "max": max(rtfs) if rtfs else None},
        "audio_s_per_s": audio / wall_s if wall_s > 0 else None,
        "audio_s": audio,
        "wall_s": wall_s,
        "chunks_per_request": percentile([len(r.audible()[0]) for r in ok], 50),
        **extra,
    }


# -- what each request asks for ------------------------------------------------------------------------------------
def load_texts(path: Path = TEXTS_FILE) -> list[str]:
    return json.loads(Path(path).read_text())["texts"]


@dataclass
class Plan:
    texts: list[str]
    fixed_frames: int | None
    max_audio_length_ms: int

    def text(self, index: int) -> str:
        return self.texts[index % len(self.texts)]

    def grpc_parameters(self, index: int, watermark: bool | None) -> dict:
        params: dict = {"max_audio_length_ms": self.max_audio_length_ms}
        if self.fixed_frames:
            params.update(seed=index, ignore_eos=True, max_audio_length_ms=self.fixed_frames * FRAME_MS)
        if watermark is not None:
            params["watermark"] = watermark
        return params

    def proxy_body(self, index: int, watermark: bool | None) -> dict:
        body: dict = {
            "text": self.text(index),
            "max_audio_length_ms": max(self.max_audio_length_ms, PROXY_MIN_AUDIO_MS),
        }
        if self.fixed_frames:
            body.update(seed=index, max_audio_length_ms=max(self.fixed_frames * FRAME_MS, PROXY_MIN_AUDIO_MS))
        if watermark is not None:
            body["watermark"] = watermark
        return body


# -- clients: one per simulated user, one request at a time ----------------------------------------------------------
# Each client's `exchange` fills a RequestResult; `measure` times it and turns failures into that request's error.
class GrpcClient:
    def __init__(self, url: str, model: str):
        import tritonclient.grpc.aio as grpcclient

        self.model = model
        self.client = grpcclient.InferenceServerClient(url)

    async def exchange(
        self, plan: Plan, index: int, watermark: bool | None, result: RequestResult, sent: float
    ) -> None:
        from tritonclient.grpc import InferInput

        text = InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([plan.text(index).encode()], dtype=np.object_))
        request = {"model_name": self.model, "inputs": [text], "parameters": plan.grpc_parameters(index, watermark)}
        done = asyncio.Event()

        async def requests():
            yield request
            await done.wait()  # the stream stays open until the last response has arrived

        try:
            async for response, error in self.client.stream_infer(requests()):
                now = time.perf_counter()
                if error is not None:
                    result.error = error.message() if hasattr(error, "message") else str(error)
                    break
                audio = response.as_numpy("audio")
                result.arrivals.append(now - sent)
                result.durations.append((audio.size if audio is not None else 0) / SAMPLE_RATE)
                if bool(response.as_numpy("is_last")[0]):
                    break
            else:
                result.error = result.error or "the stream ended without a last chunk"
        finally:
            done.set()

    async def close(self) -> None:
        await self.client.close()


class WebSocketClient:
    """One WS /stream session in the low-latency mode; requests are text messages answered in order."""

    def __init__(self, proxy_url: str):
        self.proxy_url = proxy_url.rstrip("/")
        self.session = None
        self.ws = None

    async def open(self) -> WebSocketClient:
        import aiohttp

        self.session = aiohttp.ClientSession()
        try:
            self.ws = await self.session.ws_connect(
                f"{self.proxy_url}/stream?mode=stream&binary=true&context=false", max_msg_size=0
            )
        except BaseException:
            await self.session.close()
            raise
        return self

    async def exchange(
        self, plan: Plan, index: int, watermark: bool | None, result: RequestResult, sent: float
    ) -> None:
        import aiohttp

        await self.ws.send_str(json.dumps(plan.proxy_body(index, watermark)))
        while True:
            msg = await self.ws.receive()
            now = time.perf_counter()
            if msg.type == aiohttp.WSMsgType.BINARY:
                _, _, _, samples = WS_FRAME_HEADER.unpack_from(msg.data)
                result.arrivals.append(now - sent)
                result.durations.append(samples / SAMPLE_RATE)
            elif msg.type == aiohttp.WSMsgType.TEXT:
                body = json.loads(msg.data)
                if body.get("type") == "error" or "error" in body:
                    result.error = str(body.get("error"))
                    return
                if body.get("type") == "end":
                    return
            else:
                result.error = f"the socket closed ({msg.type.name} {self.ws.close_code})"
                return

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()


class GenerateClient:
    """POST /generate: the whole clip in one JSON answer."""

    def __init__(self, proxy_url: str):
        self.proxy_url = proxy_url.rstrip("/")
        self.session = None

    async def open(self) -> GenerateClient:
        import aiohttp

        self.session = aiohttp.ClientSession()
        return self

    async def exchange(
        self, plan: Plan, index: int, watermark: bool | None, result: RequestResult, sent: float
    ) -> None:
        async with self.session.post(f"{self.proxy_url}/generate", json=plan.proxy_body(index, watermark)) as r:
            body = await r.json(content_type=None)
        now = time.perf_counter()
        if r.status != 200:
            result.error = f"HTTP {r.status}: {body.get('error') if isinstance(body, dict) else body}"
        else:
            result.arrivals.append(now - sent)
            result.durations.append(float(body["duration_ms"]) / 1000)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class SpeechClient:
    """POST /v1/audio/speech (OpenAI's API), the file read as it streams in."""

    def __init__(self, proxy_url: str, response_format: str):
        self.proxy_url = proxy_url.rstrip("/")
        self.response_format = response_format
        self.session = None

    async def open(self) -> SpeechClient:
        import aiohttp

        self.session = aiohttp.ClientSession()
        return self

    async def exchange(
        self, plan: Plan, index: int, watermark: bool | None, result: RequestResult, sent: float
    ) -> None:
        body = plan.proxy_body(index, watermark)
        body.update(model="csm-1b", voice="alloy", input=body.pop("text"), response_format=self.response_format)
        async with self.session.post(f"{self.proxy_url}/v1/audio/speech", json=body) as r:
            if r.status != 200:
                result.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return
            async for piece in r.content.iter_any():
                if not piece:
                    continue
                result.arrivals.append(time.perf_counter() - sent)
                if self.response_format == "pcm":
                    result.durations.append(len(piece) / 2 / SAMPLE_RATE)
                else:
                    result.durations.append(len(piece) / MP3_BYTES_PER_S)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


async def measure(client, plan: Plan, index: int, watermark: bool | None, timeout_s: float) -> RequestResult:
    """One request through any client: arrival times count from the send, and any failure (timeout, RPC or socket
    error) becomes this request's error rather than the end of the benchmark."""
    result = RequestResult(index)
    try:
        async with asyncio.timeout(timeout_s):
            await client.exchange(plan, index, watermark, result, sent=time.perf_counter())
    except TimeoutError:
        result.error = f"timed out after {timeout_s:g} s"
    except Exception as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def open_client(target: str, stack: Stack):
    if target in GRPC_TARGETS:
        return GrpcClient(stack.grpc_url, target)
    if target == "ws":
        return await WebSocketClient(stack.proxy_url).open()
    if target.startswith("speech_"):
        return await SpeechClient(stack.proxy_url, target.removeprefix("speech_")).open()
    return await GenerateClient(stack.proxy_url).open()


async def run_level(
    target: str,
    concurrency: int,
    requests: int,
    plan: Plan,
    stack: Stack,
    watermark: bool | None,
    timeout_s: float,
    first: int = 0,
) -> tuple[list[RequestResult], float]:
    """Requests first .. first+requests-1 from `concurrency` clients, one request at a time each (closed loop)."""
    clients = []
    try:
        for _ in range(concurrency):  # connections are opened before the clock starts
            clients.append(await open_client(target, stack))
    except Exception as e:  # e.g. the proxy is down: every request of this level fails, the benchmark goes on
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        message = f"could not connect: {type(e).__name__}: {e}"
        return [RequestResult(i, error=message) for i in range(first, first + requests)], 0.0
    indices = itertools.count(first)
    results: list[RequestResult] = []

    async def user(client):
        while (index := next(indices)) < first + requests:
            results.append(await measure(client, plan, index, watermark, timeout_s))

    try:
        start = time.perf_counter()
        await asyncio.gather(*(user(c) for c in clients))
        wall = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    return sorted(results, key=lambda r: r.index), wall


# -- the stack under test ---------------------------------------------------------------------------------------------
class Stack:
    """An already running Triton / proxy, or ones started here (and stopped by `close`)."""

    def __init__(self, grpc_url: str | None, proxy_url: str | None):
        self.grpc_url = grpc_url
        self.proxy_url = proxy_url
        self.triton = None
        self.proxy: subprocess.Popen | None = None
        self.proxy_log: Path | None = None
        self.tmp: Path | None = None

    def start_triton(self, model_dir: Path, watermark_dir: Path, cpu_threads: int | None = None) -> None:
        self.tmp = self.tmp or Path(tempfile.mkdtemp(prefix="bench-stream-"))
        print(f"starting Triton ({model_dir.name}) ...", file=sys.stderr, flush=True)
        # The watermarker's production idle timeout (the test fixture's 3 s evicts streams whose chunks are slow
        # on a busy CPU, which then never end).
        env = {"CSM_WATERMARK_IDLE_TIMEOUT_S": "30"}
        if cpu_threads:
            env.update(OMP_NUM_THREADS=str(cpu_threads), MKL_NUM_THREADS=str(cpu_threads))
        self.triton = start_local_triton(self.tmp / "model_repository", Path(model_dir), Path(watermark_dir), env)
        self.grpc_url = self.triton.grpc_url

    def start_proxy(self, model: str, timeout_s: float = 60.0) -> None:
        self.tmp = self.tmp or Path(tempfile.mkdtemp(prefix="bench-stream-"))
        port = free_port()
        env = {
            **os.environ,
            "PROXY_HOST": "127.0.0.1",
            "PROXY_PORT": str(port),
            "TRITON_GRPC_URLS": self.grpc_url,
            "TRITON_MODEL": model,
            "PROXY_LOG_LEVEL": "WARNING",
        }
        self.proxy_log = self.tmp / "proxy.log"
        print(f"starting the proxy (model {model}) ...", file=sys.stderr, flush=True)
        with open(self.proxy_log, "wb") as log:
            self.proxy = subprocess.Popen(
                [sys.executable, "-m", "proxy"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.proxy_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proxy.poll() is not None:
                raise SystemExit(
                    f"the proxy exited with {self.proxy.returncode}:\n{self.proxy_log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.proxy_url}/", timeout=1):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.2)
        raise SystemExit(f"the proxy did not answer within {timeout_s:g} s:\n{self.proxy_log.read_text()[-3000:]}")

    def proxy_health(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"{self.proxy_url}/health", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    async def ready_models(self, models) -> dict[str, bool]:
        import tritonclient.grpc.aio as grpcclient

        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            return {m: await client.is_model_ready(m) for m in models}
        finally:
            await client.close()

    def close(self) -> None:
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.send_signal(signal.SIGINT)
            try:
                self.proxy.wait(15)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait()
        if self.triton is not None:
            self.triton.stop()


# -- the run ----------------------------------------------------------------------------------------------------------
def parse_list(value: str, kind=str) -> list:
    return [kind(v.strip()) for v in value.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--target", default=",".join(DEFAULT_TARGETS), help=f"comma-separated subset of {', '.join(TARGETS)}"
    )
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated concurrency levels (default 1,2,4,8)")
    parser.add_argument("--requests", type=int, help="requests per level (default 3 x concurrency, at least 8)")
    parser.add_argument(
        "--fixed-frames", type=int, help="seeded fixed-length mode: exactly N 80 ms frames (ignore_eos)"
    )
    parser.add_argument(
        "--max-audio-length-ms", type=int, default=10_000, help="length limit without --fixed-frames (default 10000)"
    )
    parser.add_argument(
        "--watermark",
        default="default",
        help="watermark option of tts/ws/generate requests: default (server's), on, off, or on,off for both in one run",
    )
    parser.add_argument("--grpc-url", help="a running Triton (host:port); default: start one")
    parser.add_argument("--proxy-url", help="a running proxy (http://host:port); default: start one for ws/generate")
    parser.add_argument("--proxy-model", default="tts", help="TRITON_MODEL of a proxy started here (default tts)")
    parser.add_argument(
        "--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="CSM checkpoint of a Triton started here"
    )
    parser.add_argument(
        "--watermark-dir",
        type=Path,
        default=DEFAULT_WATERMARK_DIR,
        help="watermark checkpoint of a Triton started here",
    )
    parser.add_argument(
        "--cpu-threads",
        type=int,
        help="OMP_NUM_THREADS of a Triton started here; 1 keeps a shared CPU box stable (torch's "
        "2-thread ops ran 5-50x slower on a busy 2-core machine); default: torch's own choice",
    )
    parser.add_argument("--texts", type=Path, default=TEXTS_FILE, help="JSON file with a 'texts' list")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="split each level's requests into R rounds that visit every target in turn (ratios "
        "between targets then see the same machine load); default 1",
    )
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per request (default 120)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the one untimed request per target")
    parser.add_argument("--json", type=Path, help="write the results (a JSON list) here")
    args = parser.parse_args(argv)
    try:
        args.targets = parse_list(args.target)
        args.levels = parse_list(args.concurrency, int)
        args.watermarks = [{"default": None, "on": True, "off": False}[w] for w in parse_list(args.watermark)]
    except (ValueError, KeyError):
        parser.error("--concurrency takes integers; --watermark takes default, on, off")
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown or not args.targets:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    if not args.levels or min(args.levels) < 1:
        parser.error("--concurrency needs levels >= 1")
    if args.requests is not None and args.requests < 1:
        parser.error("--requests must be >= 1")
    if args.cpu_threads is not None and args.cpu_threads < 1:
        parser.error("--cpu-threads must be >= 1")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.fixed_frames is not None and args.fixed_frames < 1:
        parser.error("--fixed-frames must be >= 1")
    return args


def watermark_label(value: bool | None) -> str:
    return {None: "default", True: "on", False: "off"}[value]


async def warm_up(target: str, plan: Plan, stack: Stack, watermark: bool | None, timeout_s: float) -> str | None:
    """One untimed request. Returns its error or None."""
    client = await open_client(target, stack)
    try:
        return (await measure(client, plan, 0, watermark, timeout_s)).error
    finally:
        await client.close()


async def run(args: argparse.Namespace, stack: Stack) -> list[dict]:
    plan = Plan(load_texts(args.texts), args.fixed_frames, args.max_audio_length_ms)
    targets = list(args.targets)
    notes = []
    grpc_wanted = [t for t in targets if t in GRPC_TARGETS]
    if grpc_wanted:
        ready = await stack.ready_models(grpc_wanted)
        for model, ok in ready.items():
            if not ok:
                notes.append(f"target {model} skipped: the model is not ready on {stack.grpc_url}")
                targets.remove(model)
    if any(t in PROXY_TARGETS for t in targets) and stack.proxy_url is None:
        notes.append("proxy targets skipped: no proxy (proxy/ is missing and no --proxy-url)")
        targets = [t for t in targets if t not in PROXY_TARGETS]
    if (
        args.fixed_frames
        and args.fixed_frames * FRAME_MS < PROXY_MIN_AUDIO_MS
        and any(t in PROXY_TARGETS for t in targets)
    ):
        notes.append(
            f"the proxy needs max_audio_length_ms >= {PROXY_MIN_AUDIO_MS}: proxy requests generate "
            f"{PROXY_MIN_AUDIO_MS // FRAME_MS} frames, not {args.fixed_frames}"
        )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    runs = [(t, w) for t in targets for w in ([None] if t == "csm_1b" else args.watermarks)]
    if not args.no_warmup:
        for target, watermark in runs:
            try:
                error = await warm_up(target, plan, stack, watermark, args.timeout_s)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            if error:
                print(f"warning: warm-up request to {target} failed: {error}", file=sys.stderr)
    rows = []
    for level in args.levels:
        requests = args.requests or max(8, 3 * level)
        rounds = max(1, min(args.rounds, requests // level))
        # Round r sends every target the same requests (indices), targets one after another, so that a slow minute of
        # a shared machine hits all targets alike instead of whichever ran then.
        bounds = [requests * r // rounds for r in range(rounds + 1)]
        collected = {run: ([], 0.0) for run in runs}
        for r in range(rounds):
            for target, watermark in runs:
                count = bounds[r + 1] - bounds[r]
                print(
                    f"{target} (watermark {watermark_label(watermark)}): {count} requests at concurrency {level}"
                    f"{f', round {r + 1}/{rounds}' if rounds > 1 else ''} ...",
                    file=sys.stderr,
                    flush=True,
                )
                results, wall = await run_level(
                    target, level, count, plan, stack, watermark, args.timeout_s, first=bounds[r]
                )
                done, total = collected[(target, watermark)]
                collected[(target, watermark)] = (done + results, total + wall)
        for (target, watermark), (results, wall) in collected.items():
            url = stack.grpc_url if target in GRPC_TARGETS else stack.proxy_url
            rows.append(
                summarize(
                    target,
                    level,
                    results,
                    wall,
                    {
                        "watermark": None if target == "csm_1b" else watermark_label(watermark),
                        "fixed_frames": args.fixed_frames,
                        "rounds": rounds,
                        "url": url,
                        "date": datetime.date.today().isoformat(),
                    },
                )
            )
    return rows


def fmt(value, spec=".0f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    print(
        f"{'target':<10} {'wm':<7} {'conc':>4} {'reqs':>4} {'err':>3}  {'TTFB p50':>8}  {'TTFA ms p50/p90/p99':>20}  "
        f"{'100ms p50/p90':>13}  "
        f"{'gap ms p50/p90/p99':>18}  {'stalls':>6} {'RTF p50':>7} {'audio s/s':>9}"
    )
    for r in rows:
        t, g, p = r["ttfa_ms"], r["gap_ms"], r["playable_100ms_ms"]
        print(
            f"{r['target']:<10} {r['watermark'] or '-':<7} {r['concurrency']:>4} {r['requests']:>4} {r['errors']:>3}  "
            f"{fmt(r['ttfb_ms']['p50']):>8}  {fmt(t['p50']) + '/' + fmt(t['p90']) + '/' + fmt(t['p99']):>20}  "
            f"{fmt(p['p50']) + '/' + fmt(p['p90']):>13}  "
            f"{fmt(g['p50']) + '/' + fmt(g['p90']) + '/' + fmt(g['p99']):>18}  {r['stalls']:>6} "
            f"{fmt(r['rtf']['p50'], '.3f'):>7} {fmt(r['audio_s_per_s'], '.2f'):>9}"
        )
        for sample in r["error_samples"]:
            print(f"          error: {sample}")


def ratios(rows: list[dict], proxy_model: str) -> list[str]:
    """Ratios between targets measured in the same run and level (the figures to trust on a noisy machine)."""
    lines = []
    pairs = [
        ("tts", "csm_1b"),
        ("ws", proxy_model),
        ("generate", proxy_model),
        ("ws", "csm_1b"),
        ("speech_pcm", "ws"),
        ("speech_mp3", "ws"),
    ]
    by_key = {}
    for r in rows:
        by_key.setdefault((r["target"], r["concurrency"]), []).append(r)
    levels = sorted({r["concurrency"] for r in rows})
    seen = set()
    for a, b in pairs:
        if (a, b) in seen or a == b:
            continue
        seen.add((a, b))
        for level in levels:
            for ra in by_key.get((a, level), []):
                # Same watermark setting when the other target has one (csm_1b has none).
                same = [r for r in by_key.get((b, level), []) if r["watermark"] in (ra["watermark"], None)]
                for rb in same[:1]:
                    ta, tb = ra["ttfa_ms"]["p50"], rb["ttfa_ms"]["p50"]
                    qa, qb = ra["audio_s_per_s"], rb["audio_s_per_s"]
                    if None in (ta, tb) or not tb or not qb:
                        continue
                    wm = f" (watermark {ra['watermark']})" if ra["watermark"] and a != "csm_1b" else ""
                    wm_b = f" (watermark {rb['watermark']})" if rb["watermark"] else ""
                    lines.append(
                        f"{a}{wm} / {b}{wm_b} at concurrency {level}: TTFA p50 x{ta / tb:.2f}, "
                        f"audio s/s x{(qa or 0) / qb:.2f}"
                    )
    wm_rows = {(r["target"], r["concurrency"], r["watermark"]): r for r in rows}
    for (target, level, wm), r in sorted(wm_rows.items(), key=str):
        off = wm_rows.get((target, level, "off"))
        if wm == "on" and off and off["ttfa_ms"]["p50"] and off["audio_s_per_s"] and r["ttfa_ms"]["p50"]:
            lines.append(
                f"{target} watermark on / off at concurrency {level}: TTFA p50 "
                f"x{r['ttfa_ms']['p50'] / off['ttfa_ms']['p50']:.2f}, audio s/s "
                f"x{r['audio_s_per_s'] / off['audio_s_per_s']:.2f}; first 100 ms playable p50 "
                f"{fmt(r['playable_100ms_ms']['p50'])} / {fmt(off['playable_100ms_ms']['p50'])} ms"
            )
    return lines


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    stack = Stack(args.grpc_url, args.proxy_url)
    try:
        needs_grpc = any(t in GRPC_TARGETS for t in args.targets) or (
            args.proxy_url is None and any(t in PROXY_TARGETS for t in args.targets)
        )
        if needs_grpc and stack.grpc_url is None:
            stack.start_triton(args.model_dir, args.watermark_dir, args.cpu_threads)
        if (
            any(t in PROXY_TARGETS for t in args.targets)
            and stack.proxy_url is None
            and (ROOT / "proxy" / "__main__.py").exists()
        ):
            stack.start_proxy(args.proxy_model)
            status, health = stack.proxy_health()
            if status != 200:
                print(f"warning: proxy /health answers {status}: {health.get('error')}", file=sys.stderr)
        rows = asyncio.run(run(args, stack))
        if stack.proxy is not None and stack.proxy.poll() is not None:
            print(
                f"warning: the proxy started here exited during the run (code {stack.proxy.returncode}); "
                f"its log: {stack.proxy_log}",
                file=sys.stderr,
            )
    finally:
        stack.close()
    print_table(rows)
    for line in ratios(rows, args.proxy_model):
        print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
