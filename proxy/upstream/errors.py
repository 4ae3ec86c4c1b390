"""What can go wrong upstream, as the API tells it: each Triton failure is one of these, decided by its code.

Plain Python (no gRPC, no aiohttp): the error mapper (proxy/errors.py) and the parse layer may import it.
"""

from __future__ import annotations

from csm_tts.limits import split_reason
from csm_tts.triton.errors import split_code


class UpstreamError(Exception):
    """Triton failed the request; `status` is what the HTTP API answers."""

    status = 502

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UpstreamUnavailable(UpstreamError):
    """No replica can take the stream now (down, not ready, full, or it went away mid-stream): retry later."""

    status = 503


class UpstreamRejected(UpstreamError):
    """Triton said INVALID_ARG: the request itself is wrong (e.g. too long for the model's context window).
    `reason` is the engine's reason code when it gave one (csm_tts/limits.py: CONTEXT_TOO_LONG)."""

    status = 422

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


class UpstreamTimeout(UpstreamError):
    """Triton sent nothing for TRITON_STREAM_IDLE_TIMEOUT_S: a gateway timeout, not the client's fault."""

    status = 504


def classify(message: str) -> UpstreamError:
    """Map a Triton error message to what the client is told, by its code alone. The csm_1b / tts models start
    their messages with the Triton code name ("INVALID_ARG: ..."; csm_tts/triton/errors.py), since gRPC streams carry
    only the message. Words inside a message decide nothing: "not found" in an INTERNAL error is still a 502.
    Triton's own errors (an unknown or unloaded model) have no code; `TritonStream` tells those apart by the
    replica's state, not by their wording."""
    code, detail = split_code(message)
    if code == "INVALID_ARG":
        reason, detail = split_reason(detail)
        return UpstreamRejected(detail, reason)
    if code in ("UNAVAILABLE", "CANCELLED"):  # full, shutting down, or cancelled on the server's side: retry
        return UpstreamUnavailable(f"Triton is busy or unavailable: {detail}")
    return UpstreamError(f"Triton failed the request: {detail}")


def short(text: str, limit: int = 300) -> str:
    """One line of at most `limit` characters, for log lines and error messages."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
