"""The limits and defaults of one speech request: the ONE home shared by the proxy (what its API accepts) and the
engine (what `csm_tts/speech/request.py` validates), plus the reason codes the engine's errors carry to the proxy.

The API's ranges are the documented ones (docs/api.md); the engine's are what the model itself can do (a
temperature of 0 is greedy decoding, 80 ms is one frame), so a direct caller of the engine (benchmarks, tests) may
ask for more than the API allows, never for more than the model can take. Standard library only: the proxy imports
this module and installs no torch.
"""

from __future__ import annotations

import re

# -- what a request may ask for --------------------------------------------------------------------------------------
MAX_SPEAKER_ID = 31  # the model's speaker tags: 0..31
MAX_TEXT_CHARS = 5_000
MAX_SEED = 2**63 - 1  # an int64 request parameter
MAX_AUDIO_LENGTH_MS = 90_000  # the API's largest limit, the engine's default cap and the csm_1b config's default
API_MIN_AUDIO_LENGTH_MS = 1_000
ENGINE_MIN_AUDIO_LENGTH_MS = 80  # one frame
API_TEMPERATURE = (0.1, 2.0)
ENGINE_TEMPERATURE = (0.0, 2.0)  # 0 = greedy
API_TOPK = (1, 100)  # the engine allows up to its codebook size

# -- defaults of a request that does not say ---------------------------------------------------------------------------
DEFAULT_SPEAKER_ID = 0
DEFAULT_TEMPERATURE = 0.9
DEFAULT_TOPK = 50

# -- context: what the engine accepts, what the proxy's conversation budget aims for -----------------------------------
MODEL_POSITIONS = 2048  # CSM-1B's backbone window: text tokens + context audio frames + generated frames
MAX_CONTEXT_AUDIO_S = 120.0  # ~1500 of the 2048 positions
MAX_CONTEXT_SEGMENTS = 32
MAX_CONTEXT_TEXT_CHARS = 20_000  # all context segments' texts together
CONVERSATION_TOKENS_PER_BYTE = 0.5  # the proxy's generous estimate of text tokens per UTF-8 byte
CONVERSATION_MAX_AUDIO_S = 30.0  # conversation context the proxy sends with one text
CONVERSATION_MAX_SEGMENTS = 8
CONTEXT_SEGMENT_OVERHEAD = 8  # positions of a segment besides its words: speaker tag, text and audio markers

# -- reference clips (a voice to clone) --------------------------------------------------------------------------------
REFERENCE_MAX_BYTES = 768 << 10  # decoded from base64
REFERENCE_MAX_SECONDS = 20.0
MAX_REFERENCE_TEXT_CHARS = 2_000

# -- reason codes: why a request was refused, beyond the Triton code ---------------------------------------------------
# The prompt (text + context) does not fit the model's window. The proxy answers it by dropping the oldest
# conversation segment and retrying. gRPC streams carry only an error's message, so the code leads the message's
# detail: "INVALID_ARG: CONTEXT_TOO_LONG: the prompt takes ...".
CONTEXT_TOO_LONG = "CONTEXT_TOO_LONG"
REASONS = (CONTEXT_TOO_LONG,)
_REASON = re.compile(r"^(" + "|".join(REASONS) + r"): ")


def with_reason(reason: str, detail: str) -> str:
    if reason not in REASONS:
        raise ValueError(f"unknown reason {reason!r}")
    return f"{reason}: {detail}"


def split_reason(detail: str) -> tuple[str | None, str]:
    """(reason, the rest) of a detail made by `with_reason`; (None, detail) when it carries none."""
    match = _REASON.match(detail)
    if match is None:
        return None, detail
    return match.group(1), detail[match.end() :]
