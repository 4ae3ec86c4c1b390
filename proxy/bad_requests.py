"""Malformed HTTP requests cost one log line, not a traceback.

aiohttp answers a request it cannot parse (an 8 KB URL, a broken header, a bad request line) with a 400 by itself,
before any handler runs, and logs it at ERROR with the parser's full traceback on the `aiohttp.server` logger: every
such request from the internet would write ~30 lines. This filter turns those records into one INFO line naming the
client and the parser's complaint; anything else on that logger (real server errors) passes unchanged.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

LOGGER = "aiohttp.server"


class BadRequestLog(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            client = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            detail = " ".join(str(error.message or type(error).__name__).split())[:200]
            record.msg, record.args = "malformed HTTP request from %s (answered %s): %s", (client, error.code, detail)
            record.levelno = min(record.levelno, logging.INFO)
            record.levelname = logging.getLevelName(record.levelno)
            record.exc_info = record.exc_text = None
        return True


def quiet_malformed_requests() -> None:
    """Install the filter once (idempotent: the app factory may run several times in one process)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(f, BadRequestLog) for f in logger.filters):
        logger.addFilter(BadRequestLog())
