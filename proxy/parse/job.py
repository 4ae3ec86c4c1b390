"""The ONE internal job value every surface's request becomes: what to generate (`GenerateOptions`, one text) and,
for whole requests, with which voice and in which form to answer (`SpeechJob`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from csm_tts import limits
from proxy.formats import FORMATS, AudioFormat
from proxy.voices import Voice


@dataclass(frozen=True)
class GenerateOptions:
    """One text and its generation options: one Triton stream."""

    text: str
    speaker_id: int = limits.DEFAULT_SPEAKER_ID
    max_audio_length_ms: int | None = None  # None: the model's default, which follows the text
    temperature: float = limits.DEFAULT_TEMPERATURE
    topk: int = limits.DEFAULT_TOPK
    watermark: bool | None = None  # None: the server default
    watermark_key: tuple[int, ...] | None = None  # None: the server key
    seed: int | None = None
    normalize: bool = True  # the text is normalised for speech before it is split (proxy/spoken.py)

    def triton_parameters(self, watermark_default: bool | None = None) -> dict:
        """The gRPC request parameters for the `tts` model. `watermark_default` is sent when the request has none
        and the proxy was configured with one (CSM_WATERMARK_ENABLED); otherwise Triton's default applies."""
        params: dict = {"speaker_id": self.speaker_id, "temperature": float(self.temperature), "topk": self.topk}
        if self.max_audio_length_ms is not None:
            params["max_audio_length_ms"] = self.max_audio_length_ms
        if self.seed is not None:
            params["seed"] = self.seed
        watermark = self.watermark if self.watermark is not None else watermark_default
        if watermark is not None:
            params["watermark"] = bool(watermark)
        if self.watermark_key is not None:
            params["watermark_key"] = ",".join(str(v) for v in self.watermark_key)
        return params


class ReferenceClip(NamedTuple):
    """A client's voice to clone, still undecoded: the audio file's bytes and what is said in it."""

    audio: bytes
    text: str


@dataclass(frozen=True)
class SpeechJob:
    """A whole REST / OpenAI request: its generation, its voice (a preset's clip, or the client's own clip, which
    is decoded only after admission) and the answer's form (`format`, and `sse` for OpenAI's event stream)."""

    options: GenerateOptions
    format: AudioFormat = FORMATS["wav"]
    sse: bool = False
    voice: Voice | None = None  # a preset's clip is the first context segment
    reference: ReferenceClip | None = None  # the client's own clip replaces the preset's
