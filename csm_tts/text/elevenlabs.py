"""ElevenLabs' input-streaming WebSocket protocol, as plain values: the query string, the messages a client sends
(parsed and validated), and the answers a server sends. No I/O: the endpoint owns the socket (docs/elevenlabs.md).

Two endpoints share the messages: `/v1/text-to-speech/{voice_id}/stream-input` (one utterance per connection;
`{"text": ""}` ends the input) and `/multi-stream-input` (several contexts per connection, named by `context_id`;
there `{"text": ""}` is a keep-alive, as pipecat's client sends it). Errors are phrased for the client and carry the
WebSocket close code to use (1008: policy violation, 1007: data that is not valid text, 1009: message too big).
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from csm_tts.parsing import parse_bool, shown

MAX_MESSAGE_BYTES = 64 * 1024
MAX_TEXT_CHARS = 10_000
MAX_CONTEXTS = 5  # ElevenLabs' limit of simultaneous contexts per connection
INACTIVITY_TIMEOUT_S = (20, 1, 180)  # default, least, most (ElevenLabs' range)
_CONTEXT_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII without spaces: uuids, counters, names
_NORMALIZATION = ("auto", "on", "off")


class ProtocolError(ValueError):
    """A client's mistake: `str(error)` is the message to send, `code` a short name for it, `close_code` the
    WebSocket close code."""

    def __init__(self, message: str, close_code: int = 1008, code: str = "invalid_message") -> None:
        super().__init__(message)
        self.close_code = close_code
        self.code = code


@dataclass(frozen=True)
class OutputFormat:
    name: str
    codec: str  # "pcm" (16-bit little-endian mono) or "mp3"
    sample_rate: int
    bitrate_kbps: int | None = None


_PCM_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
_MP3 = ((22050, 32), (44100, 32), (44100, 64), (44100, 96), (44100, 128), (44100, 192))
OUTPUT_FORMATS: dict[str, OutputFormat] = {
    **{f"pcm_{rate}": OutputFormat(f"pcm_{rate}", "pcm", rate) for rate in _PCM_RATES},
    **{f"mp3_{rate}_{kbps}": OutputFormat(f"mp3_{rate}_{kbps}", "mp3", rate, kbps) for rate, kbps in _MP3},
}
DEFAULT_OUTPUT_FORMAT = "mp3_44100_128"  # ElevenLabs' default when the query names none


@dataclass(frozen=True)
class StreamQuery:
    """The connection's query string. Accepted and ignored: model_id (there is one model), enable_logging,
    enable_ssml_parsing (SSML is read as text), sync_alignment (no alignment is sent)."""

    voice_id: str
    multi: bool
    output_format: OutputFormat
    auto_mode: bool = False
    normalization: str = "auto"  # apply_text_normalization: "auto" and "on" normalise, "off" does not
    language_code: str | None = None
    inactivity_timeout_s: int = INACTIVITY_TIMEOUT_S[0]

    @property
    def normalize(self) -> bool:
        return self.normalization != "off"


def parse_query(voice_id: str, query: Mapping[str, str], *, multi: bool) -> StreamQuery:
    if not voice_id or len(voice_id) > 128:
        raise ProtocolError("voice_id must be 1 to 128 characters")
    name = query.get("output_format", DEFAULT_OUTPUT_FORMAT)
    if name not in OUTPUT_FORMATS:
        raise ProtocolError(f"output_format {shown(name)} is not supported; use one of {', '.join(OUTPUT_FORMATS)}")
    normalization = query.get("apply_text_normalization", "auto")
    if normalization not in _NORMALIZATION:
        raise ProtocolError("apply_text_normalization must be 'auto', 'on' or 'off'")
    default, least, most = INACTIVITY_TIMEOUT_S
    timeout_text = query.get("inactivity_timeout", str(default))
    if not timeout_text.isdigit() or not least <= int(timeout_text) <= most:
        raise ProtocolError(f"inactivity_timeout must be a whole number of seconds from {least} to {most}")
    language = query.get("language_code") or None
    if language is not None and not re.fullmatch(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})?", language):
        raise ProtocolError("language_code must be a language code such as 'en' or 'pt-BR'")
    try:
        auto_mode = parse_bool(query.get("auto_mode", "false"), "auto_mode")
    except ValueError as problem:
        raise ProtocolError(str(problem)) from None
    return StreamQuery(
        voice_id=voice_id,
        multi=multi,
        output_format=OUTPUT_FORMATS[name],
        auto_mode=auto_mode,
        normalization=normalization,
        language_code=language,
        inactivity_timeout_s=int(timeout_text),
    )


@dataclass(frozen=True)
class VoiceSettings:
    """Accepted for compatibility; CSM has no knob for them, so they do not change the voice."""

    stability: float | None = None
    similarity_boost: float | None = None
    style: float | None = None
    use_speaker_boost: bool | None = None
    speed: float | None = None


@dataclass(frozen=True)
class Text:
    """A piece of text for a context; `flush` asks for everything received so far to be spoken now. The first
    message of a context (text " ") may carry voice settings, a chunk length schedule and an API key."""

    text: str
    context_id: str | None = None
    flush: bool = False
    voice_settings: VoiceSettings | None = None
    chunk_length_schedule: tuple[int, ...] | None = None
    api_key: str | None = None


@dataclass(frozen=True)
class Flush:
    context_id: str | None = None


@dataclass(frozen=True)
class KeepAlive:
    """`{"text": ""}` on multi-stream-input: keeps the connection (or the named context) open."""

    context_id: str | None = None


@dataclass(frozen=True)
class EndOfInput:
    """`{"text": ""}` on stream-input: the text is complete; the server finishes speaking and closes."""


@dataclass(frozen=True)
class CloseContext:
    """`interrupt` is set by `Contexts.admit`: text came after the last flush, so nobody waits for the rest."""

    context_id: str
    interrupt: bool = False


@dataclass(frozen=True)
class CloseSocket:
    pass


Message = Text | Flush | KeepAlive | EndOfInput | CloseContext | CloseSocket


def _reject_constant(name: str) -> float:
    raise ProtocolError(f"{name} is not a number JSON allows", close_code=1007)


def _json_object(raw: str | bytes) -> dict:
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"a message may be at most {MAX_MESSAGE_BYTES} bytes", close_code=1009)
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("a message must be UTF-8 JSON text", close_code=1007) from None
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except (json.JSONDecodeError, RecursionError):
        raise ProtocolError('a message must be a JSON object, for example {"text": "Hello "}', 1007) from None
    if not isinstance(value, dict):
        raise ProtocolError('a message must be a JSON object, for example {"text": "Hello "}', 1007)
    return value


def _boolean(message: dict, key: str) -> bool:
    value = message.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ProtocolError(f"{key} must be true or false")
    return value


def _string(message: dict, key: str, limit: int) -> str | None:
    value = message.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"{key} must be a string")
    if len(value) > limit:
        raise ProtocolError(f"{key} may be at most {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(f"{key} is not valid Unicode text (a lone surrogate)", close_code=1007) from None
    return value


def _context_id(message: dict) -> str | None:
    value = message.get("context_id")
    if value is None:
        return None
    if not isinstance(value, str) or not _CONTEXT_ID.fullmatch(value):
        raise ProtocolError("context_id must be 1 to 128 printable ASCII characters without spaces")
    return value


def _fraction(settings: dict, key: str, least: float, most: float) -> float | None:
    value = settings.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProtocolError(f"voice_settings.{key} must be a number")
    if not least <= value <= most:
        raise ProtocolError(f"voice_settings.{key} must be from {least} to {most}")
    return float(value)


def _object(message: dict, key: str) -> dict | None:
    value = message.get(key)
    if value is not None and not isinstance(value, dict):
        raise ProtocolError(f"{key} must be an object")
    return value


def _voice_settings(message: dict) -> VoiceSettings | None:
    settings = _object(message, "voice_settings")
    if settings is None:
        return None
    boost = settings.get("use_speaker_boost")
    if boost is not None and not isinstance(boost, bool):
        raise ProtocolError("voice_settings.use_speaker_boost must be true or false")
    return VoiceSettings(
        stability=_fraction(settings, "stability", 0.0, 1.0),
        similarity_boost=_fraction(settings, "similarity_boost", 0.0, 1.0),
        style=_fraction(settings, "style", 0.0, 1.0),
        use_speaker_boost=boost,
        speed=_fraction(settings, "speed", 0.25, 4.0),
    )


def _schedule(message: dict) -> tuple[int, ...] | None:
    schedule = (_object(message, "generation_config") or {}).get("chunk_length_schedule")
    if schedule is None:
        return None
    # ElevenLabs' bounds: each number of characters from 50 to 500.
    valid = isinstance(schedule, list) and 1 <= len(schedule) <= 16
    valid = valid and all(isinstance(n, int) and not isinstance(n, bool) and 50 <= n <= 500 for n in schedule)
    if not valid:
        raise ProtocolError("generation_config.chunk_length_schedule must be 1 to 16 whole numbers from 50 to 500")
    return tuple(schedule)


def _api_key(message: dict) -> str | None:
    key = _string(message, "xi_api_key", 512)
    bearer = _string(message, "authorization", 520)
    if key is None and bearer is not None:
        key = bearer.removeprefix("Bearer ").strip()
    return key


def parse_message(raw: str | bytes, *, multi: bool) -> Message:
    """One client message as a typed value; raises ProtocolError with the answer for the client."""
    message = _json_object(raw)
    context_id = _context_id(message) if multi else None
    if _boolean(message, "close_socket"):
        return CloseSocket()
    if _boolean(message, "close_context"):
        if not multi:
            raise ProtocolError('close_context exists on multi-stream-input only; send {"text": ""} to finish')
        if context_id is None:
            raise ProtocolError("close_context needs the context_id of the context to close")
        return CloseContext(context_id)
    text = _string(message, "text", MAX_TEXT_CHARS)
    flush = _boolean(message, "flush")
    if text is None:
        if flush:
            return Flush(context_id)
        raise ProtocolError("a message needs text, flush, close_context or close_socket")
    if text == "" and not flush:
        return KeepAlive(context_id) if multi else EndOfInput()
    return Text(
        text=text,
        context_id=context_id,
        flush=flush,
        voice_settings=_voice_settings(message),
        chunk_length_schedule=_schedule(message),
        api_key=_api_key(message),
    )


@dataclass(frozen=True)
class Answer:
    """What a server sends: build with `audio`, `final` or `error`, send `as_json()`."""

    fields: dict = field(default_factory=dict)

    def as_json(self) -> str:
        return json.dumps(self.fields, separators=(",", ":"))


def _with_context(fields: dict, context_id: str | None) -> Answer:
    if context_id is not None:
        fields["contextId"] = context_id
    return Answer(fields)


def audio(chunk: bytes, context_id: str | None = None) -> Answer:
    """Audio in the connection's output format, base64. No alignment: we do not know character timings, and
    clients treat a missing alignment as none (pipecat does) rather than as an error."""
    return _with_context({"audio": base64.b64encode(chunk).decode("ascii")}, context_id)


def final(context_id: str | None = None) -> Answer:
    """The context (or, on stream-input, the connection's text) has been spoken completely."""
    return _with_context({"isFinal": True}, context_id)


def error(problem: ProtocolError) -> Answer:
    """ElevenLabs' error shape: a readable message, a short code, and the close code that follows."""
    return Answer({"message": str(problem), "error": problem.code, "code": problem.close_code})
