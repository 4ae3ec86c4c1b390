"""How much a maximal-context request stalls the streams already running on the same `csm_1b` instance.

A stream plays while a request with the most context the model accepts (120 s of audio in 8 segments) joins, then
while four requests whose context cannot fit arrive. Printed: the running stream's gaps between chunks before and
during each phase (ms), and how long the joining requests took (first audio, or the rejection).

    .venv/bin/python scripts/bench_context_stall.py                      # starts its own Triton (tiny checkpoints)
    .venv/bin/python scripts/bench_context_stall.py --grpc-url 127.0.0.1:8001 --json out.json

Before the prompt was built off the stepping thread and checked cheaply first, the same run on the tiny checkpoint
stretched a running stream's gap from 0.78 s to 6.4 s (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from csm_tts import SAMPLE_RATE  # noqa: E402
from csm_tts.tooling.triton_streams import stream  # noqa: E402

MODEL = "csm_1b"
CONTEXT_S = 120.0  # csm_1b's max_context_audio_s
SEGMENTS = 8


def max_context(seconds: float = CONTEXT_S, segments: int = SEGMENTS) -> list[tuple[int, str, np.ndarray]]:
    rng = np.random.default_rng(0)
    each = int(seconds * SAMPLE_RATE) // segments
    return [
        (i % 2, f"Earlier turn number {i}, spoken a while ago.", (rng.standard_normal(each) * 0.1).astype(np.float32))
        for i in range(segments)
    ]


def gaps_ms(times: list[float], start: float, end: float) -> list[float]:
    """Gaps between consecutive chunks whose later chunk arrived in [start, end]."""
    return [(b - a) * 1000 for a, b in zip(times, times[1:], strict=False) if start <= b <= end]


async def measure_context_stall(url: str) -> dict:
    """Run the two phases against `url` beside one running stream; returns the figures (ms)."""
    loop = asyncio.get_running_loop()
    context = max_context()
    done = asyncio.Event()
    t0 = loop.time()
    running = asyncio.create_task(
        stream(url, MODEL, "A long stream that keeps playing.", {"seed": 1, "max_audio_length_ms": 90_000}, stop=done)
    )
    # Steady state first: the schedule reaches full 10-frame chunks after 3 chunks.
    await asyncio.sleep(3.0)
    phases = {}
    for name, parameters, count in (
        ("maximal context joins", {"seed": 2, "max_audio_length_ms": 400}, 1),
        ("4 contexts that cannot fit", {"seed": 3, "max_audio_length_ms": 90_000}, 4),
    ):
        started = loop.time()
        results = await asyncio.gather(
            *(stream(url, MODEL, "Hello.", parameters, context=context) for _ in range(count))
        )
        ended = loop.time()
        phases[name] = {
            "started": started,
            "ended": ended,
            # First audio, or (rejected: no arrival time) when the whole phase was answered.
            "latency_ms": [(r.arrival_s[0] if r.chunks else ended - started) * 1000 for r in results],
            "errors": [r.error.message()[:160] for r in results if r.error is not None],
        }
        await asyncio.sleep(2.0)  # the running stream's next chunks belong to this phase too
    done.set()
    result = await running
    if result.error is not None:
        raise RuntimeError(f"the running stream failed: {result.error.message()}")
    times = [t0 + s for s in result.arrival_s]
    baseline = gaps_ms(times, t0 + 1.5, min(p["started"] for p in phases.values()))
    report = {
        "running_stream": {
            "chunks": len(times),
            "baseline_gap_ms_p50": statistics.median(baseline),
            "baseline_gap_ms_max": max(baseline),
        },
        "phases": {},
    }
    for name, phase in phases.items():
        during = gaps_ms(times, phase["started"], phase["ended"] + 1.0)  # + the chunk after the phase
        report["phases"][name] = {
            "running_gap_ms_max": max(during),
            "request_latency_ms": [round(v) for v in phase["latency_ms"]],
            "errors": phase["errors"],
        }
    return report


def print_report(report: dict) -> None:
    running = report["running_stream"]
    print(
        f"running stream: {running['chunks']} chunks; gap between chunks before: p50 "
        f"{running['baseline_gap_ms_p50']:.0f} ms, max {running['baseline_gap_ms_max']:.0f} ms"
    )
    for name, phase in report["phases"].items():
        gap = phase["running_gap_ms_max"]
        ratio = gap / running["baseline_gap_ms_p50"] if gap else float("nan")
        print(
            f"{name}: running stream's largest gap {gap:.0f} ms (x{ratio:.2f} its usual gap); the joining requests "
            f"took {phase['request_latency_ms']} ms" + (f"; errors: {phase['errors'][0]}" if phase["errors"] else "")
        )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc-url", help="a running Triton (default: start one with the tiny checkpoints)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    server = None
    url = args.grpc_url
    if url is None:
        from csm_tts.tooling.local_triton import start_local_triton

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        repo = Path(tempfile.mkdtemp(prefix="csm-stall-")) / "model_repository"
        server = start_local_triton(repo, ROOT / "checkpoints" / "csm-tiny", ROOT / "checkpoints" / "silentcipher-tiny")
        url = server.grpc_url
    try:
        report = asyncio.run(measure_context_stall(url))
    finally:
        if server is not None:
            server.stop()
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
