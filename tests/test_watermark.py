"""Streaming silentcipher watermark (csm_tts.watermark) with random weights in silentcipher's layout.

Random weights make speed, lengths and streaming behaviour meaningful, not detection: the detection test needs the
real weights and is marked `real_weights`.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from csm_tts import SAMPLE_RATE
from csm_tts.watermark.detection import decode, key_from_symbols, message_symbols, sdr_db
from csm_tts.watermark.reference import encode_clip, encode_stream
from csm_tts.watermark.streaming import StreamingWatermarker
from csm_tts.watermark.streams import StreamError, StreamGone, TooManyStreams, WatermarkStreams
from csm_tts.watermark.weights import (
    AVERAGE_ENERGY_VCTK,
    WatermarkWeightsMissing,
    load_watermark_model,
    write_random_checkpoint,
)

ROOT = Path(__file__).resolve().parent.parent
KEY = (1, 2, 3, 4, 5)
FRAME = 1920  # one CSM frame: 80 ms at 24 kHz
TOLERANCE = 1e-4


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a busy 2-core machine two threads mostly spin (measured 5-10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("silentcipher-random")
    load_script("make_tiny_watermark_checkpoint").make_tiny_watermark_checkpoint(out, seed=0)
    return out


@pytest.fixture(scope="module")
def model(weights_dir):
    return load_watermark_model(weights_dir)


def speech_like(seconds: float, seed: int = 0, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Voiced segments (gliding harmonics), a noisy burst, a pause and leading silence: deterministic."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 25))
    envelope = np.clip(np.sin(2 * np.pi * 1.3 * t), 0, None) ** 0.5
    x = 0.15 * voiced * envelope + 0.01 * rng.standard_normal(n)
    burst = x[int(0.1 * rate) : int(0.25 * rate)]
    burst += 0.1 * rng.standard_normal(burst.size)
    x[: int(0.05 * rate)] = 0  # leading digital silence
    x[int(0.45 * n) : int(0.5 * n)] *= 0.01  # a pause
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def utterance() -> np.ndarray:
    return speech_like(4.2)


@pytest.fixture(scope="module")
def whole(model, utterance) -> np.ndarray:
    """The streaming encoder fed the whole utterance in one push."""
    return encode_stream(model, [utterance], KEY)


def random_chunks(x: np.ndarray, seed: int, low: int, high: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes, total = [], 0
    while total < x.size:
        sizes.append(int(rng.integers(low, high + 1)))
        total += sizes[-1]
    return np.split(x, np.cumsum(sizes)[:-1])


def stream(model, chunks, **options) -> tuple[np.ndarray, list[int]]:
    """Streamed output and the output length of each push (then flush)."""
    watermarker = StreamingWatermarker(model, KEY, **options)
    parts = [watermarker.push(chunk) for chunk in chunks]
    parts.append(watermarker.flush())
    return np.concatenate(parts), [p.size for p in parts]


CHUNKINGS = {
    "one-frame": lambda x: np.split(x, np.arange(FRAME, x.size, FRAME)),
    "frames-to-seconds": lambda x: random_chunks(x, 1, FRAME, 3 * SAMPLE_RATE),  # 80 ms .. 3 s
    "odd-sizes": lambda x: random_chunks(x, 2, 1, 5000),  # also far smaller than a frame
}


@pytest.mark.parametrize("chunking", sorted(CHUNKINGS))
def test_streamed_output_does_not_depend_on_chunking(model, utterance, whole, chunking):
    chunks = CHUNKINGS[chunking](utterance)
    out, lengths = stream(model, chunks)
    assert out.shape == utterance.shape and sum(lengths) == utterance.size
    assert np.abs(out - whole).max() <= TOLERANCE
    # No discontinuity at chunk borders: the watermark's sample-to-sample steps there are those of the one-shot run.
    borders = np.cumsum([c.size for c in chunks])[:-1]
    step = np.diff(out - utterance)
    step_whole = np.diff(whole - utterance)
    assert np.abs(step[borders - 1] - step_whole[borders - 1]).max() <= 2 * TOLERANCE


def test_output_length_and_hold_back(model):
    """push() returns what is complete; pending_samples is the delay this stage adds (80 ms chunks, the default)."""
    x = speech_like(2.0, seed=8)
    watermarker = StreamingWatermarker(model, KEY)
    pending = []
    total = received = 0
    for chunk in CHUNKINGS["one-frame"](x):
        total += watermarker.push(chunk).size
        received += chunk.size
        pending.append(watermarker.pending_samples)
        assert total + watermarker.pending_samples == received
    total += watermarker.flush().size
    assert total == x.size and watermarker.pending_samples == 0
    held_ms = np.array(pending[5:]) / SAMPLE_RATE * 1000
    print(f"held back: mean {held_ms.mean():.0f} ms, max {held_ms.max():.0f} ms")
    # STFT: 1-2 hops of 46 ms; soxr HQ up and down: the rest. Measured: mean ~110 ms, max ~141 ms.
    assert held_ms.max() < 160
    assert watermarker.flush().size == 0  # a second flush has nothing left
    with pytest.raises(RuntimeError, match="after flush"):
        watermarker.push(x[:10])


def test_default_lookahead_equals_the_whole_clip_reference_with_the_same_settings(model, utterance, whole):
    reference = encode_clip(model, utterance, KEY, lookahead_frames=0)
    assert np.abs(reference - whole).max() <= TOLERANCE


def test_full_lookahead_matches_the_whole_clip_reference(model, utterance):
    full = model.receptive_field_frames
    assert full == 6  # 3 encoder + 3 decoder 3x3 layers of the 44.1 kHz model
    x = utterance[: int(2.5 * SAMPLE_RATE)]
    out, _ = stream(model, random_chunks(x, 3, FRAME, SAMPLE_RATE), lookahead_frames=full)
    reference = encode_clip(model, x, KEY)  # every layer sees the real next frame
    assert np.abs(out - reference).max() <= TOLERANCE


def test_reference_with_clip_statistics_is_silentcipher_encode_wav(model, weights_dir, monkeypatch):
    """At 44.1 kHz with whole-clip statistics, our frames, networks, message framing and overlap-add reproduce the
    library's own encoder (which the streaming encoder only changes where a statistic must become causal)."""
    monkeypatch.setitem(sys.modules, "pydub", types.SimpleNamespace(AudioSegment=None))  # server.py imports it
    from silentcipher.server import Model  # only after the pydub stand-in above

    config = argparse.Namespace(**yaml.safe_load((weights_dir / "hparams.yaml").read_text()))
    config.load_ckpt = str(weights_dir)
    library = Model(config, "cpu")
    x = speech_like(1.2, seed=3, rate=44100)
    expected, _ = library.encode_wav(x, 44100, list(KEY), message_sdr=36)
    ours = encode_clip(model, x, KEY, sample_rate=44100, statistics="clip", message_sdr=36)
    assert np.abs(ours - expected).max() <= 1e-5
    assert sdr_db(expected - x, ours - x) > 60  # the watermark itself, not just the signal, matches

    # The detector too: our per-frame symbols are the library's dec_m argmax.
    y = x * np.sqrt(AVERAGE_ENERGY_VCTK / np.mean(x.astype(np.float64) ** 2))
    with torch.no_grad():
        carrier, _ = library.stft.transform(torch.from_numpy(y.astype(np.float32))[None])
        scores = library.dec_m[0](carrier[:, None])
    assert np.array_equal(message_symbols(model, x, 44100), scores[0, 0].argmax(0).numpy())


def test_watermark_strength(model, utterance, whole):
    sdr = sdr_db(utterance, whole)
    print(f"SDR at message_sdr 36: {sdr:.1f} dB")
    assert 30 < sdr < 50
    x = utterance[: int(1.5 * SAMPLE_RATE)]
    assert sdr_db(x, encode_clip(model, x, KEY, lookahead_frames=0, message_sdr=26)) < sdr_db(x, whole[: x.size]) - 5


def test_silence_passes_through_unchanged(model):
    silence = np.zeros(SAMPLE_RATE // 2, np.float32)
    out, _ = stream(model, np.split(silence, [1000, 5000]))
    assert np.array_equal(out, silence)


@pytest.mark.parametrize("n", [0, 1, 100, 3000])
def test_short_streams_keep_their_length(model, n):
    x = speech_like(0.2)[:n]
    out, _ = stream(model, [x])
    assert out.size == n


def test_key_is_validated(model):
    with pytest.raises(ValueError, match="key"):
        StreamingWatermarker(model, (1, 2, 3, 4))
    with pytest.raises(ValueError, match="key"):
        StreamingWatermarker(model, (1, 2, 3, 4, 256))
    with pytest.raises(ValueError, match="lookahead_frames"):
        StreamingWatermarker(model, KEY, lookahead_frames=7)


def test_streams_on_threads_do_not_interfere(model):
    """Instances share only read-only weights (no library STFT singleton, no BatchNorm running statistics)."""
    signals = [speech_like(0.8, seed=s) for s in (4, 5)]
    solo = [encode_stream(model, [s], KEY) for s in signals]
    results = [None, None]

    def run(i):
        results[i] = stream(model, CHUNKINGS["one-frame"](signals[i]))[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, expected in zip(results, solo, strict=True):
        assert np.abs(got - expected).max() <= TOLERANCE


def test_key_from_symbols():
    bits = "".join(f"{v:08b}" for v in KEY)
    symbols = [int(bits[i : i + 2], 2) + 1 for i in range(0, 40, 2)] + [0]
    # Three periods read from frame 7 on (the decoder rotates to the end symbol) with one wrong symbol.
    frames = np.array((symbols * 4)[7 : 7 + 63])
    frames[10] = 4
    key, confidence = key_from_symbols(frames, 21, 5)
    assert key == KEY and 0.98 < confidence < 1
    assert key_from_symbols(np.ones(63, np.int64), 21, 5)[0] is None  # no end symbol
    assert key_from_symbols(np.zeros(10, np.int64), 21, 5) == (None, 0.0)  # shorter than a period


def test_checkpoint_is_deterministic_and_in_silentcipher_layout(weights_dir, tmp_path):
    names = {p.name for p in weights_dir.iterdir()}
    assert names == {"hparams.yaml", "enc_c.ckpt", "dec_c.ckpt", "dec_m_0.ckpt", ".complete"}
    state = torch.load(weights_dir / "enc_c.ckpt", weights_only=True)
    assert all(k.startswith("module.") for k in state)  # as the released DataParallel checkpoints
    write_random_checkpoint(tmp_path, seed=0)
    again = torch.load(tmp_path / "enc_c.ckpt", weights_only=True)
    assert all(torch.equal(state[k], again[k]) for k in state)


def test_missing_weights_give_a_clear_error(tmp_path, weights_dir):
    with pytest.raises(FileNotFoundError) as info:
        load_watermark_model(tmp_path / "nowhere")
    message = str(info.value)
    assert "scripts/download_weights.py" in message and "scripts/make_tiny_watermark_checkpoint.py" in message
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("hparams.yaml", "enc_c.ckpt", "dec_c.ckpt"):
        (partial / name).write_bytes((weights_dir / name).read_bytes())
    with pytest.raises(WatermarkWeightsMissing, match="dec_m_0.ckpt"):
        load_watermark_model(partial)


def test_hub_is_never_contacted(weights_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append((a, k)))
    load_watermark_model(weights_dir)
    with pytest.raises(FileNotFoundError):
        load_watermark_model(tmp_path)
    assert calls == []
    # Loading never imports silentcipher's server.py (its get_model falls back to the hub) nor its STFT singleton.
    code = (
        "import sys; from csm_tts.watermark.weights import load_watermark_model; "
        f"load_watermark_model({str(weights_dir)!r}); "
        "bad = [m for m in ('silentcipher.server', 'silentcipher.stft', 'huggingface_hub', 'pydub') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_verify_script(weights_dir, model, tmp_path, capsys):
    verify = load_script("verify_watermark").main
    path = tmp_path / "clip.wav"
    sf.write(path, speech_like(3.2, seed=6), SAMPLE_RATE)
    # Random weights cannot detect anything: the script runs one 2.93 s window and reports "not found".
    assert verify([str(path), "--key", "1,2,3,4,5", "--model-dir", str(weights_dir)]) == 1
    output = capsys.readouterr()
    assert "NOT FOUND" in output.out and "random test weights" in output.err
    assert verify([str(path), "--key", "1,2,3,4", "--model-dir", str(weights_dir)]) == 2
    assert verify([str(path), "--key", "1,2,3,4,5", "--model-dir", str(tmp_path / "none")]) == 2
    assert verify([str(tmp_path / "missing.wav"), "--key", "1,2,3,4,5", "--model-dir", str(weights_dir)]) == 2
    with pytest.raises(SystemExit) as info:
        verify([str(path)])
    assert info.value.code == 2


REAL_WEIGHTS = os.environ.get("CSM_WATERMARK_MODEL_DIR", "")


@pytest.mark.real_weights
@pytest.mark.skipif(
    not REAL_WEIGHTS
    or not (Path(REAL_WEIGHTS) / "hparams.yaml").exists()
    and not (Path(REAL_WEIGHTS) / "44_1_khz" / "73999_iteration" / "hparams.yaml").exists(),
    reason="needs the real silentcipher weights: set CSM_WATERMARK_MODEL_DIR to a copy of sony/silentcipher "
    "(not available on development machines)",
)
@pytest.mark.parametrize("lookahead", [0, 6])
def test_real_weights_stream_is_detected(tmp_path, capsys, lookahead):
    real = load_watermark_model(REAL_WEIGHTS)
    if "Random weights" in (real.model_dir / "hparams.yaml").read_text():
        pytest.skip("CSM_WATERMARK_MODEL_DIR holds random test weights, not the real ones")
    x = speech_like(6.5, seed=7)
    out, _ = stream(real, CHUNKINGS["frames-to-seconds"](x), lookahead_frames=lookahead)
    path = tmp_path / "marked.wav"
    sf.write(path, out, SAMPLE_RATE)
    verify = load_script("verify_watermark").main
    assert verify([str(path), "--key", "1,2,3,4,5", "--model-dir", REAL_WEIGHTS]) == 0
    assert verify([str(path), "--key", "1,2,3,4,6", "--model-dir", REAL_WEIGHTS]) == 1
    clean = tmp_path / "clean.wav"
    sf.write(clean, x, SAMPLE_RATE)
    assert verify([str(clean), "--key", "1,2,3,4,5", "--model-dir", REAL_WEIGHTS]) == 1
    assert decode(real, out).key == KEY


# ---- WatermarkStreams: the per-stream state the Triton `watermarker` model keeps


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def chunked(x: np.ndarray, sizes: list[int]) -> list[tuple[np.ndarray, int]]:
    """(chunk, sample_offset) pairs."""
    bounds = np.cumsum([0] + sizes)
    return [(x[a:b], int(a)) for a, b in itertools.pairwise(bounds)]


def test_streams_apply_chunks_in_order_and_forget_finished_streams(model):
    x = speech_like(0.6, seed=9)
    parts = chunked(x, [3840, 7680, x.size - 11520])
    streams = WatermarkStreams(model)
    results = [streams.process("a", KEY, "k-test", c, i, offset, i == 2) for i, (c, offset) in enumerate(parts)]
    assert [(r.chunk_index, r.is_last, r.watermarked, r.key_id) for r in results] == [
        (0, False, True, "k-test"),
        (1, False, True, "k-test"),
        (2, True, True, "k-test"),
    ]
    out = np.concatenate([r.audio for r in results])
    assert np.abs(out - encode_stream(model, [c for c, _ in parts], KEY)).max() <= TOLERANCE
    assert "a" not in streams and len(streams) == 0

    # Early chunks wait for their predecessors; the response that fills the gap carries the audio and is_last.
    def send(index):
        chunk, offset = parts[index]
        return streams.process("b", KEY, "k-test", chunk, index, offset, index == 2)

    first, early, last = send(0), send(2), send(1)
    assert (early.audio.size, early.is_last) == (0, False)
    assert last.is_last and last.chunk_index == 2
    assert np.abs(np.concatenate([first.audio, last.audio]) - out).max() <= TOLERANCE


def test_streams_without_watermark_pass_audio_unchanged(model):
    x = speech_like(0.3, seed=10)
    streams = WatermarkStreams(model)
    first = streams.process("off", None, "none", x[:2000], 0, 0, False)
    second = streams.process("off", None, "none", x[2000:], 1, 2000, True)
    assert np.array_equal(np.concatenate([first.audio, second.audio]), x)
    assert (first.watermarked, first.key_id, second.is_last) == (False, "none", True)


def test_streams_reject_chunks_that_do_not_fit(model):
    x = np.zeros(1920, np.float32)
    streams = WatermarkStreams(model, max_streams=2)
    streams.process("a", None, "none", x, 0, 0, False)
    with pytest.raises(StreamError, match="arrived twice"):
        streams.process("a", None, "none", x, 0, 0, False)
    assert "a" not in streams  # a broken stream keeps nothing
    streams.process("a", None, "none", x, 0, 0, False)
    with pytest.raises(StreamError, match="starts at sample 5"):
        streams.process("a", None, "none", x, 1, 5, False)
    with pytest.raises(StreamError, match="first chunk must be chunk 0"):
        streams.process("late", None, "none", x, 3, 5760, False)
    streams.process("b", None, "none", x, 0, 0, False)
    streams.process("c", None, "none", x, 0, 0, False)
    with pytest.raises(TooManyStreams):
        streams.process("d", None, "none", x, 0, 0, False)
    assert streams.drop("c")
    with pytest.raises(StreamGone, match="stream c was cancelled"):
        streams.process("c", None, "none", x, 1, 1920, False)


def test_idle_streams_are_evicted(model):
    clock = FakeClock()
    streams = WatermarkStreams(model, idle_timeout_s=30, clock=clock)
    x = np.zeros(1920, np.float32)
    streams.process("quiet", KEY, "k", x, 0, 0, False)
    clock.now += 20
    streams.process("busy", None, "none", x, 0, 0, False)
    assert streams.evict_idle() == []
    clock.now += 15
    gone = streams.evict_idle()
    assert [(g.stream_id, g.chunks) for g in gone] == [("quiet", 1)] and gone[0].idle_s == pytest.approx(35)
    assert "quiet" not in streams and "busy" in streams
    # Its late chunks fail clearly instead of starting a stream that waits forever for chunk 0.
    with pytest.raises(StreamGone, match="without chunks"):
        streams.process("quiet", KEY, "k", x, 1, 1920, False)
