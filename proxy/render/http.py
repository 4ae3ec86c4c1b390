"""A generation written to an HTTP response as it is generated: an audio file (chunked transfer) or OpenAI's SSE
events; and the whole-clip answers (a WAV file, JSON with base64 WAV) built in the thread pool.

The caller enters the Generation first, so the status line waits for the first audio chunk: everything that fails
before it (bad options Triton refuses, no replica, a full queue) is an ordinary HTTP error. After it, a failure
cannot change the status any more: an SSE stream gets an `error` event and ends cleanly; an audio stream is cut off
(the chunked body never terminates), so the client sees a failed download instead of a short file that looks
complete. A client that goes away cancels the handler (handler_cancellation), and leaving the Generation cancels
its Triton stream.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
from aiohttp import web

from csm_tts import SAMPLE_RATE
from proxy.errors import OPENAI, ApiError, error_body
from proxy.formats import AudioFormat
from proxy.generation import Clip, Generation
from proxy.render.audio import AudioRenderer, play
from proxy.render.frames import sse_audio, sse_event, usage
from proxy.render.offload import Offload, json_with_base64
from proxy.render.pcm import wav_bytes
from proxy.spoken import SpokenGeneration
from proxy.upstream.errors import UpstreamError

log = logging.getLogger("proxy.render")


async def stream_audio(
    request: web.Request,
    generation: Generation | SpokenGeneration,
    fmt: AudioFormat,
    offload: Offload,
    sse: bool = False,
    tokens_per_byte: float = 0.5,
    headers: dict | None = None,
) -> web.StreamResponse:
    """The 200 and the audio of an entered `generation` (its first chunk is in)."""
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
    renderer = AudioRenderer(fmt.name, offload)

    async def send(data: bytes, audio: np.ndarray) -> None:
        if data:
            await response.write(sse_audio(data) if sse else data)

    try:
        await response.prepare(request)
        await play(generation, renderer, send)
        if sse:
            done = {
                "type": "speech.audio.done",
                "usage": usage(generation.options.text, renderer.samples_in, tokens_per_byte),
            }
            if isinstance(generation, SpokenGeneration):
                done["segments"] = generation.report()  # what was spoken, segment by segment
            await response.write(sse_event(done))
        await response.write_eof()
    except (UpstreamError, ApiError) as e:
        log.warning("generation failed after %d samples were sent: %s", renderer.samples_in, e)
        if sse:
            _, body, _ = error_body(e, OPENAI)
            with contextlib.suppress(ConnectionError):
                await response.write(sse_event({"type": "error", **body}))
                await response.write_eof()
        elif request.transport is not None:
            request.transport.abort()
    except ConnectionError:
        log.info("client left %s %s early; its Triton stream is cancelled", request.method, request.path)
    finally:
        renderer.close()
    return response


def content_disposition(fmt: AudioFormat) -> dict:
    return {"Content-Disposition": f"attachment; filename=speech.{fmt.extension}"}


async def wav_file(clip: Clip, offload: Offload, headers: dict | None = None) -> web.Response:
    body = await offload.run(wav_bytes, clip.audio)
    headers = {"Content-Disposition": "attachment; filename=speech.wav", **(headers or {})}
    return web.Response(body=body, content_type="audio/wav", headers=headers)


def _clip_json(clip: Clip, processing_time_ms: float) -> bytes:
    fields = {
        "audio_base64": None,
        "sample_rate": SAMPLE_RATE,
        "duration_ms": clip.audio.size * 1000.0 / SAMPLE_RATE,
        "processing_time_ms": processing_time_ms,
        "watermarked": clip.watermarked,
    }
    return json_with_base64(fields, "audio_base64", wav_bytes(clip.audio))


async def clip_json(
    clip: Clip, offload: Offload, processing_time_ms: float, headers: dict | None = None
) -> web.Response:
    """POST /generate's answer: up to ~6 MB of base64, built in the pool."""
    body = await offload.run(_clip_json, clip, processing_time_ms)
    return web.Response(body=body, content_type="application/json", headers=headers)
