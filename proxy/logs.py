"""Log lines with the request id (from the request's scope, proxy/scope.py), as text or JSON (PROXY_LOG_FORMAT).

Text: `2026-12-02 10:00:00,000 INFO proxy [3f2a...]: message`. JSON: one object per line with `time`, `level`,
`logger`, `request_id` (when the line belongs to a request), `message` and, for errors, `exception`. aiohttp's access
log lines carry the id through the response header (`X-Request-ID`), see ACCESS_LOG_FORMAT.
"""

from __future__ import annotations

import json
import logging
import re
import sys

from proxy.scope import current_scope

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
# aiohttp's default access log format plus the request id (the response's X-Request-ID header).
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tf "%{User-Agent}i" id=%{X-Request-ID}o'


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            scope = current_scope()
            record.request_id = scope.request_id if scope is not None else "-"
        return True


_KEYS = re.compile(r"\bsk-[A-Za-z0-9_-]{8,}")


class RedactKeys(logging.Filter):
    """Replaces anything shaped like an API key in a record. aiohttp logs a client's WebSocket subprotocols when none
    matches ours, and a browser sends its key as one (`bearer.sk-...`); the proxy itself never logs a key."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _KEYS.search(message):
            record.msg, record.args = _KEYS.sub("sk-<redacted>", message), None
        return True


def redact_keys_in_library_logs() -> None:
    logger = logging.getLogger("aiohttp.websocket")
    if not any(isinstance(f, RedactKeys) for f in logger.filters):
        logger.addFilter(RedactKeys())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", "-") != "-":
            entry["request_id"] = record.request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
