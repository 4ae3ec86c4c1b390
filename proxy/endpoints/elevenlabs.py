"""ElevenLabs' input-streaming WebSockets: WS /v1/text-to-speech/{voice_id}/stream-input and
/multi-stream-input (docs/elevenlabs.md), so voice-agent frameworks (pipecat's ElevenLabsTTSService(url=...))
stream an LLM's tokens here unchanged. Every refusal is answered before the upgrade: a bad query string or an
unknown voice 400, then admission (drain, key limits, policy); the API key comes in the `xi-api-key` header
(proxy/auth.py), checked at the door. The connection itself is proxy/elevenlabs_session.py.
"""

from __future__ import annotations

from aiohttp import web

from csm_tts.text import elevenlabs as el
from proxy.appkeys import OFFLOAD, SETTINGS, VOICES
from proxy.elevenlabs_session import ElevenLabsSession
from proxy.errors import ApiError
from proxy.parse.job import GenerateOptions, SpeechJob
from proxy.requests import check_admission, check_websocket_room, websocket_session
from proxy.voice_context import voice_segments
from proxy.voices import UnknownVoice


async def stream_input(request: web.Request) -> web.StreamResponse:
    return await serve(request, multi=False)


async def multi_stream_input(request: web.Request) -> web.StreamResponse:
    return await serve(request, multi=True)


async def serve(request: web.Request, multi: bool) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    voice_id = request.match_info["voice_id"]
    # parse
    try:
        query = el.parse_query(voice_id, request.query, multi=multi)
        voice = app[VOICES].resolve(voice_id)
    except el.ProtocolError as e:
        raise ApiError(400, str(e)) from None
    except UnknownVoice as e:
        raise ApiError(400, f"voice_id: {e}") from None
    options = GenerateOptions(text="", speaker_id=voice.speaker_id, normalize=query.normalize)
    # admit, before the upgrade (each cut is admitted again when its turn comes)
    check_admission(request, [options], full=False)
    check_websocket_room(request)
    ws = web.WebSocketResponse(
        heartbeat=settings.ws_heartbeat_s,
        max_msg_size=el.MAX_MESSAGE_BYTES,
        writer_limit=settings.ws_write_buffer_bytes,
        compress=False,
    )
    if not ws.can_prepare(request).ok:
        raise ApiError(400, f"{request.path} needs a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)")
    # prepare: the voice's clip, if it has one
    reference = await voice_segments(SpeechJob(options, voice=voice), app[OFFLOAD], settings.reference_max_seconds)
    async with websocket_session(request, ws):  # counted, and closed by a drain, like WS /stream's sessions
        await ElevenLabsSession(ws, request, query, options, reference).run()
    return ws
