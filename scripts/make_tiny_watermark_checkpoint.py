"""Write random silentcipher weights in the exact layout of sony/silentcipher's 44.1 kHz model, for tests and the demo.

    python scripts/make_tiny_watermark_checkpoint.py checkpoints/silentcipher-tiny [--seed 0]

Writes hparams.yaml, enc_c.ckpt, dec_c.ckpt, dec_m_0.ckpt (full-size networks, random weights: speed, lengths and
streaming behaviour are meaningful, detection is not), then DIR/.complete last (the Makefile's stamp).
Deterministic for a given seed; takes a few seconds.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from csm_tts.watermark.weights import write_random_checkpoint  # noqa: E402


def make_tiny_watermark_checkpoint(out_dir: Path, seed: int = 0) -> Path:
    """The checkpoint, with its completion stamp written last."""
    out = Path(out_dir)
    (out / ".complete").unlink(missing_ok=True)
    write_random_checkpoint(out, seed=seed)
    (out / ".complete").touch()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = make_tiny_watermark_checkpoint(args.out_dir, seed=args.seed)
    print(f"random silentcipher weights written to {out}")


if __name__ == "__main__":
    main()
