"""The context segments that carry a request's voice: the client's own clip (decoded now, in the thread pool, after
admission) or else the voice preset's clip, if any."""

from __future__ import annotations

from csm_tts.speech.request import ContextSegment
from proxy.parse.job import SpeechJob
from proxy.render.offload import Offload
from proxy.voices import decode_reference


async def voice_segments(job: SpeechJob, offload: Offload, max_seconds: float) -> list[ContextSegment]:
    """Raises InvalidReference for a clip that is not readable audio or too long; the caller spells the error."""
    if job.reference is None:
        preset = job.voice.reference if job.voice is not None else None
        return [preset] if preset is not None else []
    audio = await offload.run(decode_reference, job.reference.audio, max_seconds)
    return [ContextSegment(job.options.speaker_id, job.reference.text, audio)]
