"""What one API request carries through the layers that serve it: its id, its route, its API key.

The observe middleware (proxy/middleware.py) creates a `RequestScope` for each request and puts it on the request
(`request[SCOPE]`), which the endpoints pass on explicitly (admission, the Triton request ids); it is also kept in a
context variable for one reader only, the log formatter (proxy/logs.py), so every log line carries the request id.
Plain Python: no aiohttp.
"""

from __future__ import annotations

import contextvars
import itertools
import re
import secrets
from dataclasses import dataclass, field

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def new_request_id() -> str:
    return secrets.token_hex(12)


def accept_request_id(raw: str | None) -> str:
    """The client's X-Request-ID when it is 1-128 characters of [A-Za-z0-9._:-] (safe in a log line and as a Triton
    request id); otherwise a new one. A malformed id is replaced rather than refused: ids are for tracing, and
    refusing requests over them would make tracing an outage source."""
    raw = (raw or "").strip()
    return raw if _REQUEST_ID.fullmatch(raw) else new_request_id()


@dataclass
class RequestScope:
    request_id: str
    endpoint: str  # the route ("/generate"), never the raw path: it is a metrics label
    key: object | None = None  # the caller's ApiKey (proxy/auth.py) when keys are configured
    response: object | None = None  # the response once its headers went out (a WebSocket's 101 included)
    audio_seconds: float = 0.0  # audio sent to Triton's client by this request's streams (the access log)
    _streams: itertools.count = field(default_factory=itertools.count, repr=False)

    def next_triton_request_id(self) -> str:
        """The Triton request id of the next stream: the request id itself for the first one (a REST request's
        Triton log lines carry exactly its X-Request-ID), then `<id>.1`, `<id>.2`, ... (WebSocket chunks,
        /stream/chunks lines, retries with a shorter context)."""
        n = next(self._streams)
        return self.request_id if n == 0 else f"{self.request_id}.{n}"


# For log lines only (proxy/logs.py); code that needs the scope gets it passed.
_CURRENT: contextvars.ContextVar[RequestScope | None] = contextvars.ContextVar("request_scope", default=None)


def current_scope() -> RequestScope | None:
    return _CURRENT.get()


def enter_scope(scope: RequestScope) -> contextvars.Token:
    return _CURRENT.set(scope)


def leave_scope(token: contextvars.Token) -> None:
    _CURRENT.reset(token)
