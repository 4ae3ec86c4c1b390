"""Model config parameters (`parameters: { key: ..., value: { string_value: ... } }` in config.pbtxt)."""

from __future__ import annotations

import os


def config_parameter(model_config: dict, key: str, env: str | None = None, default: str | None = None) -> str | None:
    """A config parameter as a string. Missing, empty or unfilled `${...}` values count as unset; then the
    environment variable `env` (if set and not blank), then `default`. Surrounding whitespace is ignored."""
    value = model_config.get("parameters", {}).get(key, {}).get("string_value", "").strip()
    if value and not value.startswith("${"):
        return value
    if env and os.environ.get(env, "").strip():
        return os.environ[env].strip()
    return default
