"""The request id a client gave (the proxy passes its X-Request-ID as the Triton request id), fit for a log line."""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")
MAX_LENGTH = 128


def loggable_request_id(request) -> str:
    """`request.request_id()` with anything but [A-Za-z0-9._:-] replaced, at most 128 characters; "-" when none.
    A direct gRPC client can send any string: this keeps it from forging log lines."""
    raw = request.request_id() or ""
    return _UNSAFE.sub("?", raw[:MAX_LENGTH]) or "-"
