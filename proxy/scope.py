"""What one API request carries through every layer: its id, its endpoint, its API key and the hooks that count it.

The observe middleware (proxy/metrics.py) creates a `RequestScope` for each request and puts it in a context
variable, so code deep inside a handler -- `Generation` in proxy/synthesis.py, `TritonStream` in
proxy/triton_client.py, the log formatter -- reads it without every endpoint passing it along. Tasks created by a
handler (a WebSocket session's reader and worker) inherit it. Endpoints added later get ids, metrics, key limits and
the watermark policy without code of their own, as long as they generate through `Generation`.

Nothing here imports aiohttp or prometheus_client: the hooks are plain objects given by the app.
"""

from __future__ import annotations

import contextvars
import itertools
import re
import secrets
from dataclasses import dataclass, field
from typing import Protocol

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


class StreamHooks(Protocol):
    """What the app plugs into a scope (proxy/app.py builds it from the metrics, the key limits, the drain state and
    the watermark policy)."""

    def admit(self, scope: RequestScope, options) -> None:
        """Before a Triton stream opens: raise ApiError (403 policy, 429 key limit, 503 draining) to refuse it."""

    def first_audio(self, scope: RequestScope, seconds: float) -> None: ...

    def closed(self, scope: RequestScope, seconds: float, audio_seconds: float, failed: bool) -> None:
        """Every admitted stream ends here exactly once (releases what `admit` took)."""


@dataclass
class RequestScope:
    request_id: str
    endpoint: str  # the route ("/generate"), never the raw path: it is a metrics label
    hooks: StreamHooks | None = None
    key: object | None = None  # the caller's ApiKey (proxy/auth.py) when keys are configured
    _streams: itertools.count = field(default_factory=itertools.count, repr=False)

    def next_triton_request_id(self) -> str:
        """The Triton request id of the next stream: the request id itself for the first one (a REST request's
        Triton log lines carry exactly its X-Request-ID), then `<id>.1`, `<id>.2`, ... (WebSocket chunks,
        /stream/chunks lines, retries with a shorter context)."""
        n = next(self._streams)
        return self.request_id if n == 0 else f"{self.request_id}.{n}"


_CURRENT: contextvars.ContextVar[RequestScope | None] = contextvars.ContextVar("request_scope", default=None)


def current_scope() -> RequestScope | None:
    return _CURRENT.get()


def enter_scope(scope: RequestScope) -> contextvars.Token:
    return _CURRENT.set(scope)


def leave_scope(token: contextvars.Token) -> None:
    _CURRENT.reset(token)
