"""Typed values from their JSON or text spelling: one rule for the whole project.

Environment variables, query strings, Triton request parameters and JSON bodies all spell booleans the same way
here, so the proxy and the models can never disagree about what `"on"` or `"0"` means. Standard library only: the
proxy (no torch) imports it.
"""

from __future__ import annotations

TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off")


def shown(value: object, limit: int = 40) -> str:
    """`repr(value)`, shortened for an error message (a client may send megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_bool(value: object, name: str) -> bool:
    """A JSON bool, 0/1, or a string true/false, 1/0, yes/no, on/off (any case, surrounding blanks ignored).
    Anything else raises ValueError naming `name`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise ValueError(f"{name} must be true or false, got {shown(value)}")
