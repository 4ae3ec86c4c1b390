"""WS /stream's protocol as pure functions: the session configuration (the query string or a `{"config": ...}`
message) and what each client message is (`read_message`). The session (proxy/session.py) only queues and answers
what these return; nothing here touches a socket.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from csm_tts.parsing import shown
from proxy.errors import ValidationError
from proxy.formats import RESPONSE_FORMATS, SAMPLE_FORMATS
from proxy.parse import strict_json
from proxy.parse.fields import OPTION_NAMES, unknown_fields
from proxy.parse.native import check_options

# Stream mode may also send each text chunk as one encoded file, in pieces as generated (proxy/render/encoders.py).
ENCODED_FORMATS = tuple(name for name in RESPONSE_FORMATS if name != "pcm")
MODES = ("message", "stream")
CONFIG_KEYS = ("mode", "binary", "format", "context", "text_stream", "early_cut")
CONTROL_KEYS = ("cancel", "done", "config")


@dataclass(frozen=True)
class StreamConfig:
    """How a WebSocket session answers. `message` (default): one JSON message per text chunk, exactly the documented
    shape. `stream`: audio as it is generated, several messages per text chunk (docs/api.md)."""

    mode: str = "message"
    binary: bool = False  # stream mode: audio as binary frames (16-byte header + PCM) instead of base64 JSON
    sample_format: str = "s16le"  # stream mode: PCM (s16le, f32le) or an encoded format (mp3, opus, ...)
    context: bool = True  # voice continuity: earlier chunks of the session are context for the next
    options: dict = field(default_factory=dict)  # default generation options for the session's text chunks
    # text streaming (query string only): messages are pieces of one text, cut by the server (proxy/text_session.py)
    text_stream: bool = False
    early_cut: bool = True  # text streaming: the first segment ends at the first clause, not the first sentence

    def public(self) -> dict:
        return {
            "mode": self.mode,
            "binary": self.binary,
            "format": self.sample_format,
            "context": self.context,
            **({"text_stream": True, "early_cut": self.early_cut} if self.text_stream else {}),
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.options.items()},
        }

    @property
    def streaming(self) -> bool:
        return self.mode == "stream"


def parse_stream_config(data: object, base: StreamConfig) -> StreamConfig:
    """A `{"config": {...}}` message (or the /stream query string, already typed) applied on top of `base`."""
    if not isinstance(data, dict):
        raise ValidationError([{"field": "config", "message": "must be a JSON object"}])
    errors = unknown_fields([k for k in data if k not in (*CONFIG_KEYS, *OPTION_NAMES)])
    changes: dict = {}
    if "mode" in data:
        if data["mode"] not in MODES:
            errors.append({"field": "mode", "message": f"must be one of {', '.join(MODES)}, got {shown(data['mode'])}"})
        else:
            changes["mode"] = data["mode"]
    if "format" in data:
        if data["format"] not in (*SAMPLE_FORMATS, *ENCODED_FORMATS):
            errors.append(
                {
                    "field": "format",
                    "message": f"must be one of {', '.join((*SAMPLE_FORMATS, *ENCODED_FORMATS))}, "
                    f"got {shown(data['format'])}",
                }
            )
        else:
            changes["sample_format"] = data["format"]
    for name in ("binary", "context", "text_stream", "early_cut"):
        if name in data:
            if not isinstance(data[name], bool):
                errors.append({"field": name, "message": f"must be true or false, got {shown(data[name])}"})
            else:
                changes[name] = data[name]
    values, option_errors = check_options(data)
    errors += option_errors
    if changes.get("text_stream", base.text_stream) and changes.get("mode", base.mode) != "stream":
        errors.append({"field": "text_stream", "message": "needs mode stream (audio leaves as it is generated)"})
    if errors:
        raise ValidationError(errors)
    return replace(base, **changes, options={**base.options, **values})


# -- client messages -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Message:
    """What one client text frame asks for. `kind`: "text" (payload: the JSON object, parsed against the session's
    options when its turn comes), "config" (payload: the config object), "cancel", "done", "malformed" (not a JSON
    object) or "invalid" (a control message spelled wrong); for the last two the payload is the error reply."""

    kind: str
    payload: object = None


def invalid(message: str, kind: str = "invalid") -> Message:
    return Message(kind, {"error": message})


def read_message(raw: str) -> Message:
    """One text frame -> a Message. Never raises for anything a client can send."""
    try:
        data = strict_json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: deeply nested arrays or objects
        return invalid(f"Invalid JSON: {str(e)[:200]}", "malformed")
    if not isinstance(data, dict):
        return invalid(f"Each message must be a JSON object, got {type(data).__name__}", "malformed")
    key = next((k for k in CONTROL_KEYS if k in data), None)
    if key is None:
        return Message("text", data)
    if len(data) != 1:
        return invalid(f"A {key!r} message must have no other fields")
    if key == "config":
        return Message("config", data["config"])
    if data[key] is not True:
        return invalid(f"{key} must be true")
    return Message(key)


def text_of(data: dict) -> str | None:
    """The text a text message carries, when it is one (for echoing it in an error reply)."""
    text = data.get("text")
    return text if isinstance(text, str) else None


def is_blank(data: dict) -> bool:
    """No text, or only whitespace: answered with exactly the documented NO_TEXT reply."""
    text = data.get("text")
    return text is None or (isinstance(text, str) and not text.strip())
