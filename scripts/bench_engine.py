"""The CSM engine's speed on the tiny checkpoint: the fixed-slot path against the old one, and in-process vs Triton.

    python scripts/bench_engine.py [--model-dir checkpoints/csm-tiny] [--frames 40] [--concurrency 8] [--rounds 3]
                                   [--cpu-threads 1] [--runs 5] [--grpc-url HOST:PORT | --no-triton]

All paths run the same seeded, fixed-length requests (ignore_eos). Measured in one run, rounds interleaved so that
both paths see the same load (the figures to trust are the ratios):

- frame step: the time of one batched `step_many` (no codec, no scheduler) for 1 and --concurrency streams, on the
  new engine (`CsmEngine`, fixed slots) and the old one (`csm_tts.tooling.baseline_engine.BaselineEngine`);
- scheduler: aggregate frames/s and median time to first audio of 1 and --concurrency simultaneous streams through
  `StreamScheduler` (prefill, frames and codec decode: what a server instance delivers), both paths;
- unless --no-triton: one stream in-process vs through a local Triton (CPU profile) over gRPC, i.e. the serving
  overhead.
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from csm_tts import FRAME_MS, SAMPLES_PER_FRAME  # noqa: E402
from csm_tts.speech.engine import CsmEngine  # noqa: E402
from csm_tts.speech.request import GenerationRequest  # noqa: E402
from csm_tts.speech.scheduler import StreamScheduler  # noqa: E402
from csm_tts.tooling.baseline_engine import BaselineEngine  # noqa: E402
from csm_tts.tooling.local_triton import start_local_triton  # noqa: E402
from csm_tts.tooling.triton_streams import stream  # noqa: E402

TEXT = "The past is just a story we tell ourselves."


def in_process(engine, frames: int, runs: int) -> list[tuple[float, float]]:
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


def frame_step_ms(engine, streams: int, frames: int) -> float:
    """Median wall time of one batched frame step of `streams` streams (after two warm-up steps)."""
    requests = [
        GenerationRequest(TEXT, seed=i, max_audio_length_ms=(frames + 2) * FRAME_MS, ignore_eos=True)
        for i in range(streams)
    ]
    running = [engine.start(r) for r in requests]
    times = []
    for step in range(frames + 2):
        started = time.perf_counter()
        engine.step_many(running)
        if step >= 2:
            times.append(time.perf_counter() - started)
    for one in running:
        engine.release(one)
    return statistics.median(times) * 1000


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


def batched(engine, frames: int, concurrency: int) -> tuple[float, float]:
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


def compare_paths(model_dir: str, frames: int, concurrency: int, rounds: int) -> dict:
    """Old and new engine paths, 1 and `concurrency` streams, frame step and scheduler, rounds interleaved."""
    new = CsmEngine.from_dir(model_dir, max_streams=concurrency)
    paths = {"old": BaselineEngine(new.model, new.processor), "new": new}
    levels = (1, concurrency)
    steps = {(p, n): [] for p in paths for n in levels}
    scheduled = {(p, n): [] for p in paths for n in levels}
    for engine in paths.values():  # warm-up
        frame_step_ms(engine, concurrency, 2)
        batched(engine, 4, 2)
    for round_index in range(rounds):
        for n in levels:
            for name, engine in paths.items():
                steps[name, n].append(frame_step_ms(engine, n, frames))
                scheduled[name, n].append(batched(engine, frames, n))
        print(f"round {round_index + 1}/{rounds} done", flush=True)
    return {
        "step_ms": {k: statistics.median(v) for k, v in steps.items()},
        "fps": {k: statistics.median(f for f, _ in v) for k, v in scheduled.items()},
        "ttfa_ms": {k: statistics.median(t for _, t in v) * 1000 for k, v in scheduled.items()},
    }


def print_comparison(result: dict, frames: int, concurrency: int, rounds: int) -> None:
    step, fps, ttfa = result["step_ms"], result["fps"], result["ttfa_ms"]
    print(f"\nold (per-stream caches) vs new (fixed slots) engine path, {frames} frames per stream, median of {rounds}")
    print(
        f"{'path':<5} {'streams':>7} {'step ms':>8} {'step frames/s':>14} {'sched TTFA ms':>14} {'sched frames/s':>15}"
    )
    for path in ("old", "new"):
        for n in (1, concurrency):
            print(
                f"{path:<5} {n:>7} {step[path, n]:>8.1f} {n * 1000 / step[path, n]:>14.1f} "
                f"{ttfa[path, n]:>14.1f} {fps[path, n]:>15.1f}"
            )
    c = concurrency
    print(
        f"new path, aggregate frames/s at {c} streams / 1 stream: x{fps['new', c] / fps['new', 1]:.2f} through the "
        f"scheduler, x{c * step['new', 1] / step['new', c]:.2f} in the frame step "
        f"(old path: x{fps['old', c] / fps['old', 1]:.2f}, x{c * step['old', 1] / step['old', c]:.2f})"
    )
    print(
        f"frame step at {c} streams, old / new time: x{step['old', c] / step['new', c]:.2f}; at 1 stream: "
        f"x{step['old', 1] / step['new', 1]:.2f}; scheduler frames/s at {c} streams, new / old: "
        f"x{fps['new', c] / fps['old', c]:.2f}"
    )


def summary(name: str, rows: list[tuple[float, float]]) -> tuple[float, float]:
    ttfa = statistics.median(r[0] for r in rows) * 1000
    fps = statistics.median(r[1] for r in rows)
    print(f"{name:<12} {ttfa:>10.1f} {fps:>10.1f} {fps * FRAME_MS / 1000:>12.2f}")
    return ttfa, fps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(ROOT / "checkpoints" / "csm-tiny"))
    parser.add_argument("--grpc-url", help="an already running Triton serving csm_1b (else one is started)")
    parser.add_argument("--no-triton", action="store_true", help="skip the in-process vs Triton comparison")
    parser.add_argument("--runs", type=int, default=5, help="one-stream runs of the in-process vs Triton comparison")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the old vs new comparison")
    parser.add_argument(
        "--cpu-threads", type=int, help="torch intra-op threads, here and in the Triton it starts (1 is steadier)"
    )
    args = parser.parse_args()
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)

    comparison = compare_paths(args.model_dir, args.frames, args.concurrency, args.rounds)
    served = local = None
    if not args.no_triton:
        engine = CsmEngine.from_dir(args.model_dir)
        in_process(engine, 4, 1)  # warm-up
        local = in_process(engine, args.frames, args.runs)
        del engine
        server = None
        url = args.grpc_url
        if url is None:
            tmp = Path(tempfile.mkdtemp(prefix="bench-engine-"))
            server = start_local_triton(
                tmp / "model_repository",
                Path(args.model_dir),
                ROOT / "checkpoints" / "silentcipher-tiny",
                {"OMP_NUM_THREADS": str(args.cpu_threads)} if args.cpu_threads else None,  # the same threads
            )
            url = server.grpc_url
        try:
            asyncio.run(over_grpc(url, 4, 1))  # warm-up
            served = asyncio.run(over_grpc(url, args.frames, args.runs))
        finally:
            if server:
                server.stop()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s)")
    print_comparison(comparison, args.frames, args.concurrency, args.rounds)
    if served is not None:
        print(f"\n{args.runs} runs of {args.frames} frames ({args.frames * FRAME_MS / 1000:.1f} s of audio), medians")
        print(f"{'path':<12} {'TTFA ms':>10} {'frames/s':>10} {'x real time':>12}")
        local_ttfa, local_fps = summary("in-process", local)
        grpc_ttfa, grpc_fps = summary("triton-grpc", served)
        print(f"serving overhead: TTFA x{grpc_ttfa / local_ttfa:.2f}, throughput x{grpc_fps / local_fps:.2f}")


if __name__ == "__main__":
    main()
