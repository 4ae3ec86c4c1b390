"""Mimi decoding of many streams in one batched call vs one stream at a time, on this machine's CPU (or a GPU).

    python scripts/bench_codec.py                                   # tiny checkpoint's Mimi and the real-size Mimi
    python scripts/bench_codec.py --codec real --streams 8 --chunk-frames 2,10 --rounds 7 --threads 2

Both ways use `CodecSlots` (csm_tts/speech/codec_stream.py) with their own slots, alternating round by round
(csm_tts/tooling/codec_timing.py). "real" is transformers' `MimiConfig()` (the real size: SEANet 64 filters,
ratios 8-6-5-4, an 8-layer 512-wide transformer with a 250-step window) with random weights; "tiny" is the codec of
checkpoints/csm-tiny. Prints one line per codec and chunk size, and a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from csm_tts.tooling.codec_timing import time_codec_rounds  # noqa: E402


def load_codec(name: str, device: str):
    if name == "tiny":
        from csm_tts.speech.checkpoint import load_csm

        model, _ = load_csm(ROOT / "checkpoints" / "csm-tiny", device=device)
        return model.codec_model
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(0)
    return MimiModel(MimiConfig()).to(device).eval()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codec", default="tiny,real", help="tiny, real or both (default tiny,real)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--chunk-frames", default="2,10", help="frames each stream brings per round")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median reported), after one warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: steady on a shared machine)"
    )
    args = parser.parse_args(argv)
    args.codec = args.codec.split(",")
    args.chunk_frames = [int(n) for n in args.chunk_frames.split(",")]
    if any(c not in ("tiny", "real") for c in args.codec):
        parser.error("--codec takes tiny and/or real")
    if args.streams < 1 or args.rounds < 1 or min(args.chunk_frames) < 1:
        parser.error("--streams, --rounds and --chunk-frames must be >= 1")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for name in args.codec:
        codec = load_codec(name, args.device)
        for frames in args.chunk_frames:
            result = {"codec": name, **time_codec_rounds(codec, args.streams, frames, args.rounds)}
            results.append(result)
            print(
                f"{name} Mimi, {args.streams} streams x {frames} frames per round: batched {result['batched_ms']:.1f} "
                f"ms, in turn {result['in_turn_ms']:.1f} ms, in turn / batched {result['speedup']:.2f}x, "
                f"{result['audio_s_per_s_batched']:.1f} audio s/s batched, max |batched - in turn| "
                f"{result['max_difference']:.1e}",
                flush=True,
            )
    print(
        f"\n{datetime.date.today()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}, median of {args.rounds} rounds\n"
    )
    print("| Mimi | streams | frames / chunk | batched ms / round | in turn ms / round | in turn / batched |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['codec']} | {r['streams']} | {r['frames']} | {r['batched_ms']:.1f} | {r['in_turn_ms']:.1f} | "
            f"{r['speedup']:.2f}x |"
        )
    return results


if __name__ == "__main__":
    main()
