"""Render model_repository/ for a profile: `python scripts/render_model_repository.py --profile gpu --out DIR`.

Used by Dockerfile.triton (gpu) and by the local launcher (cpu). Fails on any `${...}` placeholder left unfilled.
`--set name=value` overrides a value (e.g. a checkpoint path).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from csm_tts.tooling.model_repository import PROFILES, render  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", choices=sorted(PROFILES), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set takes NAME=VALUE, got {item!r}")
        overrides[name] = value
    print(render(args.out, args.profile, overrides))


if __name__ == "__main__":
    main()
