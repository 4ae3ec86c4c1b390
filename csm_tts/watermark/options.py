"""Watermark settings (server, from the environment) and per-request options. Standard library only.

The server key is `CSM_WATERMARK_KEY` (5 integers 0-255, comma-separated); unset or empty means Sesame's public
key, which is documented as not secret. `CSM_WATERMARK_ENABLED` (default true) is the default state. A request may
send `watermark` (true/false) and its own `watermark_key`. Keys never appear in logs, errors or responses: only
`key_id(key)`, which is "public" for the public key and a short hash otherwise.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from csm_tts.parsing import parse_bool

PUBLIC_KEY: tuple[int, ...] = (212, 211, 146, 56, 201)
KEY_LENGTH = 5
KEY_FORMAT = f"exactly {KEY_LENGTH} integers from 0 to 255 (a list, or comma-separated)"
_BYTE = re.compile(r"[0-9]{1,3}")


class InvalidWatermarkOption(ValueError):
    """A bad watermark option; the message is user-facing and never contains a private key."""


def parse_key(value: object, name: str = "watermark_key") -> tuple[int, ...]:
    """A key from "a,b,c,d,e" or a list/tuple of ints: exactly 5 integers 0-255. The error never echoes the value."""
    expected = f"{name} must be {KEY_FORMAT}"
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if not all(_BYTE.fullmatch(p) for p in parts):
            raise InvalidWatermarkOption(expected)
        numbers = [int(p) for p in parts]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        numbers = list(value)
    else:
        raise InvalidWatermarkOption(expected)
    if len(numbers) != KEY_LENGTH or not all(0 <= n <= 255 for n in numbers):
        raise InvalidWatermarkOption(expected)
    return tuple(numbers)


def key_id(key: tuple[int, ...]) -> str:
    """A name for a key that is safe to log and return: "public", or "k-" and 8 hex digits of its SHA-256."""
    if tuple(key) == PUBLIC_KEY:
        return "public"
    return "k-" + hashlib.sha256(bytes(key)).hexdigest()[:8]


def parse_flag(value: object, name: str) -> bool:
    """`csm_tts.parsing.parse_bool`, failing with InvalidWatermarkOption."""
    try:
        return parse_bool(value, name)
    except ValueError as e:
        raise InvalidWatermarkOption(str(e)) from None


@dataclass(frozen=True)
class WatermarkSettings:
    """The server's watermark defaults, read once at start-up."""

    enabled: bool
    key: tuple[int, ...]
    key_is_public: bool

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> WatermarkSettings:
        """Raises ValueError with a clear message (never the key itself) on an invalid setting."""
        raw_enabled = env.get("CSM_WATERMARK_ENABLED", "").strip()
        raw_key = env.get("CSM_WATERMARK_KEY", "").strip()
        try:
            enabled = parse_flag(raw_enabled, "CSM_WATERMARK_ENABLED") if raw_enabled else True
            key = parse_key(raw_key, name="CSM_WATERMARK_KEY") if raw_key else PUBLIC_KEY
        except InvalidWatermarkOption as e:
            raise ValueError(f"invalid server watermark setting: {e}") from None
        return cls(enabled=enabled, key=key, key_is_public=key == PUBLIC_KEY)


@dataclass(frozen=True)
class WatermarkChoice:
    """What one request gets: whether to watermark, with which key, and the key's loggable id."""

    enabled: bool
    key: tuple[int, ...] | None
    key_id: str


def resolve(parameters: Mapping[str, object], settings: WatermarkSettings) -> WatermarkChoice:
    """What to do for one request, from its `watermark` / `watermark_key` parameters and the server settings.

    Every option present is validated, even one that ends up unused (a bad key with watermark=false is an error).
    A request's `watermark_key` does not switch watermarking on by itself; `watermark` (or the server default) does.
    """
    enabled = settings.enabled
    if parameters.get("watermark") is not None:
        enabled = parse_flag(parameters["watermark"], "watermark")
    key = settings.key
    raw_key = parameters.get("watermark_key")
    if raw_key is not None and raw_key != "":
        key = parse_key(raw_key)
    if not enabled:
        return WatermarkChoice(enabled=False, key=None, key_id="none")
    return WatermarkChoice(enabled=True, key=key, key_id=key_id(key))
