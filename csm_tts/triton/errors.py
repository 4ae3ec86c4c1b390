"""Errors with their Triton code in the message.

gRPC streams carry only an error's message, not its code, so every error a model sends starts with the code's name
(`INVALID_ARG: text must be a non-empty string`); clients such as the proxy read it back with `split_code`.
Standard library only: the proxy imports this module too.
"""

from __future__ import annotations

import re

# The codes the models send; see the README's csm_1b contract.
CODES = ("INVALID_ARG", "UNAVAILABLE", "INTERNAL", "CANCELLED")
_CODED = re.compile(r"\b(" + "|".join(CODES) + r"): ")


def coded(code: str, message: str) -> str:
    if code not in CODES:
        raise ValueError(f"unknown Triton error code {code!r}")
    return f"{code}: {message}"


def split_code(message: str) -> tuple[str | None, str]:
    """(code, detail) of a message made by `coded`; Triton may put its own words before it (an ensemble names the
    failing step). (None, message) when no code is found."""
    match = _CODED.search(message)
    if match is None:
        return None, message.strip()
    return match.group(1), message[match.end() :].strip()


def error_response(pb_utils, message: str, code: str):
    """An `InferenceResponse` carrying the error (`pb_utils` is `triton_python_backend_utils`)."""
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(coded(code, message), getattr(pb_utils.TritonError, code))
    )
