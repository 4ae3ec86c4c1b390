"""Voices: named presets of reference audio + transcript (CSM context segments), speaker ids, OpenAI's voice names.

CSM-1B has no fixed voices: it continues the voice of its context. A preset is one reference clip and what is said
in it; every request with that voice gets the clip as its first context segment, so the model speaks on in that
voice. A plain speaker id (0-31) is only a speaker tag: without context the model picks a voice per generation.

Presets come from CSM_VOICES_DIR (docs/api.md): for each voice a file pair `NAME.wav` (or .flac, .mp3, .ogg, .opus)
+ `NAME.txt` (its transcript, UTF-8), and optionally `NAME.json` (`{"speaker_id": 3, "description": "..."}`).
OpenAI's names (alloy, echo, ...) map to presets or speaker ids through a table (PROXY_OPENAI_VOICES).

Reference audio from clients (`reference_audio`, checked and base64-decoded by proxy/parse/reference.py) is decoded
here too: by libsndfile (soundfile), which has no network code at all, bounded in seconds while decoding, then
resampled to 24 kHz mono with soxr; `decode_reference` is CPU work, called through the bounded thread pool
(proxy/render/offload.py) and only after admission. Plain Python (no aiohttp): callers turn `InvalidReference` into
their API's error.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from csm_tts import SAMPLE_RATE, SAMPLES_PER_FRAME
from csm_tts.limits import MAX_SPEAKER_ID
from csm_tts.parsing import shown
from csm_tts.speech.request import ContextSegment

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus")
# libsndfile's names of the containers accepted as reference audio (WAV, FLAC, MP3, Ogg with Opus or Vorbis).
REFERENCE_CONTAINERS = ("WAV", "WAVEX", "RF64", "FLAC", "MP3", "OGG")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# OpenAI's built-in voice names -> speaker ids, until PROXY_OPENAI_VOICES says otherwise.
OPENAI_VOICE_NAMES = (
    "alloy",
    "ash",
    "ballad",
    "coral",
    "echo",
    "fable",
    "onyx",
    "nova",
    "sage",
    "shimmer",
    "verse",
    "marin",
    "cedar",
)
DEFAULT_OPENAI_VOICES = tuple((name, str(i)) for i, name in enumerate(OPENAI_VOICE_NAMES))


class InvalidReference(ValueError):
    """Bad reference audio or text: `status` 413 (too many bytes) or 422 (anything else), `field` names the field."""

    def __init__(self, message: str, field: str = "reference_audio", status: int = 422):
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status


class UnknownVoice(ValueError):
    def __init__(self, name: object, available: Sequence[str]):
        # Cut: a client may send a 100 kB name, and the error would echo it whole.
        named = shown(name, 60) if isinstance(name, str) else type(name).__name__
        super().__init__(f"Unknown voice {named}; available voices: {', '.join(available)}")
        self.available = list(available)


class VoiceConfigError(ValueError):
    """The voices directory or the OpenAI voice table is invalid; the message names the file or entry."""


# -- decoding ------------------------------------------------------------------------------------------------------
MAX_RATE = 192_000
# Samples (rate x channels x seconds) a clip may cost to decode: stereo at the highest accepted rate for the whole
# allowed length. What a header promises beyond it (a 31 kB FLAC of silence can announce 20 s at 192 kHz x 8
# channels: 1.3 s of CPU and ~120 MB) is refused before the decoder runs.
BUDGET_CHANNELS = 2
# Loudest sample accepted: float files may go past full scale a little; 1e30 is not audio.
MAX_PEAK = 16.0


def decode_reference(data: bytes, max_seconds: float, field: str = "reference_audio") -> np.ndarray:
    """Audio file bytes -> float32 24 kHz mono. Refuses what is not WAV/FLAC/MP3/Ogg, longer than `max_seconds`
    (counted while decoding, so a header that lies costs nothing) or shorter than one 80 ms frame."""
    import soundfile
    import soxr

    try:
        sound = soundfile.SoundFile(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        reason = getattr(e, "error_string", None) or str(e)  # without "Error opening <BytesIO ...>"
        raise InvalidReference(
            f"{field} is not a readable audio file (WAV, FLAC, MP3 or Ogg/Opus): {reason}", field
        ) from None
    with sound:
        if sound.format not in REFERENCE_CONTAINERS:
            raise InvalidReference(f"{field} is {sound.format}; send WAV, FLAC, MP3 or Ogg/Opus", field)
        rate = sound.samplerate
        if not 8000 <= rate <= MAX_RATE:
            raise InvalidReference(f"{field} has a sample rate of {rate} Hz; 8000-{MAX_RATE} Hz are accepted", field)
        limit = int(max_seconds * rate)
        # A streamed FLAC's header says "length unknown", which libsndfile reports as huge: the limit counts then.
        promised = min(sound.frames, limit) * sound.channels
        budget = int(max_seconds * MAX_RATE * BUDGET_CHANNELS)
        if promised > budget:
            raise InvalidReference(
                f"{field} would decode to {promised} samples ({sound.channels} channels at {rate} Hz for "
                f"{min(sound.frames, limit) / rate:.1f} s); the budget is {budget} (stereo at {MAX_RATE} Hz for "
                f"{max_seconds:g} s)",
                field,
                status=413,
            )
        try:
            audio = sound.read(frames=limit + 1, dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError) as e:
            reason = getattr(e, "error_string", None) or str(e)
            raise InvalidReference(f"{field} could not be decoded: {reason}", field) from None
    if audio.shape[0] > limit:
        raise InvalidReference(f"{field} is longer than the limit of {max_seconds:g} s", field)
    if not np.isfinite(audio).all():
        raise InvalidReference(f"{field} holds samples that are not finite numbers", field)
    peak = float(np.abs(audio).max()) if audio.size else 0.0  # before the mix: +x and -x in two channels cancel
    if peak > MAX_PEAK:
        raise InvalidReference(f"{field} has a peak of {peak:.3g}; samples beyond +-{MAX_PEAK:g} are not audio", field)
    mono = audio.mean(axis=1, dtype=np.float32)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    if mono.size < SAMPLES_PER_FRAME:
        raise InvalidReference(f"{field} holds less than 80 ms of audio", field)
    return mono


# -- voices --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Voice:
    name: str
    speaker_id: int
    reference: ContextSegment | None = None  # the preset's clip and transcript, the first context segment
    description: str = ""
    alias_of: str | None = None  # for OpenAI names: the preset or speaker id it stands for

    def public(self) -> dict:
        body: dict = {"id": self.name, "name": self.name, "speaker_id": self.speaker_id}
        body["type"] = "preset" if self.reference is not None else "speaker"
        if self.reference is not None:
            body["reference_seconds"] = round(self.reference.audio.size / SAMPLE_RATE, 3)
            body["reference_text"] = self.reference.text
        if self.alias_of is not None:
            body["alias_of"] = self.alias_of
        if self.description:
            body["description"] = self.description
        return body


@dataclass
class VoiceBook:
    presets: dict[str, Voice] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # OpenAI name -> preset name or speaker id

    @classmethod
    def load(
        cls, voices_dir: str | Path | None, table: Sequence[tuple[str, str]] = DEFAULT_OPENAI_VOICES, max_seconds=20.0
    ) -> VoiceBook:
        presets = load_presets(Path(voices_dir), max_seconds) if voices_dir else {}
        book = cls(presets=presets)
        for name, target in table:
            if name in presets:
                raise VoiceConfigError(f"PROXY_OPENAI_VOICES: {name!r} is also a preset in the voices directory")
            if not (target in presets or _speaker(target) is not None):
                raise VoiceConfigError(
                    f"PROXY_OPENAI_VOICES: {name}={target}: not a preset in the voices directory nor a speaker id "
                    f"0-{MAX_SPEAKER_ID}"
                )
            book.aliases[name] = target
        return book

    @classmethod
    def from_settings(cls, settings) -> VoiceBook:
        return cls.load(settings.voices_dir, settings.openai_voices, settings.reference_max_seconds)

    def names(self) -> list[str]:
        return [*self.aliases, *sorted(self.presets)]

    def resolve(self, name: object) -> Voice:
        """A voice by name: an OpenAI name from the table, a preset, or a speaker id ("0"-"31")."""
        if not isinstance(name, str):
            raise UnknownVoice(name, self.names() + [f"0-{MAX_SPEAKER_ID}"])
        if name in self.aliases:
            target = self.aliases[name]
            base = self.presets.get(target) or Voice(target, _speaker(target))
            return Voice(name, base.speaker_id, base.reference, base.description, alias_of=target)
        if name in self.presets:
            return self.presets[name]
        speaker = _speaker(name)
        if speaker is not None:
            return Voice(name, speaker)
        raise UnknownVoice(name, self.names() + [f"0-{MAX_SPEAKER_ID}"])

    def listing(self) -> list[dict]:
        return [self.resolve(name).public() for name in self.names()]


def _speaker(value: str) -> int | None:
    if value.isascii() and value.isdigit() and len(value) <= 2 and int(value) <= MAX_SPEAKER_ID:
        return int(value)
    return None


def parse_voice_table(raw: str) -> tuple[tuple[str, str], ...]:
    """PROXY_OPENAI_VOICES: `alloy=0,echo=narrator,...` (name=speaker id or preset name); it replaces the default."""
    pairs = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, target = (part.strip() for part in item.partition("="))
        if not sep or not NAME.match(name) or not NAME.match(target):
            raise ValueError(f"{item!r} is not name=speaker_id or name=preset")
        pairs.append((name, target))
    if len({name for name, _ in pairs}) != len(pairs):
        raise ValueError("a voice name appears twice")
    return tuple(pairs)


def load_presets(directory: Path, max_seconds: float) -> dict[str, Voice]:
    if not directory.is_dir():
        raise VoiceConfigError(f"CSM_VOICES_DIR={directory}: not a directory")
    presets: dict[str, Voice] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() not in AUDIO_SUFFIXES or not path.is_file():
            continue
        name = path.stem
        where = f"CSM_VOICES_DIR: {path.name}"
        if not NAME.match(name) or _speaker(name) is not None:
            raise VoiceConfigError(f"{where}: a voice name is letters, digits, '_', '-', '.' (and not a number)")
        if name in presets:
            raise VoiceConfigError(f"{where}: voice {name!r} has more than one audio file")
        transcript = path.with_suffix(".txt")
        if not transcript.is_file():
            raise VoiceConfigError(f"{where}: its transcript {transcript.name} is missing")
        text = transcript.read_text(encoding="utf-8").strip()
        if not text:
            raise VoiceConfigError(f"{where}: its transcript {transcript.name} is empty")
        meta = _read_meta(path.with_suffix(".json"))
        speaker = meta.get("speaker_id", 0)
        if isinstance(speaker, bool) or not isinstance(speaker, int) or not 0 <= speaker <= MAX_SPEAKER_ID:
            raise VoiceConfigError(f"{where}: speaker_id must be an integer 0-{MAX_SPEAKER_ID}")
        try:
            audio = decode_reference(path.read_bytes(), max_seconds, field=path.name)
        except InvalidReference as e:
            raise VoiceConfigError(f"CSM_VOICES_DIR: {e.message}") from None
        presets[name] = Voice(name, speaker, ContextSegment(speaker, text, audio), str(meta.get("description", "")))
    return presets


def _read_meta(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise VoiceConfigError(f"CSM_VOICES_DIR: {path.name}: invalid JSON: {e}") from None
    if not isinstance(meta, dict) or set(meta) - {"speaker_id", "description"}:
        raise VoiceConfigError(f"CSM_VOICES_DIR: {path.name}: an object with speaker_id and/or description")
    return meta
