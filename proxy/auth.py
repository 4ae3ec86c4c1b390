"""API keys: loaded from a file of hashes (PROXY_API_KEYS_FILE), each with a name, limits and a watermark policy.

The file never holds a key, only its SHA-256, so a leaked file (or a Kubernetes Secret read by the wrong pod) gives
nobody access. A plain SHA-256 is enough here, unlike for passwords: keys are 32 random bytes (`generate_key`), so
there is nothing to guess from a hash. `scripts/api_key.py` makes a key and its entry.

```json
{"keys": [
  {"name": "web-app", "sha256": "<64 hex digits>", "max_streams": 4, "requests_per_minute": 120,
   "allow_watermark_off": false, "allow_custom_watermark_key": false}
]}
```

`max_streams` (Triton streams open at once) and `requests_per_minute` (streams started in any 60 s; one text is one
stream) are optional; so are the two watermark fields (absent: the server's CSM_WATERMARK_ALLOW_* apply) and
`operator` (true: the key may read `/health`'s details and `/metrics`).

Clients send `Authorization: Bearer <key>`. Browsers cannot set headers on a WebSocket, so `WS /stream` also takes
the key as a subprotocol: the client offers `["csm-tts", "bearer.<key>"]` and the server selects `csm-tts`. Keys are
`sk-` + URL-safe base64, valid in both places. Keys are never logged, echoed or used as metric labels.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from csm_tts.parsing import shown

KEY_PREFIX = "sk-"
WS_PROTOCOL = "csm-tts"
WS_BEARER_PREFIX = "bearer."
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_FIELDS = {
    "name",
    "sha256",
    "max_streams",
    "requests_per_minute",
    "allow_watermark_off",
    "allow_custom_watermark_key",
    "operator",
}
WINDOW_S = 60.0


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyFileError(ValueError):
    """The keys file is unreadable or malformed; the message says where (never a key: the file holds none)."""


class LimitReached(Exception):
    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass
class ApiKey:
    name: str
    sha256: str
    max_streams: int | None = None
    requests_per_minute: int | None = None
    allow_watermark_off: bool | None = None  # None: the server's policy
    allow_custom_watermark_key: bool | None = None
    operator: bool = False  # may read /health's details and /metrics
    open_streams: int = 0
    _started: collections.deque = field(default_factory=collections.deque, repr=False)

    def check_room(self, now: float | None = None) -> None:
        """Raise LimitReached when a new stream would exceed a limit (takes nothing)."""
        now = time.monotonic() if now is None else now
        while self._started and now - self._started[0] >= WINDOW_S:
            self._started.popleft()
        if self.max_streams is not None and self.open_streams >= self.max_streams:
            raise LimitReached(
                f"API key {self.name!r} has {self.open_streams} streams open (limit {self.max_streams}); "
                "retry when one ends",
                1,
            )
        if self.requests_per_minute is not None and len(self._started) >= self.requests_per_minute:
            wait = max(1, math.ceil(WINDOW_S - (now - self._started[0])))
            raise LimitReached(
                f"API key {self.name!r} started {len(self._started)} streams in the last minute "
                f"(limit {self.requests_per_minute}); retry in {wait} s",
                wait,
            )

    def take_stream(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.check_room(now)
        self.open_streams += 1
        self._started.append(now)

    def release_stream(self) -> None:
        self.open_streams = max(0, self.open_streams - 1)


class ApiKeys:
    def __init__(self, keys: list[ApiKey]):
        self.by_hash = {k.sha256: k for k in keys}

    def __len__(self) -> int:
        return len(self.by_hash)

    def authenticate(self, token: str | None) -> ApiKey | None:
        if not token:
            return None
        return self.by_hash.get(hash_key(token))

    @classmethod
    def load(cls, path: str | Path) -> ApiKeys:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise KeyFileError(f"{path}: cannot read it ({e.strerror or e})") from None
        except ValueError as e:
            raise KeyFileError(f"{path}: not valid JSON ({e})") from None
        return cls(parse_keys(data, str(path)))


def parse_keys(data: object, where: str = "keys file") -> list[ApiKey]:
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or set(data) != {"keys"}:
        raise KeyFileError(f'{where}: expected {{"keys": [...]}}')
    keys: list[ApiKey] = []
    for i, entry in enumerate(data["keys"]):
        at = f"{where}: keys[{i}]"
        if not isinstance(entry, dict):
            raise KeyFileError(f"{at}: must be an object")
        if unknown := set(entry) - _FIELDS:
            raise KeyFileError(f"{at}: unknown field(s) {', '.join(sorted(unknown))}")
        name, digest = entry.get("name"), entry.get("sha256")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise KeyFileError(f"{at}: name must be 1-64 characters of A-Z a-z 0-9 . _ -, got {shown(name)}")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise KeyFileError(f"{at} ({name}): sha256 must be 64 lower-case hex digits (scripts/api_key.py)")
        limits = {}
        for limit in ("max_streams", "requests_per_minute"):
            value = entry.get(limit)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise KeyFileError(f"{at} ({name}): {limit} must be a positive integer, got {shown(value)}")
            limits[limit] = value
        flags = {}
        for flag in ("allow_watermark_off", "allow_custom_watermark_key", "operator"):
            value = entry.get(flag)
            if value is not None and not isinstance(value, bool):
                raise KeyFileError(f"{at} ({name}): {flag} must be true or false, got {shown(value)}")
            flags[flag] = value
        if any(k.name == name for k in keys) or any(k.sha256 == digest for k in keys):
            raise KeyFileError(f"{at} ({name}): the name or the key is listed twice")
        flags["operator"] = bool(flags["operator"])
        keys.append(ApiKey(name=name, sha256=digest, **limits, **flags))
    return keys


def presented_key(headers, websocket: bool) -> str | None:
    """The key a request presents: `Authorization: Bearer <key>`, ElevenLabs' `xi-api-key` header, or (WebSocket
    upgrades) a `bearer.<key>` subprotocol."""
    scheme, _, value = headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if headers.get("xi-api-key", "").strip():
        return headers["xi-api-key"].strip()
    if websocket:
        for protocol in headers.get("Sec-WebSocket-Protocol", "").split(","):
            protocol = protocol.strip()
            if protocol.startswith(WS_BEARER_PREFIX) and len(protocol) > len(WS_BEARER_PREFIX):
                return protocol[len(WS_BEARER_PREFIX) :]
    return None
