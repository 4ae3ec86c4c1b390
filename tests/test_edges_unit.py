"""The pure parts of the proxy's edges: what a log line lets through, which origins may open a WebSocket, which
Content-Types a JSON endpoint reads."""

from __future__ import annotations

import pytest

from proxy.logs import access_line, log_safe
from proxy.origins import page_may_connect
from proxy.requests import is_json_type


def test_log_safe_escapes_controls_bidi_separators_and_quotes_and_bounds_the_length():
    assert log_safe('a\nb\r\x1b[31m"\\\x7f\x85') == "a\\x0ab\\x0d\\x1b[31m\\x22\\x5c\\x7f\\x85"
    for char in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c\u2028\u2029":
        assert log_safe(char) == f"\\u{ord(char):04x}"
    assert log_safe("é ü 日本") == "é ü 日本"  # ordinary text stays readable
    assert log_safe("x" * 10_000, 50) == "x" * 50 + "..."


def test_an_access_line_has_one_line_whatever_the_client_sent():
    line = access_line("::1", "GET", "/a\nb", 101, 1.5, "rid", "ua\u2028x", close_code=1000, audio_seconds=2.0)
    assert line == '::1 "GET /a\\x0ab" 101 close=1000 1.500s audio=2.00s "ua\\u2028x" id=rid'
    assert len(line.splitlines()) == 1


@pytest.mark.parametrize(
    "allowed, origin, host, ok",
    [
        ((), None, "tts.local:8000", True),  # not a browser page
        ((), "http://tts.local:8000", "tts.local:8000", True),  # its own page
        ((), "https://TTS.local", "tts.local", True),  # behind a TLS-ending proxy, any case
        ((), "http://evil.test", "tts.local:8000", False),
        ((), "http://tts.local:8001", "tts.local:8000", False),  # another port is another origin
        ((), "null", "tts.local", False),
        ((), "", "tts.local", False),
        (("https://app.example",), "https://app.example", "tts.local", True),
        (("https://app.example",), "https://app.example.evil", "tts.local", False),
        (("*",), "http://anything.test", "tts.local", True),
    ],
)
def test_which_pages_may_open_a_websocket(allowed, origin, host, ok):
    assert page_may_connect(allowed, origin, host) is ok


@pytest.mark.parametrize(
    "content_type, ok",
    [
        ("application/json", True),
        ("application/merge-patch+json", True),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data", False),
        ("application/octet-stream", False),  # what aiohttp reports when there is no Content-Type
        ("text/json", False),
    ],
)
def test_json_endpoints_read_only_json_content_types(content_type, ok):
    assert is_json_type(content_type) is ok


def test_error_messages_are_bounded_whatever_they_echo():
    from proxy.errors import MAX_MESSAGE_CHARS, ApiError
    from proxy.parse.fields import unknown_fields

    assert len(ApiError(422, "x" * 1_000_000).message) == MAX_MESSAGE_CHARS
    (entry,) = unknown_fields([f"{i:05d}" + "k" * 1000 for i in range(5000)])
    assert len(entry["message"]) < 600 and entry["message"].endswith(" and 4990 more")
    assert unknown_fields(["b", "a"]) == [{"field": None, "message": "unknown field(s): a, b"}]
