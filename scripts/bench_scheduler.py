"""How much of the frame loop's time is the batched frame step: the scheduler before and after its output stage split.

    python scripts/bench_scheduler.py --streams 1,4,8 --frames 50 --rounds 2
    python scripts/bench_scheduler.py --before 45dafa1   # the scheduler of that commit as "before"

In process, no Triton: N streams of fixed length (seeded, ignore_eos) run through `StreamScheduler` on the tiny
checkpoint; an observer adds up the frame steps. Before the split the stepping thread also decoded, sent and
polled cancellation every frame; after it, it only steps. Per variant and stream count: the stepping thread's share
of wall time outside the frame step (wall - sum of steps) / wall, frames per second, and audio seconds per second.
Variants alternate within each round (the machine is shared and noisy): compare ratios within one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from csm_tts import FRAME_MS  # noqa: E402
from csm_tts.speech.engine import CsmEngine  # noqa: E402
from csm_tts.speech.request import GenerationRequest  # noqa: E402


class Sink:
    def __init__(self, done: threading.Event, remaining: list[int]):
        self.done, self.remaining, self.samples = done, remaining, 0

    def send_chunk(self, stream, chunk):
        self.samples += chunk.audio.size
        if chunk.is_last:
            self._end()

    def send_error(self, message, code):
        print(f"  error: {code} {message}", file=sys.stderr)
        self._end()

    def _end(self):
        self.remaining[0] -= 1
        if self.remaining[0] == 0:
            self.done.set()

    def is_cancelled(self):
        return False


class Steps:
    def __init__(self):
        self.seconds, self.frames = 0.0, 0

    def occupancy(self, *args):
        pass

    def frame_step(self, seconds, streams):
        self.seconds += seconds
        self.frames += streams

    def __getattr__(self, name):  # the other stages' reports (after the split only)
        return lambda *args: None


def scheduler_module(commit: str | None):
    """The current scheduler, or the one of `commit` loaded as a module beside today's engine."""
    if commit is None:
        from csm_tts.speech import scheduler

        return scheduler
    source = subprocess.run(
        ["git", "show", f"{commit}:csm_tts/speech/scheduler.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "scheduler_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("scheduler_before", path)
    module = sys.modules["scheduler_before"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


def run(module, engine: CsmEngine, streams: int, frames: int) -> dict:
    steps, done, remaining = Steps(), threading.Event(), [streams]
    scheduler = module.StreamScheduler(engine, max_active=streams, max_queued=streams, logger=lambda m: None)
    scheduler.observer = steps
    sinks = [Sink(done, remaining) for _ in range(streams)]
    started = time.perf_counter()
    for i, sink in enumerate(sinks):
        text = f"Stream {i} of the benchmark."
        request = GenerationRequest(text, seed=i, ignore_eos=True, max_audio_length_ms=frames * FRAME_MS)
        scheduler.submit(request, sink)
    if not done.wait(600):
        raise RuntimeError("streams did not finish within 600 s")
    wall = time.perf_counter() - started
    scheduler.close()
    return {
        "outside_step": (wall - steps.seconds) / wall,
        "frames_per_s": steps.frames / wall,
        "audio_s_per_s": sum(s.samples for s in sinks) / 24000 / wall,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,4,8")
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", default="45dafa1", help="commit whose scheduler is 'before' (default 45dafa1)")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "checkpoints" / "csm-tiny")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = CsmEngine.from_dir(args.model_dir, max_streams=max(int(n) for n in args.streams.split(",")))
    variants = {"before": scheduler_module(args.before), "after": scheduler_module(None)}
    run(variants["after"], engine, 1, 4)  # warm-up
    results: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.rounds):
        for streams in (int(n) for n in args.streams.split(",")):
            for name, module in variants.items():
                results.setdefault((name, streams), []).append(run(module, engine, streams, args.frames))
    print(f"{'variant':8} {'streams':>7} {'outside step':>13} {'frames/s':>9} {'audio s/s':>10}")
    for (name, streams), rows in results.items():
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        print(
            f"{name:8} {streams:7d} {mean['outside_step']:13.1%} {mean['frames_per_s']:9.1f} "
            f"{mean['audio_s_per_s']:10.2f}"
        )


if __name__ == "__main__":
    main()
