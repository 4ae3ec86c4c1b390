"""A client's own voice to clone: the request fields `reference_audio` (base64 of an audio file, never a URL) and
`reference_text`, checked and base64-decoded (cheap, bounded by the body size); the audio itself is decoded only
after admission (proxy/voices.py `decode_reference`)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass

from csm_tts import limits
from proxy.parse.job import ReferenceClip
from proxy.voices import InvalidReference

REFERENCE_FIELDS = ("reference_audio", "reference_text")


@dataclass(frozen=True)
class ReferenceLimits:
    max_bytes: int = limits.REFERENCE_MAX_BYTES  # decoded from base64; its length is checked once decoded (voices.py)

    @classmethod
    def from_settings(cls, settings) -> ReferenceLimits:
        return cls(max_bytes=settings.reference_max_bytes)


def parse_reference(data: Mapping, bounds: ReferenceLimits) -> ReferenceClip | None:
    """The request fields `reference_audio` (base64 of an audio file, never a URL) and `reference_text` -> the
    undecoded file and the transcript, or None when neither is present."""
    audio, text = data.get("reference_audio"), data.get("reference_text")
    if audio is None and text is None:
        return None
    if audio is None:
        raise InvalidReference("reference_text needs reference_audio (the clip it transcribes)")
    if text is None:
        raise InvalidReference("reference_audio needs reference_text (what is said in it)", "reference_text")
    if not isinstance(audio, str):
        raise InvalidReference(f"reference_audio must be a base64 string, got {type(audio).__name__}")
    if not isinstance(text, str) or not text.strip():
        raise InvalidReference("reference_text must be a non-empty string", "reference_text")
    if len(text) > limits.MAX_REFERENCE_TEXT_CHARS:
        raise InvalidReference(
            f"reference_text has {len(text)} characters; the limit is {limits.MAX_REFERENCE_TEXT_CHARS}",
            "reference_text",
        )
    if audio.lstrip().lower().startswith(("http://", "https://", "ftp://", "file:", "data:")):
        raise InvalidReference("reference_audio must be the audio file itself, base64-encoded; URLs are not fetched")
    if len(audio) * 3 // 4 > bounds.max_bytes + 3:  # refused before decoding anything
        raise InvalidReference(_too_large(len(audio) * 3 // 4, bounds), status=413)
    try:
        raw = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidReference("reference_audio is not valid base64") from None
    if len(raw) > bounds.max_bytes:
        raise InvalidReference(_too_large(len(raw), bounds), status=413)
    if not raw:
        raise InvalidReference("reference_audio is empty")
    return ReferenceClip(raw, text)


def _too_large(size: int, bounds: ReferenceLimits) -> str:
    return f"reference_audio has {size} bytes; the limit is {bounds.max_bytes} (PROXY_REFERENCE_MAX_BYTES)"
