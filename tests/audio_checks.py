"""Independent decoders for the audio the proxy encodes: FFmpeg's command-line tools (Debian's ffmpeg package, which
`make setup` installs when ffprobe is missing) and libsndfile (soundfile). Neither shares code with the encoder side
(PyAV bundles its own FFmpeg libraries)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import numpy as np
import pytest
import soundfile

# What each response_format is, as ffprobe names it.
CODECS = {"mp3": "mp3", "opus": "opus", "aac": "aac", "flac": "flac", "wav": "pcm_s16le", "pcm": "pcm_s16le"}
SAMPLE_RATES = {"opus": 48_000}  # the others are the model's 24 kHz
# Extra decoded samples (at the format's rate) a lossy encoder may add: MP3's encoder delay and last-frame padding
# (~1105 + 576), AAC's priming and padding (1024 + 1024). No container here records them for the decoder to trim.
PADDING = {"mp3": 2 * 1152, "aac": 3 * 1024}
LOSSLESS = ("wav", "flac", "pcm")
# libsndfile reads these. Not AAC (no decoder), and not a streamed FLAC: its header says "length unknown" (total
# samples 0, as in any live FLAC stream) and libsndfile 1.2 fails a seek at the end of such a file.
LIBSNDFILE = ("mp3", "opus", "wav", "pcm")


def tools() -> tuple[str, str]:
    ffprobe, ffmpeg = shutil.which("ffprobe"), shutil.which("ffmpeg")
    if not ffprobe or not ffmpeg:
        pytest.fail("ffprobe/ffmpeg are missing: `make setup` installs Debian's ffmpeg", pytrace=False)
    return ffprobe, ffmpeg


def raw_input(fmt: str) -> list[str]:
    return ["-f", "s16le", "-ar", "24000", "-ac", "1"] if fmt == "pcm" else []


def ffprobe(data: bytes, fmt: str) -> dict:
    """The first audio stream as ffprobe reports it (codec_name, sample_rate, channels, ...)."""
    ffprobe_bin, _ = tools()
    result = subprocess.run(
        [ffprobe_bin, "-v", "error", *raw_input(fmt), "-show_streams", "-of", "json", "-i", "pipe:0"],
        input=data,
        capture_output=True,
        check=True,
    )
    streams = json.loads(result.stdout)["streams"]
    assert len(streams) == 1, streams
    return streams[0]


def ffmpeg_decode(data: bytes, fmt: str) -> np.ndarray:
    """Every sample, as 16-bit mono at the stream's own rate, decoded by the ffmpeg command-line tool."""
    _, ffmpeg_bin = tools()
    result = subprocess.run(
        [ffmpeg_bin, "-v", "error", *raw_input(fmt), "-i", "pipe:0", "-f", "s16le", "-ac", "1", "pipe:1"],
        input=data,
        capture_output=True,
        check=True,
    )
    assert not result.stderr, result.stderr.decode(errors="replace")
    return np.frombuffer(result.stdout, "<i2")


def libsndfile_decode(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    """(int16 samples, sample rate) as libsndfile reads them."""
    if fmt == "pcm":
        sound = soundfile.SoundFile(
            io.BytesIO(data), format="RAW", subtype="PCM_16", samplerate=24000, channels=1, endian="LITTLE"
        )
    else:
        sound = soundfile.SoundFile(io.BytesIO(data))
    with sound:
        return sound.read(dtype="int16"), sound.samplerate


def check_audio(data: bytes, fmt: str, samples_24k: int) -> np.ndarray:
    """`data` is a complete `fmt` file of `samples_24k` model samples: codec, sample rate and duration as ffprobe and
    ffmpeg see them (and libsndfile, for the formats it reads). Returns ffmpeg's decode."""
    stream = ffprobe(data, fmt)
    rate = SAMPLE_RATES.get(fmt, 24000)
    assert (stream["codec_name"], int(stream["sample_rate"]), stream["channels"]) == (CODECS[fmt], rate, 1), stream
    expected = samples_24k * rate // 24000
    decoded = ffmpeg_decode(data, fmt)
    assert expected <= decoded.size <= expected + PADDING.get(fmt, 0), (fmt, decoded.size, expected)
    if fmt in LIBSNDFILE:
        by_libsndfile, sf_rate = libsndfile_decode(data, fmt)
        assert sf_rate == rate and expected <= by_libsndfile.size <= expected + PADDING.get(fmt, 0)
        if fmt in LOSSLESS:
            assert np.array_equal(by_libsndfile, decoded)
    return decoded
