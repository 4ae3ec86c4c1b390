"""Proxy configuration, read once from the environment (docs/api.md lists every variable).

Every value is checked at start-up: a bad value stops the proxy with a message naming the variable, rather than
surfacing later as a confusing runtime error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from csm_tts import limits
from csm_tts.parsing import parse_bool
from csm_tts.watermark.options import WatermarkSettings
from proxy.voices import DEFAULT_OPENAI_VOICES, parse_voice_table


class SettingsError(ValueError):
    """An environment variable has an invalid value; the message names it."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    # Triton: one or more replicas (gRPC host:port); streams are spread over the healthy ones.
    triton_grpc_urls: tuple[str, ...] = ("127.0.0.1:8001",)
    triton_model: str = "tts"
    watermark_model: str = "watermarker"
    health_interval_s: float = 2.0  # background health check of every replica
    health_timeout_s: float = 0.5  # per health RPC; bounds how long "Triton is down" takes to notice
    stream_idle_timeout_s: float = 60.0  # longest wait for the next response of a Triton stream
    triton_metrics_port: int | None = 8002  # each replica's metrics port: /health shows a stage that is behind
    # HTTP and WebSocket limits.
    max_body_bytes: int = 1 << 20
    max_connections: int = 1024  # open client connections (beyond: 503 and closed; proxy/connections.py)
    header_timeout_s: float = 10.0  # a new connection's first request header (a WebSocket handshake included)
    body_timeout_s: float = 30.0  # reading a request's whole body
    keepalive_s: float = 75.0  # idle keep-alive, and the limit on a later request's header (aiohttp's own timer)
    max_text_chunks: int = 100  # strings per POST /stream/chunks
    max_streams: int = 128  # Triton streams open at once through this proxy
    max_websockets: int = 256
    ws_max_pending: int = 8  # text chunks queued per socket before further ones are refused
    ws_send_timeout_s: float = 10.0  # a client that accepts nothing for this long is disconnected
    ws_write_buffer_bytes: int = 64 << 10  # bytes the proxy queues per socket before waiting for the client
    ws_socket_sndbuf: int | None = None  # SO_SNDBUF of WebSocket connections (None: the kernel's autotuning)
    ws_heartbeat_s: float = 30.0
    cors_origins: tuple[str, ...] = ()  # "*" allows any origin
    # Voice continuity: earlier chunks of a session are passed as context, newest first, inside the model's window.
    context_enabled: bool = True
    context_positions: int = limits.MODEL_POSITIONS
    context_tokens_per_byte: float = (
        limits.CONVERSATION_TOKENS_PER_BYTE
    )  # generous estimate of text tokens per UTF-8 byte
    context_max_audio_s: float = limits.CONVERSATION_MAX_AUDIO_S
    context_max_segments: int = limits.CONVERSATION_MAX_SEGMENTS
    # Watermark defaults (the Triton side applies them; the proxy reports and forwards them).
    watermark_enabled: bool | None = None  # None: not set here, Triton's own default applies (true)
    watermark_key_source: str = "public"  # "private" when CSM_WATERMARK_KEY holds a key other than the public one
    cpu_threads: int | None = None  # the pool for encoding, decoding, large JSON; None: cores - 1 (offload.py)
    # Voices and voice cloning (proxy/voices.py): presets from a directory, OpenAI's names, per-request references.
    voices_dir: str | None = None
    openai_voices: tuple[tuple[str, str], ...] = DEFAULT_OPENAI_VOICES
    reference_max_bytes: int = (
        limits.REFERENCE_MAX_BYTES
    )  # one reference clip, decoded from base64 (the body limit applies first)
    reference_max_seconds: float = limits.REFERENCE_MAX_SECONDS
    log_level: str = "INFO"
    # Running it in production (docs/deployment.md): replica discovery, API keys, watermark policy, drain, logs.
    triton_grpc_service: str | None = None  # host:port resolved to every replica's address (a headless Service)
    discovery_interval_s: float = 5.0
    api_keys_file: str | None = None  # JSON of key hashes and limits (proxy/auth.py); none: no keys needed
    watermark_allow_disable: bool = True  # may clients send watermark=false when the default is on?
    watermark_allow_custom_key: bool = True  # may clients send their own watermark_key?
    drain_s: float = 30.0  # on SIGTERM, how long streams in flight may take to finish
    log_format: str = "text"  # or "json": one JSON object per line
    metrics_port: int | None = None  # a second listener serving only /metrics, without keys (what Prometheus scrapes)
    metrics_key_names: bool = False  # label csm_proxy_key_streams_total with API key names

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for name, field_name, parse in _VARIABLES:
            raw = env.get(name, "").strip()
            if not raw:
                continue
            try:
                values[field_name] = parse(raw)
            except (TypeError, ValueError) as e:
                raise SettingsError(f"{name}={raw!r}: {e}") from None
        try:
            watermark = WatermarkSettings.from_env(env)
        except ValueError as e:
            raise SettingsError(str(e)) from None
        if env.get("CSM_WATERMARK_ENABLED", "").strip():
            values["watermark_enabled"] = watermark.enabled
        values["watermark_key_source"] = "public" if watermark.key_is_public else "private"
        # The proxy does not need the private key itself: CSM_WATERMARK_KEY_SOURCE=private says one is set.
        source = env.get("CSM_WATERMARK_KEY_SOURCE", "").strip().lower()
        if source:
            if source not in ("public", "private"):
                raise SettingsError(f"CSM_WATERMARK_KEY_SOURCE={source!r}: must be public or private")
            values["watermark_key_source"] = source
        if values.get("triton_grpc_service") and not env.get("TRITON_GRPC_URLS", "").strip():
            values["triton_grpc_urls"] = ()  # only the discovered replicas
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if not self.triton_grpc_urls and not self.triton_grpc_service:
            raise SettingsError("TRITON_GRPC_URLS or TRITON_GRPC_SERVICE: at least one host:port is needed")
        if self.log_format not in ("text", "json"):
            raise SettingsError(f"PROXY_LOG_FORMAT={self.log_format!r}: must be text or json")
        if not 0 < self.port < 65536:
            raise SettingsError(f"PROXY_PORT={self.port}: not a TCP port")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
                raise SettingsError(f"{f.name}={value}: must be positive")

    @property
    def watermark_default(self) -> bool:
        """What a request without a `watermark` option gets."""
        return True if self.watermark_enabled is None else self.watermark_enabled


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 < value < 65536:
        raise ValueError("must be a TCP port (1-65535)")
    return value


def _port_or_off(raw: str) -> int | None:
    return None if raw.lower() == "off" else _port(raw)


def _bool(raw: str) -> bool:
    return parse_bool(raw, "the value")


def _list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _grpc_urls(raw: str) -> tuple[str, ...]:
    urls = []
    for item in _list(raw):
        url = item.removeprefix("grpc://")
        host, sep, port = url.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{item!r} is not host:port")
        urls.append(url)
    if not urls:
        raise ValueError("at least one host:port is needed")
    return tuple(urls)


def _service(raw: str) -> str:
    (url,) = _grpc_urls(raw) if "," not in raw else (None,)
    if url is None:
        raise ValueError("one host:port (a name that resolves to every replica)")
    return url


def _log_format(raw: str) -> str:
    value = raw.lower()
    if value not in ("text", "json"):
        raise ValueError("must be text or json")
    return value


def _name(raw: str) -> str:
    if any(c.isspace() for c in raw):
        raise ValueError("must not contain spaces")
    return raw


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return level


# environment variable -> (Settings field, parser)
_VARIABLES = [
    ("PROXY_HOST", "host", _name),
    ("PROXY_PORT", "port", _port),
    ("TRITON_GRPC_URLS", "triton_grpc_urls", _grpc_urls),
    ("TRITON_MODEL", "triton_model", _name),
    ("TRITON_WATERMARK_MODEL", "watermark_model", _name),
    ("TRITON_HEALTH_INTERVAL_S", "health_interval_s", _positive_float),
    ("TRITON_HEALTH_TIMEOUT_S", "health_timeout_s", _positive_float),
    ("TRITON_STREAM_IDLE_TIMEOUT_S", "stream_idle_timeout_s", _positive_float),
    ("TRITON_METRICS_PORT", "triton_metrics_port", _port_or_off),
    ("PROXY_MAX_BODY_BYTES", "max_body_bytes", _positive_int),
    ("PROXY_MAX_CONNECTIONS", "max_connections", _positive_int),
    ("PROXY_HEADER_TIMEOUT_S", "header_timeout_s", _positive_float),
    ("PROXY_BODY_TIMEOUT_S", "body_timeout_s", _positive_float),
    ("PROXY_KEEPALIVE_S", "keepalive_s", _positive_float),
    ("PROXY_MAX_TEXT_CHUNKS", "max_text_chunks", _positive_int),
    ("PROXY_MAX_STREAMS", "max_streams", _positive_int),
    ("PROXY_MAX_WEBSOCKETS", "max_websockets", _positive_int),
    ("PROXY_WS_MAX_PENDING", "ws_max_pending", _positive_int),
    ("PROXY_WS_SEND_TIMEOUT_S", "ws_send_timeout_s", _positive_float),
    ("PROXY_WS_WRITE_BUFFER_BYTES", "ws_write_buffer_bytes", _positive_int),
    ("PROXY_WS_SOCKET_SNDBUF", "ws_socket_sndbuf", _positive_int),
    ("PROXY_WS_HEARTBEAT_S", "ws_heartbeat_s", _positive_float),
    ("PROXY_CORS_ORIGINS", "cors_origins", _list),
    ("PROXY_CONTEXT_ENABLED", "context_enabled", _bool),
    ("PROXY_CONTEXT_POSITIONS", "context_positions", _positive_int),
    ("PROXY_CONTEXT_TOKENS_PER_BYTE", "context_tokens_per_byte", _positive_float),
    ("PROXY_CONTEXT_MAX_AUDIO_S", "context_max_audio_s", _positive_float),
    ("PROXY_CONTEXT_MAX_SEGMENTS", "context_max_segments", _positive_int),
    ("PROXY_CPU_THREADS", "cpu_threads", _positive_int),
    ("PROXY_LOG_LEVEL", "log_level", _log_level),
    ("TRITON_GRPC_SERVICE", "triton_grpc_service", _service),
    ("TRITON_DISCOVERY_INTERVAL_S", "discovery_interval_s", _positive_float),
    ("PROXY_API_KEYS_FILE", "api_keys_file", str),
    ("CSM_WATERMARK_ALLOW_DISABLE", "watermark_allow_disable", _bool),
    ("CSM_WATERMARK_ALLOW_CUSTOM_KEY", "watermark_allow_custom_key", _bool),
    ("PROXY_DRAIN_S", "drain_s", _positive_float),
    ("PROXY_LOG_FORMAT", "log_format", _log_format),
    ("PROXY_METRICS_PORT", "metrics_port", _port),
    ("PROXY_METRICS_KEY_NAMES", "metrics_key_names", _bool),
    ("CSM_VOICES_DIR", "voices_dir", str),
    ("PROXY_OPENAI_VOICES", "openai_voices", parse_voice_table),
    ("PROXY_REFERENCE_MAX_BYTES", "reference_max_bytes", _positive_int),
    ("PROXY_REFERENCE_MAX_SECONDS", "reference_max_seconds", _positive_float),
]
