"""Errors the API answers with, and the ONE mapper that turns any of them into a response in two flavours: the
native `{"error": ..., "errors": [...]}` and OpenAI's `{"error": {"message", "type", "param", "code"}}` (/v1 paths).

Plain Python (no aiohttp, no gRPC): the parse layer raises these; proxy/middleware.py and the endpoints that must
answer an error inside an open stream (SSE events, NDJSON lines, WebSocket replies) call `error_body`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from proxy.upstream.errors import UpstreamError

NATIVE, OPENAI = "native", "openai"
MAX_MESSAGE_CHARS = 2000


class ApiError(Exception):
    """An error the client caused or must know about; `status` is the HTTP status, `message` the JSON `error`."""

    def __init__(self, status: int, message: str, errors: list[dict] | None = None, headers: dict | None = None):
        # Every message is bounded, whatever a check put in it: errors echo input, and input can be megabytes.
        message = message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors or []
        self.headers = headers or {}

    def body(self) -> dict:
        body: dict = {"error": self.message}
        if self.errors:
            body["errors"] = self.errors
        return body


class ValidationError(ApiError):
    """Well-formed JSON with invalid content (422); one entry per bad field."""

    def __init__(self, errors: list[dict]):
        message = "; ".join(f"{e['field']}: {e['message']}" if e.get("field") else e["message"] for e in errors)
        super().__init__(422, f"Invalid request: {message}", errors)


class OpenAIError(ApiError):
    """An error with OpenAI's `param` and `code`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(status, message, headers=headers)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class HttpRefusal:
    """What aiohttp's router and body reader refuse by themselves (404, 405, 413, ...), described without aiohttp."""

    status: int
    method: str
    path: str
    allow: str = ""
    body_limit: int = 0
    text: str = ""


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def openai_status(status: int) -> int:
    """OpenAI answers invalid content with 400; this service's own endpoints use 422 for it."""
    return 400 if status == 422 else status


def openai_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_body(exc: Exception, flavour: str = NATIVE) -> tuple[int, dict, Mapping]:
    """Any error the API knows -> (status, body, headers) in the given flavour. TypeError for anything else (a bug:
    the middleware answers it with a 500)."""
    if isinstance(exc, HttpRefusal):
        exc = _refusal(exc, flavour)
    if isinstance(exc, UpstreamError):
        headers = {"Retry-After": "1"} if exc.status == 503 else {}
        if flavour == NATIVE:
            return exc.status, {"error": exc.message}, headers
        status = openai_status(exc.status)
        code = {400: "invalid_request", 503: "service_unavailable"}.get(status, "upstream_error")
        return status, openai_error_body(status, exc.message, None, code), headers
    if not isinstance(exc, ApiError):
        raise TypeError(type(exc))
    if flavour == NATIVE:
        return exc.status, exc.body(), exc.headers
    status = openai_status(exc.status)
    if isinstance(exc, OpenAIError):
        return status, openai_error_body(status, exc.message, exc.param, exc.code), exc.headers
    param = exc.errors[0].get("field") if exc.errors else None
    code = "invalid_value" if exc.errors else {413: "request_too_large"}.get(status)
    return status, openai_error_body(status, exc.message, param, code), exc.headers


def _refusal(r: HttpRefusal, flavour: str) -> ApiError:
    headers = {"Allow": r.allow} if r.allow else {}
    if r.status == 404 and flavour == OPENAI:
        message, code = f"Unknown path {r.path}; see GET /v1/models and POST /v1/audio/speech", "not_found"
    elif r.status == 404:
        message, code = f"Not found: {r.path}; GET / lists the endpoints", None
    elif r.status == 405:
        message, code = f"Method {r.method} is not allowed for {r.path}; allowed: {r.allow}", "method_not_allowed"
    elif r.status == 413:
        message, code = f"Request body too large; the limit is {r.body_limit} bytes", "request_too_large"
    else:
        message, code = r.text, None
    if flavour == OPENAI:
        return OpenAIError(r.status, message, None, code, headers)
    return ApiError(r.status, message, headers=headers)
