"""One generation written to an HTTP response as it is generated: an encoded audio file (chunked transfer) or
OpenAI's SSE events. Shared by POST /v1/audio/speech and POST /generate/audio (/generate/wav with response_format).

The status line waits for the first audio chunk: everything that fails before it (bad options Triton refuses, no
replica, a full queue) is an ordinary HTTP error. After it, a failure cannot change the status any more: an SSE
stream gets an `error` event and ends cleanly; an audio stream is cut off (the chunked body never terminates), so
the client sees a failed download instead of a short file that looks complete. A client that goes away cancels the
handler (handler_cancellation), and leaving the Generation cancels its Triton stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Sequence

from aiohttp import web

from proxy.api import ApiError, GenerateOptions
from proxy.context import Segment
from proxy.encoders import AudioFormat, StreamEncoder
from proxy.openai_api import error_from, sse_event, usage
from proxy.synthesis import Generation
from proxy.triton_client import UpstreamError
from proxy.voices import InvalidReference, Voice, decode_reference
from proxy.web import SETTINGS, TRITON

log = logging.getLogger("proxy.audio_stream")


async def reference_segments(request: web.Request, voice: Voice, reference: tuple[bytes, str] | None) -> list[Segment]:
    """The context segments that carry a voice: the request's own clip if it sent one, else the preset's, if any.
    Decoding runs in a worker thread (an MP3 of 20 s takes tens of milliseconds)."""
    if reference is None:
        return [voice.reference] if voice.reference is not None else []
    data, text = reference
    max_seconds = request.app[SETTINGS].reference_max_seconds
    audio = await asyncio.get_running_loop().run_in_executor(None, decode_reference, data, max_seconds)
    return [Segment(voice.speaker_id, text, audio)]


def reference_error(e: InvalidReference) -> ApiError:
    """The seed endpoints' spelling of a bad reference (413 or 422 with the field); /v1 maps 422 to 400."""
    return ApiError(e.status, f"Invalid request: {e.field}: {e.message}", [{"field": e.field, "message": e.message}])


async def stream_speech(
    request: web.Request,
    options: GenerateOptions,
    fmt: AudioFormat,
    reference: Sequence[Segment] = (),
    sse: bool = False,
    headers: dict | None = None,
) -> web.StreamResponse:
    settings, pool = request.app[SETTINGS], request.app[TRITON]
    encoder = StreamEncoder(fmt)
    try:
        async with Generation(pool, options, settings.watermark_enabled, reference=reference) as generation:
            # The first chunk is in: from here on the answer is 200.
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream" if sse else fmt.content_type,
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",  # reverse proxies: do not buffer the stream
                    "X-Sample-Rate": str(fmt.sample_rate),
                    "X-Watermarked": "true" if generation.watermarked else "false",
                    **(headers or {}),
                }
            )
            try:
                await response.prepare(request)
                async for chunk in generation:
                    if chunk.audio.size:
                        await _send(response, encoder.encode(chunk.audio), sse)
                await _send(response, encoder.finish(), sse)
                if sse:
                    done = usage(options.text, encoder.samples_in, settings.context_tokens_per_byte)
                    await response.write(sse_event({"type": "speech.audio.done", "usage": done}))
                await response.write_eof()
            except (UpstreamError, ApiError) as e:
                log.warning("generation failed after %d samples were sent: %s", encoder.samples_in, e)
                if sse:
                    _, body, _ = error_from(e)
                    with contextlib.suppress(ConnectionError):
                        await response.write(sse_event({"type": "error", **body}))
                        await response.write_eof()
                elif request.transport is not None:
                    request.transport.abort()
            except ConnectionError:
                log.info("client left %s %s early; its Triton stream is cancelled", request.method, request.path)
    finally:
        encoder.close()
    return response


async def _send(response: web.StreamResponse, data: bytes, sse: bool) -> None:
    if not data:
        return
    if sse:
        data = sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})
    await response.write(data)  # waits while the client does not read: a slow reader slows its own stream


def content_disposition(fmt: AudioFormat) -> dict:
    return {"Content-Disposition": f"attachment; filename=speech.{fmt.extension}"}
