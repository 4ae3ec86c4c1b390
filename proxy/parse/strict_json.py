"""JSON as the API reads it: a key given twice in one object is an error, not "the last one wins" (two parsers in
front of each other, a cache or a WAF and this proxy, could otherwise each see a different request)."""

from __future__ import annotations

import json

from csm_tts.parsing import shown


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {shown(twice)} appears twice in one object")
    return data


def loads(raw: str | bytes) -> object:
    """`json.loads` that refuses duplicate keys (ValueError, like any other invalid JSON)."""
    return json.loads(raw, object_pairs_hook=_unique_keys)
