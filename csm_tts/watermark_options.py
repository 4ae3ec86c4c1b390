"""Watermark settings (server, from the environment) and per-request options. Standard library only.

The server key is `CSM_WATERMARK_KEY` (5 integers 0-255, comma-separated); unset means Sesame's public key, which
is documented as not secret. `CSM_WATERMARK_ENABLED` (default true) is the default state. A request may send
`watermark` (true/false) and its own `watermark_key`. Keys never appear in logs or responses: only `key_id`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass

PUBLIC_KEY: tuple[int, ...] = (212, 211, 146, 56, 201)
KEY_LENGTH = 5
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


class InvalidWatermarkOption(ValueError):
    """A bad watermark option; the message is user-facing and never contains a private key."""


def parse_key(value: object) -> tuple[int, ...]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            raise InvalidWatermarkOption("watermark_key must be 5 comma-separated integers from 0 to 255") from None
    elif isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        numbers = list(value)
    else:
        raise InvalidWatermarkOption("watermark_key must be 5 integers from 0 to 255")
    if len(numbers) != KEY_LENGTH or not all(0 <= n <= 255 for n in numbers):
        raise InvalidWatermarkOption(f"watermark_key must be exactly {KEY_LENGTH} integers from 0 to 255")
    return tuple(numbers)


def key_id(key: tuple[int, ...]) -> str:
    """A name for a key that is safe to log and return: "public", or a short hash of a private key."""
    if tuple(key) == PUBLIC_KEY:
        return "public"
    return "k-" + hashlib.sha256(bytes(key)).hexdigest()[:8]


def parse_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise InvalidWatermarkOption(f"{name} must be true or false, got {value!r}")


@dataclass(frozen=True)
class WatermarkSettings:
    enabled: bool
    key: tuple[int, ...]
    key_is_public: bool

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "WatermarkSettings":
        raw_enabled = env.get("CSM_WATERMARK_ENABLED", "").strip()
        raw_key = env.get("CSM_WATERMARK_KEY", "").strip()
        try:
            enabled = parse_bool("CSM_WATERMARK_ENABLED", raw_enabled) if raw_enabled else True
            key = parse_key(raw_key) if raw_key else PUBLIC_KEY
        except InvalidWatermarkOption as e:
            raise ValueError(f"invalid server watermark setting: {e}") from None
        return cls(enabled=enabled, key=key, key_is_public=key == PUBLIC_KEY)


@dataclass(frozen=True)
class WatermarkChoice:
    enabled: bool
    key: tuple[int, ...] | None
    key_id: str


def resolve(parameters: Mapping[str, object], settings: WatermarkSettings) -> WatermarkChoice:
    """What to do for one request, from its `watermark` / `watermark_key` parameters and the server settings."""
    enabled = settings.enabled
    if parameters.get("watermark") is not None:
        enabled = parse_bool("watermark", parameters["watermark"])
    key = settings.key
    if parameters.get("watermark_key") not in (None, ""):
        key = parse_key(parameters["watermark_key"])
    if not enabled:
        return WatermarkChoice(enabled=False, key=None, key_id="none")
    return WatermarkChoice(enabled=True, key=key, key_id=key_id(key))
