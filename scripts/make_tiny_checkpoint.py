"""Write a tiny random CSM checkpoint (same HF layout as sesame/csm-1b) for tests and the local demo.

    python scripts/make_tiny_checkpoint.py checkpoints/csm-tiny [--seed 0]

Deterministic for a given seed; takes a few seconds. Writes DIR/.complete last (the Makefile's stamp).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from csm_tts.tooling.tiny_checkpoints import make_tiny_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    (args.out_dir / ".complete").unlink(missing_ok=True)  # a failed rewrite must not look finished
    out = make_tiny_checkpoint(args.out_dir, seed=args.seed)
    (out / ".complete").touch()
    print(f"tiny CSM checkpoint written to {out}")


if __name__ == "__main__":
    main()
