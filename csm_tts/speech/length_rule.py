"""How much audio a request may produce when it does not say (`max_audio_length_ms` absent).

CSM stops at its end-of-speech frame, but it sometimes fails to emit one (and random demo weights never do), so a
request without a limit must not run to the model's maximum whatever its text: "Hello," would otherwise cost 30 s of
generation. The limit follows the text instead, with a generous margin:

    default limit = 2 s + 150 ms per UTF-8 byte of text, capped by the configured maximum (90 s)

Read English runs at about 14 characters per second (70 ms each); 150 ms per byte is more than twice that, so slow,
expressive speech is never cut, and the 2 s cover pauses and short texts ("Hi." gets 2.45 s). Scripts whose characters
take several UTF-8 bytes (CJK: 3 bytes, ~250 ms of speech each) get proportionally more. Production TTS servers bound
the audio by the text the same way (CosyVoice allows at most 20 speech tokens per text token). An explicit
`max_audio_length_ms` is always honoured as given.

Standard library only: the proxy (no torch) uses the same rule to plan its context window.
"""

from __future__ import annotations

from csm_tts import FRAME_MS

BASE_MS = 2_000
MS_PER_BYTE = 150


def default_audio_length_ms(text: str, cap_ms: int) -> int:
    """The limit of a request without `max_audio_length_ms`: a whole number of frames, at least one, at most cap_ms."""
    size = len(text.encode("utf-8", "surrogatepass"))
    limit = min(cap_ms, BASE_MS + MS_PER_BYTE * size)
    return max(FRAME_MS, limit - limit % FRAME_MS)
