"""How audio and replies are framed on the wire: OpenAI's SSE events, the WebSocket's audio messages (JSON with
base64, or binary with a 16-byte header) and its JSON replies. Pure functions: the writers (proxy/render/http.py,
proxy/session.py) send what these return; `wav_message` is CPU work for the pool."""

from __future__ import annotations

import base64
import json
import math
import struct

import numpy as np

from csm_tts import SAMPLE_RATE, SAMPLES_PER_FRAME
from proxy.render.offload import json_with_base64
from proxy.render.pcm import wav_bytes

# Binary audio frame header (stream mode, binary=true): seq, chunk_id, index, samples as little-endian uint32.
FRAME_HEADER = struct.Struct("<IIII")


# -- SSE (OpenAI's stream_format "sse") ----------------------------------------------------------------------------
def sse_event(body: dict) -> bytes:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


def sse_audio(data: bytes) -> bytes:
    return sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})


def usage(text: str, samples: int, tokens_per_byte: float) -> dict:
    """`speech.audio.done`'s usage. The proxy does not tokenize: input_tokens is the context budget's estimate of
    the text's tokens, output_tokens the 80 ms audio frames generated (one backbone step each)."""
    input_tokens = math.ceil(len(text.encode("utf-8")) * tokens_per_byte)
    output_tokens = math.ceil(samples / SAMPLES_PER_FRAME)
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": input_tokens + output_tokens}


# -- WebSocket -----------------------------------------------------------------------------------------------------
def ws_audio(
    payload: bytes, samples: int, seq: int, chunk_id: int, index: int, sample_format: str, binary: bool
) -> bytes | str:
    """One audio message of a stream-mode session: `payload` is PCM or the encoded format's next bytes."""
    if binary:
        return FRAME_HEADER.pack(seq, chunk_id, index, samples) + payload
    return json.dumps(
        {
            "type": "audio",
            "seq": seq,
            "chunk_id": chunk_id,
            "index": index,
            "samples": samples,
            "sample_rate": SAMPLE_RATE,
            "format": sample_format,
            "audio_base64": base64.b64encode(payload).decode(),
        }
    )


def ws_reply(body: dict, streaming: bool, seq: int, request_id: str, kind: str | None = None) -> str:
    """A JSON reply; in stream mode it also carries `type` (error, end, config, ...), `seq` and the session's
    `request_id` (message mode keeps the documented shape exactly: the id is in the upgrade's X-Request-ID)."""
    if streaming:
        kind = kind or ("error" if "error" in body else "message")
        body = {"type": kind, "seq": seq, "request_id": request_id, **body}
    return json.dumps(body)


def wav_message(fields: dict, audio: np.ndarray) -> str:
    """A reply whose `audio_base64` field (in `fields`, for its place) is the WAV of `audio`: a WebSocket message-mode
    reply, a /stream/chunks line. Up to ~6 MB: run it in the pool."""
    return json_with_base64(fields, "audio_base64", wav_bytes(audio)).decode("ascii")
