"""Model config parameters (`parameters: { key: ..., value: { string_value: ... } }` in config.pbtxt).

Every parameter a model reads goes through here, typed and range-checked at load time: a bad value stops the model
from loading with a message that names the parameter and its allowed range (`ConfigError`), instead of surfacing
later as an unnamed `ValueError` or a misbehaving server.
"""

from __future__ import annotations

import math
import os

from csm_tts.parsing import parse_bool


class ConfigError(ValueError):
    """A config parameter has a value outside its allowed range; the message names both."""


def config_parameter(model_config: dict, key: str, env: str | None = None, default: str | None = None) -> str | None:
    """A config parameter as a string. Missing, empty or unfilled `${...}` values count as unset; then the
    environment variable `env` (if set and not blank), then `default`. Surrounding whitespace is ignored."""
    value = model_config.get("parameters", {}).get(key, {}).get("string_value", "").strip()
    if value and not value.startswith("${"):
        return value
    if env and os.environ.get(env, "").strip():
        return os.environ[env].strip()
    return default


def _source(key: str, env: str | None) -> str:
    return f"parameter {key!r}" + (f" (or {env})" if env else "")


def _range(low, high) -> str:
    return f"from {low} to {high}" if high is not None else f">= {low}"


def int_parameter(
    model_config: dict, key: str, default: int, low: int, high: int | None = None, env: str | None = None
) -> int:
    """An integer parameter in [low, high] (high None: no upper bound)."""
    raw = config_parameter(model_config, key, env=env)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{_source(key, env)} must be an integer {_range(low, high)}, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        raise ConfigError(f"{_source(key, env)} must be an integer {_range(low, high)}, got {value}")
    return value


def float_parameter(
    model_config: dict, key: str, default: float, low: float, high: float, env: str | None = None
) -> float:
    """A finite number in [low, high]."""
    raw = config_parameter(model_config, key, env=env)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # also NaN and unparsable text
        raise ConfigError(f"{_source(key, env)} must be a number from {low:g} to {high:g}, got {raw!r}")
    return value


def bool_parameter(model_config: dict, key: str, default: bool, env: str | None = None) -> bool:
    raw = config_parameter(model_config, key, env=env)
    if raw is None:
        return default
    try:
        return parse_bool(raw, key)
    except ValueError:
        raise ConfigError(f"{_source(key, env)} must be true or false, got {raw!r}") from None
