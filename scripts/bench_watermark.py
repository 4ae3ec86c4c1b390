"""The watermarker's batched pass vs one stream at a time, and where its first message's hold-back comes from.

    python scripts/bench_watermark.py --streams 8 --seconds 4
    python scripts/bench_watermark.py --device cuda --streams 1,8,32,64

Real-size silentcipher networks with random weights (written to a temporary folder): speed and lengths are those of
the real model, detection is not. Each stream gets speech-like noise in csm_1b's default chunk schedule (2, 4, 8, 10,
10, ... frames of 80 ms). Per stream count, in one run and interleaved (the machine is noisy: read the ratios):

- per stream: each stream's chunk watermarked alone, in turn, all its layers at once (the watermarker before
  issue 20);
- batched: one pass per round of chunks, every stream's chunk in it (`watermark_together`), with the convolution
  packing of each --pack value (0: all streams' frames in one call per layer; 1: one call per stream and layer).

--rounds R repeats the comparison, every other round in reverse order.

It checks that every variant's output equals the per-stream output (max abs difference printed) and prints audio
seconds watermarked per wall second. Then, for first chunks of 1-5 frames: the first push's output and the hold-back
split into the 24 -> 44.1 kHz resampler's delay, the STFT (a sample is final once the frame after it is complete) and
the 44.1 -> 24 kHz resampler's delay, all in 24 kHz samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from csm_tts import SAMPLE_RATE, SAMPLES_PER_FRAME  # noqa: E402
from csm_tts.speech.chunk_schedule import ChunkSchedule  # noqa: E402
from csm_tts.watermark.options import PUBLIC_KEY  # noqa: E402
from csm_tts.watermark.streaming import StreamingWatermarker, watermark_together  # noqa: E402
from csm_tts.watermark.weights import load_watermark_model, write_random_checkpoint  # noqa: E402

FRAME = SAMPLES_PER_FRAME


def chunks_of(audio: np.ndarray, schedule: ChunkSchedule) -> list[np.ndarray]:
    out, start, index = [], 0, 0
    while start < audio.size:
        size = schedule.frames_in_chunk(index) * FRAME
        out.append(audio[start : start + size])
        start += size
        index += 1
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_stream(model, streams: list[list[np.ndarray]], device) -> tuple[float, list[np.ndarray]]:
    marks = [StreamingWatermarker(model, PUBLIC_KEY) for _ in streams]
    outs: list[list[np.ndarray]] = [[] for _ in streams]
    started = time.perf_counter()
    for k in range(max(len(s) for s in streams)):
        for mark, chunks, out in zip(marks, streams, outs, strict=True):
            if k < len(chunks):
                out.append(mark.push(chunks[k]))
    for mark, out in zip(marks, outs, strict=True):
        out.append(mark.flush())
    sync(device)
    return time.perf_counter() - started, [np.concatenate(o) for o in outs]


def batched(model, streams: list[list[np.ndarray]], device, pack: int | None) -> tuple[float, list[np.ndarray]]:
    marks = [StreamingWatermarker(model, PUBLIC_KEY) for _ in streams]
    outs: list[list[np.ndarray]] = [[] for _ in streams]
    started = time.perf_counter()
    for k in range(max(len(s) for s in streams)):
        live = [i for i, chunks in enumerate(streams) if k < len(chunks)]
        for i, audio in zip(live, watermark_together([(marks[i], streams[i][k]) for i in live], pack), strict=True):
            outs[i].append(audio)
    for out, audio in zip(outs, watermark_together([(m, None) for m in marks], pack), strict=True):
        out.append(audio)
    sync(device)
    return time.perf_counter() - started, [np.concatenate(o) for o in outs]


def hold_back(model, audio: np.ndarray, first_frames: int) -> dict:
    """The first push of `first_frames` frames: its output and where the rest is held (24 kHz samples)."""
    mark = StreamingWatermarker(model, PUBLIC_KEY)
    n = first_frames * FRAME
    out = mark.push(audio[:n]).size
    ratio = model.sample_rate / SAMPLE_RATE
    analysed = mark._x_total  # model-rate samples out of the up-resampler
    final = max((mark._synthesised - 1) * model.hop, 0)  # model-rate samples whose watermark is complete
    return {
        "first_chunk_frames": first_frames,
        "input": n,
        "first_message": out,
        "up_resampler": round(n - analysed / ratio),
        "stft": round((analysed - final) / ratio),
        "down_resampler": round(final / ratio) - out,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="8", help="comma-separated stream counts (default 8)")
    parser.add_argument("--seconds", type=float, default=4.0, help="audio per stream (default 4)")
    parser.add_argument("--pack", default="8,0", help="convolution packing limits of the batched runs (0: all)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, every other one in reverse order (default 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (default 1, as served)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-watermark-") as tmp:
        model = load_watermark_model(write_random_checkpoint(tmp), device=str(device))
    rng = np.random.default_rng(0)
    schedule = ChunkSchedule()
    packs = [int(p) or None for p in args.pack.split(",")]
    result = {"device": str(device), "threads": torch.get_num_threads(), "seconds": args.seconds, "rows": []}
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.seconds:g} s per stream")
    for count in [int(c) for c in args.streams.split(",")]:
        audio = [(rng.standard_normal(int(args.seconds * SAMPLE_RATE)) * 0.1).astype(np.float32) for _ in range(count)]
        streams = [chunks_of(a, schedule) for a in audio]
        batched(model, [s[:1] for s in streams], device, packs[0])  # warm-up
        _, reference = per_stream(model, streams, device)
        variants = ["per stream", *packs]
        for round_ in range(args.rounds):  # every other round in reverse order: load drifts on a shared machine
            walls = {}
            for variant in variants if round_ % 2 == 0 else variants[::-1]:
                if variant == "per stream":
                    walls[variant], outs = per_stream(model, streams, device)
                else:
                    walls[variant], outs = batched(model, streams, device, variant)
                walls[variant, "diff"] = max(float(np.abs(a - b).max()) for a, b in zip(outs, reference, strict=True))
            alone_s = walls["per stream"]
            row = {"streams": count, "round": round_, "per_stream_audio_s_per_s": count * args.seconds / alone_s}
            line = f"{count:>3} streams, round {round_}: per stream {row['per_stream_audio_s_per_s']:.2f} audio s/s"
            for pack in packs:
                wall, diff = walls[pack], walls[pack, "diff"]
                row[f"batched_pack_{pack or 'all'}"] = {
                    "audio_s_per_s": count * args.seconds / wall,
                    "ratio": alone_s / wall,
                    "max_abs_diff": diff,
                }
                line += f"; batched (pack {pack or 'all'}) {count * args.seconds / wall:.2f} x{alone_s / wall:.2f}"
                line += f" (max diff {diff:.1e})"
            print(line)
            result["rows"].append(row)
    probe = (rng.standard_normal(6 * FRAME) * 0.1).astype(np.float32)
    result["first_message"] = [hold_back(model, probe, frames) for frames in range(1, 6)]
    print("first chunk -> first message (24 kHz samples; held back in: up-resampler / STFT / down-resampler)")
    for r in result["first_message"]:
        print(
            f"  {r['first_chunk_frames']} frames ({r['input']}): {r['first_message']} "
            f"({1000 * r['first_message'] / SAMPLE_RATE:.0f} ms); held {r['up_resampler']} / {r['stft']} / "
            f"{r['down_resampler']}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
