"""Time to first audio and frames per second of the CSM engine: in-process, through Triton over gRPC, and batched.

    python scripts/bench_engine.py [--model-dir checkpoints/csm-tiny] [--runs 5] [--frames 50] [--grpc-url HOST:PORT]
                                   [--concurrency 8]

Without --grpc-url it starts its own local Triton (CPU profile) on free ports. All paths run the same seeded,
fixed-length requests (ignore_eos), so the ratio in-process / gRPC is the serving overhead and the ratio of
aggregate frames/s at --concurrency streams to one stream (both through the in-process scheduler, one run) is what
cross-stream batching buys. Prints tables.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from csm_tts import FRAME_MS, SAMPLES_PER_FRAME  # noqa: E402
from csm_tts.speech.engine import CsmEngine, GenerationRequest  # noqa: E402
from csm_tts.speech.scheduler import StreamScheduler  # noqa: E402
from csm_tts.tooling.local_triton import start_local_triton  # noqa: E402
from csm_tts.tooling.triton_streams import stream  # noqa: E402

TEXT = "The past is just a story we tell ourselves."


def in_process(engine: CsmEngine, frames: int, runs: int) -> list[tuple[float, float]]:
    results = []
    for seed in range(runs):
        request = GenerationRequest(TEXT, seed=seed, max_audio_length_ms=frames * FRAME_MS, ignore_eos=True)
        start = time.perf_counter()
        first = None
        samples = 0
        for chunk in engine.generate(request):
            first = first if first is not None else time.perf_counter() - start
            samples += chunk.audio.size
        total = time.perf_counter() - start
        results.append((first, samples / SAMPLES_PER_FRAME / total))
    return results


async def over_grpc(url: str, frames: int, runs: int) -> list[tuple[float, float]]:
    results = []
    for seed in range(runs):
        params = {"seed": seed, "max_audio_length_ms": frames * FRAME_MS, "ignore_eos": True}
        start = time.perf_counter()
        result = await stream(url, "csm_1b", TEXT, params)
        total = time.perf_counter() - start
        if result.error:
            raise SystemExit(f"request failed: {result.error}")
        results.append((result.arrival_s[0], result.audio.size / SAMPLES_PER_FRAME / total))
    return results


class TimingSink:
    """Records when a scheduled stream's chunks arrive."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first = None
        self.samples = 0
        self.done = threading.Event()

    def send_chunk(self, stream, chunk):
        self.first = self.first if self.first is not None else time.perf_counter() - self.start
        self.samples += chunk.audio.size
        if chunk.is_last:
            self.done.set()

    def send_error(self, message, code):
        raise SystemExit(f"stream failed: {code} {message}")

    def is_cancelled(self):
        return False


def batched(engine: CsmEngine, frames: int, concurrency: int) -> tuple[float, float]:
    """Aggregate frames/s and median TTFA of `concurrency` simultaneous streams through the scheduler."""
    scheduler = StreamScheduler(engine, max_active=concurrency, max_queued=concurrency, logger=lambda m: None)
    try:
        start = time.perf_counter()
        sinks = []
        for seed in range(concurrency):
            sinks.append(TimingSink())
            request = GenerationRequest(TEXT, seed=seed, max_audio_length_ms=frames * FRAME_MS, ignore_eos=True)
            scheduler.submit(request, sinks[-1])
        for sink in sinks:
            sink.done.wait()
        total = time.perf_counter() - start
    finally:
        scheduler.close()
    return sum(s.samples for s in sinks) / SAMPLES_PER_FRAME / total, statistics.median(s.first for s in sinks)


def summary(name: str, rows: list[tuple[float, float]]) -> tuple[float, float]:
    ttfa = statistics.median(r[0] for r in rows) * 1000
    fps = statistics.median(r[1] for r in rows)
    print(f"{name:<12} {ttfa:>10.1f} {fps:>10.1f} {fps * FRAME_MS / 1000:>12.2f}")
    return ttfa, fps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(ROOT / "checkpoints" / "csm-tiny"))
    parser.add_argument("--grpc-url", help="an already running Triton serving csm_1b (else one is started)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    engine = CsmEngine.from_dir(args.model_dir)
    in_process(engine, 4, 1)  # warm-up
    local = in_process(engine, args.frames, args.runs)
    one_fps, one_ttfa = batched(engine, args.frames, 1)
    many_fps, many_ttfa = batched(engine, args.frames, args.concurrency)
    del engine

    server = None
    url = args.grpc_url
    if url is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-engine-"))
        server = start_local_triton(
            tmp / "model_repository", Path(args.model_dir), ROOT / "checkpoints" / "silentcipher-tiny"
        )
        url = server.grpc_url
    try:
        asyncio.run(over_grpc(url, 4, 1))  # warm-up
        served = asyncio.run(over_grpc(url, args.frames, args.runs))
    finally:
        if server:
            server.stop()

    print(f"{args.runs} runs of {args.frames} frames ({args.frames * FRAME_MS / 1000:.1f} s of audio), medians")
    print(f"{'path':<12} {'TTFA ms':>10} {'frames/s':>10} {'x real time':>12}")
    local_ttfa, local_fps = summary("in-process", local)
    grpc_ttfa, grpc_fps = summary("triton-grpc", served)
    print(f"serving overhead: TTFA x{grpc_ttfa / local_ttfa:.2f}, throughput x{grpc_fps / local_fps:.2f}")
    print(f"\nbatched scheduler, {args.frames} frames per stream")
    print(f"{'streams':<12} {'TTFA ms':>10} {'agg frames/s':>13}")
    print(f"{1:<12} {one_ttfa * 1000:>10.1f} {one_fps:>13.1f}")
    print(f"{args.concurrency:<12} {many_ttfa * 1000:>10.1f} {many_fps:>13.1f}")
    print(f"aggregate throughput x{many_fps / one_fps:.2f} at {args.concurrency} streams")


if __name__ == "__main__":
    main()
