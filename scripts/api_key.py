"""Make an API key for the proxy and add its hash to a keys file (PROXY_API_KEYS_FILE, proxy/auth.py).

    python scripts/api_key.py web-app --max-streams 4 --requests-per-minute 120 --file keys.json

The key is printed once, on stdout; the file only ever holds its SHA-256. Hand the key to its user; to revoke it,
delete its entry and restart (or roll out) the proxies. In Kubernetes, store the file as the Secret the proxy mounts:
`kubectl -n csm-tts create secret generic csm-tts-api-keys --from-file=keys.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.auth import KeyFileError, generate_key, hash_key, parse_keys  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="who the key is for (A-Z a-z 0-9 . _ -, shown in logs and metrics)")
    parser.add_argument("--file", type=Path, default=Path("keys.json"), help="keys file to add to (created if absent)")
    parser.add_argument("--max-streams", type=int, help="streams open at once")
    parser.add_argument("--requests-per-minute", type=int, help="streams started in any 60 s")
    parser.add_argument("--allow-watermark-off", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--allow-custom-watermark-key", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args(argv)

    try:
        data = json.loads(args.file.read_text()) if args.file.exists() else {"keys": []}
        parse_keys(data, str(args.file))
    except (KeyFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    key = generate_key()
    entry = {"name": args.name, "sha256": hash_key(key)}
    for field in ("max_streams", "requests_per_minute", "allow_watermark_off", "allow_custom_watermark_key"):
        if getattr(args, field) is not None:
            entry[field] = getattr(args, field)
    data["keys"].append(entry)
    try:
        parse_keys(data, str(args.file))  # the new entry is valid and its name is unique
    except KeyFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Written next to the target, then renamed: a proxy reading the file never sees half of it.
    with tempfile.NamedTemporaryFile("w", dir=args.file.parent or ".", delete=False, suffix=".tmp") as tmp:
        json.dump(data, tmp, indent=2)
        tmp.write("\n")
    os.chmod(tmp.name, 0o644)  # hashes only; the proxy runs as another user (UID 10001) and must read it
    os.replace(tmp.name, args.file)
    print(key)
    print(
        f"added {args.name!r} to {args.file} (only its hash is stored; this is the one time the key is shown)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
