"""Log lines with the request id (from the request's scope, proxy/scope.py), as text or JSON (PROXY_LOG_FORMAT).

Text: `2026-12-02 10:00:00,000 INFO proxy [3f2a...]: message`. JSON: one object per line with `time`, `level`,
`logger`, `request_id` (when the line belongs to a request), `message` and, for errors, `exception`.
The access log (logger `proxy.access`) has one line per request and per WebSocket session, written by the observe
middleware (`access_line`), client-aborted requests included.
"""

from __future__ import annotations

import json
import logging
import re
import sys

from proxy.scope import current_scope

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
ACCESS_LOG = "proxy.access"

# What a client-supplied string may not bring into a log line as such: control characters (a forged line), the
# bidirectional overrides and isolates (U+202A-U+202E, U+2066-U+2069, U+200E/F, U+061C: text that reads reversed in
# a terminal), line and paragraph separators (U+2028/U+2029), and the quote and backslash that delimit it.
_UNSAFE = re.compile(r'[\x00-\x1f\x7f-\x9f"\\\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]')


def log_safe(text: str, limit: int = 200) -> str:
    """`text` with unsafe characters as \\xNN / \\uNNNN escapes, cut to `limit` characters (marked with ...)."""
    cut = text if len(text) <= limit else text[:limit] + "..."
    return _UNSAFE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", cut)


def access_line(
    remote: str | None,
    method: str,
    path: str,
    status: int,
    seconds: float,
    request_id: str,
    user_agent: str = "",
    close_code: int | None = None,
    audio_seconds: float = 0.0,
) -> str:
    """`127.0.0.1 "POST /generate" 200 0.412s audio=1.04s "curl/8.5" id=...`; a WebSocket session adds `close=1000`."""
    close = f" close={close_code}" if close_code is not None else ""
    return (
        f'{log_safe(remote or "-", 64)} "{log_safe(method, 16)} {log_safe(path, 300)}" {status}{close} {seconds:.3f}s '
        f'audio={audio_seconds:.2f}s "{log_safe(user_agent)}" id={request_id}'
    )


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
