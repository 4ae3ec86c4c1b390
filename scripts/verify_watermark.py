"""Is a silentcipher watermark with this key in this audio file?

    python scripts/verify_watermark.py FILE.wav --key 212,211,146,56,201 [--model-dir DIR]

Decodes sliding windows of about 3 s (whole message periods, on the encoder's STFT frame grid: the file must start
where the service's stream started) and reports the key found if any window decodes to exactly the given key.
Exit status: 0 found, 1 not found, 2 usage error, unreadable file or missing weights.

Only the real weights (sony/silentcipher, `CSM_WATERMARK_MODEL_DIR` or --model-dir) can detect anything: with the
random test weights the script runs but finds nothing. Detection costs about 1.5 s of CPU per second of window.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FOUND, NOT_FOUND, USAGE = 0, 1, 2


def parse_arguments(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path, help="audio file (WAV/FLAC/OGG; any rate, mixed to mono)")
    parser.add_argument("--key", required=True, help="5 comma-separated integers 0-255")
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="silentcipher weights (default: $CSM_WATERMARK_MODEL_DIR)"
    )
    parser.add_argument("--window-s", type=float, default=3.0, help="window length, rounded to message periods")
    parser.add_argument("--step-s", type=float, default=1.0, help="window step, rounded to STFT hops")
    parser.add_argument(
        "--offsets",
        type=int,
        default=1,
        help="also try this many sub-hop alignments (for files not cut on the frame grid; slow)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    from csm_tts.watermark.options import InvalidWatermarkOption, parse_key

    try:
        key = parse_key(args.key, name="--key")
    except InvalidWatermarkOption as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE
    model_dir = args.model_dir or (
        Path(os.environ["CSM_WATERMARK_MODEL_DIR"]) if os.environ.get("CSM_WATERMARK_MODEL_DIR") else None
    )
    if model_dir is None:
        print(
            "error: no weights: pass --model-dir or set CSM_WATERMARK_MODEL_DIR to the real silentcipher weights",
            file=sys.stderr,
        )
        return USAGE
    if args.window_s <= 0 or args.step_s <= 0 or args.offsets < 1:
        print("error: --window-s and --step-s must be positive, --offsets at least 1", file=sys.stderr)
        return USAGE

    import soundfile as sf
    import soxr

    from csm_tts.watermark.detection import decode
    from csm_tts.watermark.dsp import RESAMPLER_QUALITY
    from csm_tts.watermark.weights import load_watermark_model

    try:
        model = load_watermark_model(model_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE
    try:
        audio, rate = sf.read(str(args.file), dtype="float32", always_2d=True)
    except (OSError, RuntimeError) as e:  # soundfile raises LibsndfileError (a RuntimeError) on bad files
        print(f"error: cannot read {args.file}: {e}", file=sys.stderr)
        return USAGE
    if "Random weights" in (model.model_dir / "hparams.yaml").read_text():
        print("warning: these are random test weights: nothing can be detected with them", file=sys.stderr)

    x = audio.mean(axis=1)
    x = soxr.resample(x, rate, model.sample_rate, RESAMPLER_QUALITY) if rate != model.sample_rate else x
    hop, period = model.hop, model.config.message_len * model.hop
    window = max(1, round(args.window_s * model.sample_rate / period)) * period
    step = max(1, round(args.step_s * model.sample_rate / hop)) * hop
    if x.size < period:
        print(
            f"NOT FOUND: {args.file} is too short ({x.size / model.sample_rate:.2f} s; a message period is "
            f"{period / model.sample_rate:.2f} s)"
        )
        return NOT_FOUND
    window = min(window, x.size // period * period)
    print(
        f"{args.file}: {x.size / model.sample_rate:.2f} s, windows of {window / model.sample_rate:.2f} s "
        f"every {step / model.sample_rate:.2f} s"
    )
    hits, total, first = 0, 0, None
    for offset in (round(i * hop / args.offsets) for i in range(args.offsets)):
        for start in range(offset, x.size - window + 1, step):
            detection = decode(model, x[start : start + window], model.sample_rate)
            total += 1
            match = detection.key == key
            hits += match
            if match and first is None:
                first = start
            found = ",".join(map(str, detection.key)) if detection.key else "no message"
            print(
                f"  {start / model.sample_rate:7.2f} s: {found} (confidence {detection.confidence:.2f})"
                f"{'  <- match' if match else ''}"
            )
    if hits:
        print(f"FOUND: key {args.key} in {hits} of {total} windows (first at {first / model.sample_rate:.2f} s)")
        return FOUND
    print(f"NOT FOUND: key {args.key} in none of {total} windows")
    return NOT_FOUND


if __name__ == "__main__":
    sys.exit(main())
