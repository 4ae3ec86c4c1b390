"""CSM-1B at its real size with random weights, in-process (no Triton): the old and the new engine path side by side.

    python scripts/bench_gpu.py --json out.json              # one CUDA GPU, bf16: the whole measurement, ~3-5 min
    python scripts/bench_gpu.py --quick --json out.json      # a shorter pass
    python scripts/bench_gpu.py --device cpu --frames 4 --single-frames 4 --runs 1 --concurrency 1,2   # shows it works

Needs only torch, transformers (and what transformers itself installs: tokenizers) and numpy, plus this repository's
`csm_tts` package, which it imports from the checkout: no download, no network, no other project dependency. The
model is `CsmConfig()` as transformers defines it, i.e. the shapes of `sesame/csm-1b`: a Llama-3.2-1B-sized backbone
(16 layers x 2048), the depth decoder (4 layers x 1024) and the full Mimi codec, with random weights, in bf16 on
CUDA (fp32 on CPU), SDPA attention as the server loads it. Text goes through a tiny byte-level tokenizer whose ids stay
inside the 128256-entry text vocab, so nothing has to be downloaded; prompt lengths therefore differ a little from the
real Llama tokenizer's.

Two engine paths share the model: "old" is the engine before fixed slots (`csm_tts.tooling.baseline_engine`:
per-stream caches, left-padded batches, host synchronisation inside a frame), "new" is `CsmEngine` (fixed batch
slots, sync-free frame), run eagerly ("new-eager") and, on CUDA, replaying the frame step as CUDA graphs ("new").
Every request is seeded and fixed-length (ignore EOS). In this order, each part saved to the JSON as soon as it ends:

1. model build and CUDA graph capture (count, seconds);
2. frame step: the wall time of one batched frame at each --concurrency level, per path, and the largest batch whose
   frame fits the real-time budget (80 ms) and the no-stall budget of the default chunk schedule (40 ms: chunks that
   double need RTF <= 0.5);
3. per part, at --breakdown-streams (default 1 and 8), device synchronised around each part: prefill (per stream),
   codebook 0 + the 31 depth-decoder steps, the backbone step, codec decode (per stream and frame: one stream at a
   time on the old path, a round's chunks in one batched call on the new); old and new-eager;
4. the codec stage (`CodecSlots`, csm_tts/speech/codec_stream.py) at each --concurrency level: ms per output round
   in which every stream brings a chunk of the schedule's first and largest size, in one batched call and one call per
   stream (--codec-rounds timed rounds, median); then the watermark (silentcipher's full-size networks, random
   weights) per chunk at each level, one stream's chunk at a time, unbatched (the served watermarker batches streams
   in passes: `scripts/bench_watermark.py --device cuda` measures that): only when silentcipher, soxr and pyyaml are
   importable (a note says otherwise);
5. one stream through `CsmEngine.generate`: time to first audio (default chunk schedule), frames/s, RTF; both paths;
6. concurrent streams through `StreamScheduler` (all submitted at once): aggregate audio s/s, TTFA p50/p99, worst
   RTF, stalls (a chunk arriving after the audio before it finished playing), peak GPU memory; the new path at every
   level, the old one up to --old-max-streams. The largest level with no error, worst RTF < 1 and no stall is the
   real-time count;
7. with --compile: `torch.compile(fullgraph=True, dynamic=False)` of the frame step, eagerly and inside the CUDA
   graphs, at 1 and 8 streams (compiling takes minutes: opt-in).

A global time budget (--budget-s, counted from start-up) skips what would overrun, with a note, so the script always
finishes and writes its JSON. The full stack (Triton, the `tts` ensemble, the watermark) is measured by
`scripts/bench_stream.py` against a running server.
"""

from __future__ import annotations

import time

START = time.monotonic()  # the time budget counts imports and model construction too

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # csm_tts from the checkout (it is not installed on a bare GPU machine)

from csm_tts import FRAME_MS, SAMPLE_RATE  # noqa: E402
from csm_tts.speech.checkpoint import ATTENTION, CHAT_TEMPLATE  # noqa: E402
from csm_tts.speech.chunk_schedule import ChunkSchedule  # noqa: E402
from csm_tts.speech.engine import CsmEngine  # noqa: E402
from csm_tts.speech.request import GenerationRequest  # noqa: E402
from csm_tts.speech.scheduler import StreamScheduler  # noqa: E402
from csm_tts.tooling.baseline_engine import BaselineEngine  # noqa: E402
from csm_tts.tooling.codec_timing import time_codec_rounds  # noqa: E402
from csm_tts.tooling.stream_stats import percentile, playback_stalls  # noqa: E402
from csm_tts.tooling.tiny_checkpoints import (  # noqa: E402
    TINY_SPECIAL_TOKENS,
    randomize_codec,
    tiny_config,
    tiny_tokenizer,
)

TEXTS_FILE = ROOT / "benchmarks" / "texts.json"
DEFAULT_CONCURRENCY = "1,2,4,8,16,24,32,40,48,56,64"
QUICK = {"frames": 24, "single_frames": 40, "runs": 1, "concurrency": "1,8,32,64", "budget_s": 170.0}
REAL_TIME_FRAME_MS = FRAME_MS  # one frame of audio per frame step
NO_STALL_FRAME_MS = FRAME_MS / ChunkSchedule().growth  # chunks growing by g need RTF <= 1/g
# The real CSM-1B (sesame/csm-1b config.json) as transformers' CsmConfig() defaults describe it; checked at start-up
# so that a transformers release with other defaults cannot silently benchmark another model.
REAL_SHAPES = {
    "backbone": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "text_vocab_size": 128256,
        "vocab_size": 2051,
        "num_codebooks": 32,
        "max_position_embeddings": 2048,
    },
    "depth_decoder": {
        "hidden_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 8192,
    },
    "codec": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "codebook_size": 2048,
        "num_quantizers": 32,
        "upsampling_ratios": [8, 6, 5, 4],
        "sampling_rate": 24000,
    },
}


# -- the model --------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(device: torch.device, dtype: torch.dtype, seed: int, tiny: bool):
    """CSM with random weights at the real shapes (or tiny ones, for tests), and a processor that needs no download."""
    from transformers import CsmConfig, CsmForConditionalGeneration, CsmProcessor, EncodecFeatureExtractor

    tokenizer = tiny_tokenizer(vocab_size=400)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in TINY_SPECIAL_TOKENS}
    special = {
        "bos_token_id": ids["<|begin_of_text|>"],
        "pad_token_id": ids["<|pad|>"],
        "audio_token_id": ids["<|AUDIO|>"],
        "audio_eos_token_id": ids["<|audio_eos|>"],
    }
    if tiny:
        config = tiny_config(text_vocab_size=len(tokenizer))
        for key, value in special.items():
            setattr(config, key, value)
    else:
        config = CsmConfig(**special)  # everything else: transformers' defaults, i.e. the real CSM-1B
    if max(special.values()) >= config.text_vocab_size:
        raise SystemExit("the tiny tokenizer's ids do not fit the text vocabulary")
    torch.manual_seed(seed)
    with torch.device(device):
        model = CsmForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=ATTENTION)
    model.eval()
    randomize_codec(model)
    processor = CsmProcessor(
        feature_extractor=EncodecFeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def check_real_shapes(config) -> list[str]:
    """Differences between the model built and the real CSM-1B shapes (empty when it is the real size)."""
    parts = {"backbone": config, "depth_decoder": config.depth_decoder_config, "codec": config.codec_config}
    differences = []
    for part, keys in REAL_SHAPES.items():
        for key, want in keys.items():
            value = getattr(parts[part], key, None)
            if (list(value) if isinstance(value, (list, tuple)) else value) != want:
                differences.append(f"{part}.{key} = {value!r}, CSM-1B has {want!r}")
    return differences


def model_summary(model) -> dict:
    # Shared (tied) tensors count once, for the first part that names them: the depth decoder and the backbone
    # share the audio-codebook embeddings.
    parts = {"codec": 0, "depth_decoder": 0, "backbone": 0}
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        part = (
            "codec"
            if name.startswith("codec_model.")
            else ("depth_decoder" if name.startswith("depth_decoder.") else "backbone")
        )
        parts[part] += param.numel()
    config = model.config
    return {
        "parameters": {**parts, "total": sum(parts.values())},
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "dtype": str(model.dtype).replace("torch.", ""),
        "attention": config._attn_implementation,
        "backbone": {k: getattr(config, k) for k in REAL_SHAPES["backbone"]},
        "depth_decoder": {k: getattr(config.depth_decoder_config, k) for k in REAL_SHAPES["depth_decoder"]},
        "codec": {k: getattr(config.codec_config, k) for k in REAL_SHAPES["codec"]},
    }


class Paths:
    """The engine paths under test, sharing one model: old, new-eager, and new (CUDA graphs) on CUDA."""

    def __init__(self, model, processor, schedule: ChunkSchedule, max_streams: int, cuda: bool):
        self.old = BaselineEngine(model, processor, schedule=schedule)
        # One new engine; "new-eager" runs it with graphs switched off (same slots, same code, no replay).
        self.new = CsmEngine(model, processor, schedule=schedule, max_streams=max_streams, cuda_graphs=cuda)
        self.names = ["old", "new-eager"] + (["new"] if cuda else [])

    def engine(self, name: str):
        if name == "old":
            return self.old
        self.new.cuda_graphs = name == "new"
        return self.new

    @property
    def best(self) -> str:
        return self.names[-1]


# -- measurements -----------------------------------------------------------------------------------------------------
def in_thread(fn, *args):
    """Run fn on a thread of its own, as StreamScheduler runs the engine, so that one-stream and scheduled numbers
    are taken under the same threading conditions."""
    out: dict = {}

    def target():
        try:
            out["result"] = fn(*args)
        except BaseException as e:  # re-raised on the caller's thread
            out["error"] = e

    thread = threading.Thread(target=target, name="bench-stream")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["result"]


def load_texts(path: Path = TEXTS_FILE) -> list[str]:
    return json.loads(path.read_text())["texts"]


def fixed_request(text: str, frames: int, seed: int) -> GenerationRequest:
    return GenerationRequest(text, seed=seed, max_audio_length_ms=frames * FRAME_MS, ignore_eos=True)


def frame_step_ms(engine, texts: list[str], streams: int, frames: int) -> float:
    """Median wall time of one batched frame step of `streams` streams, after two warm-up steps. A step ends with its
    codes on the host (both paths read them back), so no extra synchronisation is needed."""
    running = [engine.start(fixed_request(texts[i % len(texts)], frames + 2, seed=i)) for i in range(streams)]
    times = []
    for step in range(frames + 2):
        started = time.perf_counter()
        engine.step_many(running)
        if step >= 2:
            times.append(time.perf_counter() - started)
    for stream in running:
        engine.release(stream)
    return statistics.median(times) * 1000


def breakdown(engine, kind: str, texts: list[str], streams: int, frames: int) -> dict:
    """Where a frame's time goes at `streams` streams, device synchronised around each part (eager paths only)."""
    device = engine.device
    timings: dict[str, list[float]] = {}
    parts = {
        "old": {"start": "prefill", "frame_codes": "codes", "backbone_step": "backbone", "take_chunk": "codec"},
        "new-eager": {"start": "prefill", "_frame": "frame", "_backbone_step": "backbone", "take_chunks": "codec"},
    }[kind]

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            sync(device)
            started = time.perf_counter()
            result = fn(*args, **kwargs)
            sync(device)
            timings.setdefault(name, []).append(time.perf_counter() - started)
            return result

        return wrapper

    for attribute, name in parts.items():
        setattr(engine, attribute, timed(name, getattr(engine, attribute)))  # instance attributes shadow methods
    try:
        running = [engine.start(fixed_request(texts[i % len(texts)], frames, seed=i)) for i in range(streams)]
        ended = set()
        while len(ended) < len(running):
            engine.step_many(running)
            due = [s for s in running if s not in ended and engine.chunk_ready(s)]
            # One stream at a time on the old path, as before; the new path decodes a round's chunks in one call.
            chunks = [engine.take_chunk(s) for s in due] if kind == "old" else engine.take_chunks(due)
            ended.update(stream for stream, chunk in zip(due, chunks, strict=True) if chunk.is_last)
    finally:
        for attribute in parts:
            delattr(engine, attribute)
    total = lambda name: sum(timings.get(name, [])) * 1000  # noqa: E731
    row = {
        "streams": streams,
        "frames": frames,
        "prefill_ms_per_stream": total("prefill") / streams,
        "backbone_step_ms_per_frame": total("backbone") / frames,
        "codec_decode_ms_per_stream_frame": total("codec") / (frames * streams),
    }
    codes = total("codes") if kind == "old" else total("frame") - total("backbone")
    row["codes_ms_per_frame"] = codes / frames  # codebook 0 head + 31 depth-decoder steps (+ sampling)
    return row


def watermark_cost(device: torch.device, levels: list[int], frames: int, budget) -> dict:
    """Per-chunk cost of silentcipher's full-size networks (random weights) on `device`: each level's streams push
    one chunk each in turn, unbatched (scripts/bench_watermark.py measures batched passes); chunks follow the default
    schedule."""
    missing = [m for m in ("silentcipher", "soxr", "yaml") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"needs {', '.join(missing)} (pip install soxr pyyaml; silentcipher --no-deps)"}
    from csm_tts.watermark.options import PUBLIC_KEY
    from csm_tts.watermark.streaming import StreamingWatermarker
    from csm_tts.watermark.weights import load_watermark_model, write_random_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench-watermark-") as tmp:
        model = load_watermark_model(write_random_checkpoint(tmp), device=str(device))
    schedule = ChunkSchedule()
    sizes, left, index = [], frames, 0
    while left > 0:
        sizes.append(min(schedule.frames_in_chunk(index), left))
        left -= sizes[-1]
        index += 1
    rng = np.random.default_rng(0)
    rows = []
    for level in levels:
        if budget.left() < 10:
            return {"rows": rows, "skipped": f"levels from {level} on: time budget"}
        marks = [StreamingWatermarker(model, PUBLIC_KEY) for _ in range(level)]
        per_chunk = []
        started = time.perf_counter()
        for size in sizes:
            audio = (rng.standard_normal(size * SAMPLE_RATE * FRAME_MS // 1000) * 0.1).astype(np.float32)
            for mark in marks:
                t = time.perf_counter()
                mark.push(audio)
                sync(device)
                per_chunk.append((time.perf_counter() - t) * 1000 / size)
        for mark in marks:
            mark.flush()
        wall = time.perf_counter() - started
        audio_s = level * frames * FRAME_MS / 1000
        rows.append(
            {
                "streams": level,
                "ms_per_frame_of_audio_p50": percentile(per_chunk, 50),
                "ms_per_frame_of_audio_p99": percentile(per_chunk, 99),
                "audio_s_per_s": audio_s / wall,
                "keeps_up": audio_s / wall >= level,  # every stream's audio watermarked at least in real time
            }
        )
    return {"rows": rows, "chunk_frames": sizes}


def codec_stage(codec, levels: list[int], chunk_frames: list[int], rounds: int, budget, notes: list[str]) -> dict:
    """The output stage's Mimi decode at each level: every stream brings a chunk of each size per round, decoded in
    one batched call (`CodecSlots`) and, for comparison, one call per stream; eagerly and, on CUDA, replaying CUDA
    graphs. Real time needs a round within the chunk's audio duration."""
    rows = []
    for graphs in (False, True) if next(codec.parameters()).is_cuda else (False,):
        for level in levels:
            for frames in chunk_frames:
                if budget.left() < 30:
                    return {"rows": rows, "skipped": f"levels from {level} x {frames} frames on: time budget"}
                try:
                    row = time_codec_rounds(codec, level, frames, rounds, cuda_graphs=graphs)
                except Exception as e:  # a failed capture (or out of memory) leaves the other rows standing
                    notes.append(f"codec stage, {level} x {frames}, graphs {graphs}: {type(e).__name__}: {e}"[:500])
                    continue
                row["keeps_up"] = row["batched_ms"] <= frames * FRAME_MS
                rows.append(row)
                print(
                    f"codec stage{' (CUDA graphs)' if graphs else ''}, {level} streams x {frames} frames: batched "
                    f"{row['batched_ms']:.1f} ms, in turn {row['in_turn_ms']:.1f} ms per round ({row['speedup']:.2f}x)",
                    flush=True,
                )
    return {"rows": rows}


def single_stream(engine, text: str, frames: int, seed: int) -> dict:
    request = fixed_request(text, frames, seed)
    start = time.perf_counter()
    arrivals, durations = [], []
    for chunk in engine.generate(request):
        arrivals.append(time.perf_counter() - start)
        durations.append(chunk.audio.size / SAMPLE_RATE)
    total = arrivals[-1]
    audio = sum(durations)
    stalls, _ = playback_stalls(arrivals, durations)
    return {
        "ttfa_ms": arrivals[0] * 1000,
        "total_s": total,
        "audio_s": audio,
        "frames": frames,
        "frames_per_s": frames / total,
        "rtf": total / audio,
        "first_chunk_audio_ms": durations[0] * 1000,
        "chunks": len(arrivals),
        "stalls": stalls,
    }


def one_stream_runs(engine, texts: list[str], frames: int, runs: int, budget, notes: list[str], name: str) -> dict:
    results = []
    for i in range(runs):
        if results and budget.left() < results[-1]["total_s"] * 2:
            notes.append(f"{name}: one-stream runs stopped after {len(results)} of {runs}: time budget")
            break
        results.append(in_thread(single_stream, engine, texts[(i + 1) % len(texts)], frames, i))
        print(f"{name}, one stream, run {i + 1}: TTFA {results[-1]['ttfa_ms']:.0f} ms, "
              f"{results[-1]['frames_per_s']:.2f} frames/s", flush=True)  # fmt: skip
    single = {
        key: statistics.median(r[key] for r in results)
        for key in ("ttfa_ms", "total_s", "audio_s", "frames_per_s", "rtf", "first_chunk_audio_ms")
    }
    single.update(
        frames=frames,
        runs=len(results),
        stalls=sum(r["stalls"] for r in results),
        ttfa_ms_all=[r["ttfa_ms"] for r in results],
        frames_per_s_all=[r["frames_per_s"] for r in results],
    )
    return single


@dataclass(eq=False)
class RecordingSink:
    """One scheduled stream: arrival time and duration of each chunk; cancelled when the time budget runs out."""

    submitted: float
    deadline: float
    arrivals: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    error: str | None = None
    kv_bytes: int | None = None
    positions: int | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def send_chunk(self, stream, chunk) -> None:
        self.arrivals.append(time.perf_counter() - self.submitted)
        self.durations.append(chunk.audio.size / SAMPLE_RATE)
        if chunk.is_last:
            self.kv_bytes = stream.kv_cache_bytes
            self.positions = stream.positions
            self.done.set()

    def send_error(self, message: str, code: str) -> None:
        self.error = f"{code}: {message}"
        self.done.set()

    def is_cancelled(self) -> bool:
        return time.perf_counter() > self.deadline


def concurrent_streams(engine, texts: list[str], streams: int, frames: int, deadline: float, max_active=None) -> dict:
    device = engine.device
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_memory = torch.cuda.memory_allocated(device)
    scheduler = StreamScheduler(engine, max_active=max_active or streams, max_queued=streams, logger=lambda _: None)
    sinks = []
    try:
        start = time.perf_counter()
        for i in range(streams):
            sink = RecordingSink(submitted=time.perf_counter(), deadline=deadline)
            sinks.append(sink)
            scheduler.submit(fixed_request(texts[i % len(texts)], frames, seed=i), sink)
        for sink in sinks:
            sink.done.wait()
        wall = time.perf_counter() - start
    finally:
        scheduler.close()
    finished = [s for s in sinks if s.error is None]
    delivered = [s for s in sinks if s.arrivals]
    audio = sum(sum(s.durations) for s in sinks)
    ttfa = [s.arrivals[0] * 1000 for s in delivered]
    rtfs = [s.arrivals[-1] / sum(s.durations) for s in finished if sum(s.durations) > 0]
    stalls = [playback_stalls(s.arrivals, s.durations) for s in delivered]
    errors = [s.error for s in sinks if s.error]
    row = {
        "streams": streams,
        "frames_per_stream": frames,
        "completed": len(finished),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:3],
        "wall_s": wall,
        "audio_s": audio,
        "audio_s_per_s": audio / wall,
        "frames_per_s": audio * 1000 / FRAME_MS / wall,
        "ttfa_ms": {
            "p50": percentile(ttfa, 50),
            "p90": percentile(ttfa, 90),
            "p99": percentile(ttfa, 99),
            "max": max(ttfa) if ttfa else None,
        },
        "rtf": {"p50": percentile(rtfs, 50), "worst": max(rtfs) if rtfs else None},
        "stalls": sum(n for n, _ in stalls),
        "stalled_streams": sum(1 for n, _ in stalls if n),
        "stall_s_total": sum(s for _, s in stalls),
        "kv_cache_bytes_per_stream": statistics.median(s.kv_bytes for s in finished) if finished else None,
        "positions_per_stream": statistics.median(s.positions for s in finished) if finished else None,
    }
    row["real_time"] = bool(finished) and not errors and row["rtf"]["worst"] < 1.0 and row["stalls"] == 0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base_memory
        row["peak_extra_memory_bytes"] = peak
        row["peak_extra_memory_bytes_per_stream"] = peak / streams
    return row


def sweep(engine, name: str, texts, levels, frames, budget, notes, max_active=None) -> list[dict]:
    rows, previous = [], None
    for level in levels:
        left = budget.left() - 5  # keep a few seconds to write the results
        if left <= 0:
            notes.append(f"{name}: concurrency {level} and above skipped: time budget spent")
            break
        if previous is not None:
            # Pessimistic: cost grows linearly with streams (batching only makes it cheaper).
            estimate = previous["wall_s"] * level / previous["streams"]
            if estimate > left * 1.5:
                notes.append(
                    f"{name}: concurrency {level} and above skipped: estimated {estimate:.0f} s, {left:.0f} s left"
                )
                break
        print(f"{name}: {level} concurrent streams ...", flush=True)
        # Failures inside the scheduler (out of memory included) come back as stream errors in the row.
        row = concurrent_streams(engine, texts, level, frames, time.perf_counter() + left, max_active)
        rows.append(row)
        previous = row
        if row["completed"] < level:
            notes.append(
                f"{name}: concurrency {level}: {level - row['completed']} stream(s) did not finish "
                f"({'; '.join(row['error_samples']) or 'time budget'}); higher levels skipped"
            )
            break
        if engine.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def compiled_frame_steps(paths: Paths, texts, frames: int, levels=(1, 8)) -> dict:
    """torch.compile (fullgraph, static shapes) of the new frame step: eagerly, and inside the CUDA graphs."""
    engine = paths.new
    result = {}
    compiled = torch.compile(CsmEngine._frame.__get__(engine), fullgraph=True, dynamic=False)
    engine._frame = compiled  # an instance attribute shadows the method: start/step_many call it
    saved_graphs, engine.graphs.graphs = engine.graphs.graphs, {}
    try:
        for variant, graphs in (("compiled", False), ("compiled+graphs", engine.device.type == "cuda")):
            if variant == "compiled+graphs" and not graphs:
                continue
            engine.cuda_graphs = graphs
            started = time.perf_counter()
            frame_step_ms(engine, texts, 1, 1)  # compiles (or captures) the first shape
            result[f"{variant}_first_call_s"] = time.perf_counter() - started
            for level in levels:
                result[f"{variant}_{level}"] = frame_step_ms(engine, texts, level, frames)
    finally:
        del engine._frame
        engine.graphs.graphs = saved_graphs
    return result


# -- output ------------------------------------------------------------------------------------------------------------
def fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def largest(rows: list[dict], key, limit: float) -> int | None:
    fits = [r["streams"] for r in rows if r.get(key) is not None and r[key] <= limit]
    return max(fits) if fits else None


def print_report(result: dict) -> None:
    env, model = result["environment"], result["model"]
    params = model["parameters"]
    print(
        f"\nCSM-1B shapes{' (TINY, not the real size)' if result['config']['tiny'] else ''}, random weights, "
        f"{model['dtype']}, {model['attention']} attention, on {env['device_name']} -- torch {env['torch']}, "
        f"transformers {env['transformers']}, CUDA {env['cuda'] or '-'}, driver {env['driver'] or '-'}, "
        f"{result['date']}"
    )
    print(
        f"parameters: backbone {params['backbone'] / 1e9:.3f} B, depth decoder {params['depth_decoder'] / 1e9:.3f} B, "
        f"codec {params['codec'] / 1e9:.3f} B, total {params['total'] / 1e9:.3f} B "
        f"({model['weights_bytes'] / 2**30:.2f} GiB of weights); model built in {result['build_s']:.1f} s; "
        f"{result['slots']}"
    )
    graphs = result.get("graphs")
    if graphs:
        print(f"CUDA graphs: {graphs['count']} captured in {graphs['capture_s']:.1f} s (windows <= {graphs['window']})")
    steps = result.get("frame_step", [])
    if steps:
        names = result["paths"]
        print("\nframe step (one batched frame, ms; real time needs <= 80, no stall with the default chunks <= 40)")
        print(f"{'streams':>7} " + " ".join(f"{n:>10}" for n in names) + f" {'old/new':>8}")
        for r in steps:
            best = r.get(result["best_path"])
            ratio = r["old"] / best if r.get("old") and best else None
            print(f"{r['streams']:>7} " + " ".join(f"{fmt(r.get(n)):>10}" for n in names) + f" {fmt(ratio, '.2f'):>8}")
        for n in names:
            print(
                f"  {n}: largest batch within 80 ms {fmt(largest(steps, n, REAL_TIME_FRAME_MS), 'd')}, "
                f"within 40 ms {fmt(largest(steps, n, NO_STALL_FRAME_MS), 'd')}"
            )
    for b in result.get("breakdown", []):
        print(
            f"per part, {b['path']}, {b['streams']} stream(s): prefill {b['prefill_ms_per_stream']:.1f} ms/stream; "
            f"per frame: codes (codebook 0 + 31 depth steps) {b['codes_ms_per_frame']:.1f} ms, backbone step "
            f"{b['backbone_step_ms_per_frame']:.1f} ms; codec decode {b['codec_decode_ms_per_stream_frame']:.1f} ms "
            "per stream and frame"
        )
    codec = result.get("codec") or {}
    if codec.get("rows"):
        print("codec stage (Mimi), ms per output round in which every stream brings one chunk:")
        print(
            f"{'graphs':>6} {'streams':>7} {'frames':>6} {'batched':>8} {'in turn':>8} {'ratio':>6} {'audio s/s':>9} "
            f"{'real time':>9}"
        )
        for r in codec["rows"]:
            print(
                f"{'yes' if r['cuda_graphs'] else 'no':>6} {r['streams']:>7} {r['frames']:>6} {r['batched_ms']:>8.1f} "
                f"{r['in_turn_ms']:>8.1f} {r['speedup']:>6.2f} {r['audio_s_per_s_batched']:>9.1f} "
                f"{'yes' if r['keeps_up'] else 'no':>9}"
            )
    for key in ("skipped", "error"):
        if codec.get(key):
            print(f"codec stage: {key} ({codec[key]})")
    watermark = result.get("watermark") or {}
    if watermark.get("rows"):
        print("watermark (full-size silentcipher, random weights), per stream, unbatched:")
        for r in watermark["rows"]:
            print(
                f"  {r['streams']:>3} streams: {fmt(r['ms_per_frame_of_audio_p50'])} ms per 80 ms of audio (p50), "
                f"{r['audio_s_per_s']:.2f} audio s/s, keeps up: {'yes' if r['keeps_up'] else 'no'}"
            )
    if watermark.get("skipped"):
        print(f"watermark: skipped ({watermark['skipped']})")
    if watermark.get("error"):
        print(f"watermark: failed ({watermark['error']})")
    for name, single in result.get("single_stream_by_path", {}).items():
        print(
            f"\n{name}: one stream, {single['frames']} frames ({single['frames'] * FRAME_MS / 1000:.1f} s of audio), "
            f"median of {single['runs']} run(s): time to first audio {single['ttfa_ms']:.0f} ms | "
            f"{single['frames_per_s']:.2f} frames/s | RTF {single['rtf']:.3f}"
        )
    for name, rows in result.get("concurrency_by_path", {}).items():
        if not rows:
            continue
        print(
            f"\n{name}: concurrent streams through StreamScheduler, {rows[0]['frames_per_stream']} frames each, "
            "all submitted at once (seeded, fixed length)"
        )
        print(
            f"{'streams':>7} {'audio s/s':>9} {'frames/s':>9} {'TTFA p50':>9} {'TTFA p99':>9} "
            f"{'worst RTF':>9} {'stalls':>6} {'errors':>6} {'mem/stream':>10} {'real time':>9}"
        )
        for r in rows:
            mem = r.get("peak_extra_memory_bytes_per_stream")
            print(
                f"{r['streams']:>7} {r['audio_s_per_s']:>9.2f} {r['frames_per_s']:>9.1f} "
                f"{fmt(r['ttfa_ms']['p50'], '.0f'):>9} {fmt(r['ttfa_ms']['p99'], '.0f'):>9} "
                f"{fmt(r['rtf']['worst'], '.3f'):>9} {r['stalls']:>6} {r['errors']:>6} "
                f"{fmt(mem and mem / 2**20, '.0f', '-') + (' MiB' if mem else ''):>10} "
                f"{'yes' if r['real_time'] else 'no':>9}"
            )
        count = result["largest_real_time"].get(name)
        print(f"largest real-time count ({name}): {count if count is not None else 'none'}")
    if result.get("compile"):
        print(f"\ntorch.compile frame step (ms): {json.dumps(result['compile'])}")
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"total {result['total_s']:.0f} s (budget {result['config']['budget_s']:.0f} s)")


# -- main -------------------------------------------------------------------------------------------------------------
def int_list(parser, flag: str, text: str) -> list[int]:
    try:
        values = [int(c) for c in str(text).split(",") if c.strip()]
    except ValueError:
        parser.error(f"{flag} must be comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        parser.error(f"{flag} needs at least one value, each >= 1")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        default="auto",
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--frames", type=int, help="frames per stream in the concurrency sweep (default 64; quick 24)")
    parser.add_argument("--single-frames", type=int, help="frames of the one-stream runs (default 125; quick 40)")
    parser.add_argument("--runs", type=int, help="one-stream runs, median reported (default 3; quick 1)")
    parser.add_argument(
        "--concurrency",
        help=f"comma-separated stream counts (default {DEFAULT_CONCURRENCY}; quick {QUICK['concurrency']})",
    )
    parser.add_argument("--old-max-streams", type=int, default=8, help="highest level the old path's sweep runs")
    parser.add_argument("--breakdown-streams", default="1,8", help="stream counts of the per-part timing")
    parser.add_argument("--step-frames", type=int, default=8, help="timed frames per frame-step measurement")
    parser.add_argument("--codec-rounds", type=int, default=3, help="timed output rounds per codec-stage level")
    parser.add_argument(
        "--max-active", type=int, help="scheduler's max active streams (default: all streams of a level)"
    )
    parser.add_argument(
        "--first-chunk-frames",
        type=int,
        default=ChunkSchedule().first_frames,
        help="frames in the first audio chunk (default: the engine's default schedule)",
    )
    parser.add_argument("--budget-s", type=float, help="whole-run time budget in seconds (default 330; quick 170)")
    parser.add_argument("--quick", action="store_true", help="fewer frames, runs and concurrency levels")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-part timing and the watermark")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile of the frame step (slow)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes instead of the real size (tests only)")
    parser.add_argument(
        "--cpu-threads",
        type=int,
        help="torch intra-op threads (CPU runs; default torch's choice). 1 keeps a busy shared CPU "
        "stable: 2-thread ops ran 5-50x slower there",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--json", type=Path, help="write the results here (after every part)")
    args = parser.parse_args(argv)
    defaults = {"frames": 64, "single_frames": 125, "runs": 3, "concurrency": DEFAULT_CONCURRENCY, "budget_s": 330.0}
    for key, value in (QUICK if args.quick else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.concurrency = int_list(parser, "--concurrency", args.concurrency)
    args.breakdown_streams = int_list(parser, "--breakdown-streams", args.breakdown_streams)
    for name in (
        "frames",
        "single_frames",
        "runs",
        "first_chunk_frames",
        "old_max_streams",
        "step_frames",
        "codec_rounds",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    if args.cpu_threads is not None and args.cpu_threads < 1:
        parser.error("--cpu-threads must be >= 1")
    return args


def resolve_device(args) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is available: run with --device cpu (slow: ~1 frame/s at the real size)")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return device, dtype


class Budget:
    def __init__(self, seconds: float):
        self.end = START + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def environment(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    driver = None
    if cuda:
        try:  # the driver version as NVML reports it (nvidia-smi's), when the bindings exist
            import pynvml

            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
        except Exception:
            driver = None
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if cuda else None,
        "driver": driver,
        "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = resolve_device(args)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    budget = Budget(args.budget_s)
    notes: list[str] = []
    texts = load_texts()
    cuda = device.type == "cuda"

    built = time.monotonic()
    schedule = ChunkSchedule(
        first_frames=args.first_chunk_frames, max_frames=max(ChunkSchedule().max_frames, args.first_chunk_frames)
    )
    model, processor = build_model(device, dtype, args.seed, args.tiny)
    max_level = max(args.concurrency + args.breakdown_streams)
    paths = Paths(model, processor, schedule, max_level, cuda)
    sync(device)
    build_s = time.monotonic() - built
    mismatches = [] if args.tiny else check_real_shapes(model.config)
    if mismatches:
        notes.append("NOT the real CSM-1B shapes: " + "; ".join(mismatches))
    result = {
        "benchmark": "bench_gpu",
        "date": datetime.date.today().isoformat(),
        "environment": environment(device),
        "config": {
            "tiny": args.tiny,
            "frames": args.frames,
            "single_frames": args.single_frames,
            "runs": args.runs,
            "concurrency": args.concurrency,
            "old_max_streams": args.old_max_streams,
            "breakdown_streams": args.breakdown_streams,
            "step_frames": args.step_frames,
            "codec_rounds": args.codec_rounds,
            "max_active": args.max_active,
            "budget_s": args.budget_s,
            "chunk_schedule": {
                "first_frames": schedule.first_frames,
                "growth": schedule.growth,
                "max_frames": schedule.max_frames,
            },
            "texts": str(TEXTS_FILE.relative_to(ROOT)),
            "seeded": True,
            "ignore_eos": True,
            "quick": args.quick,
            "cpu_threads": args.cpu_threads,
        },
        "model": model_summary(model),
        "build_s": build_s,
        "slots": paths.new.slot_summary,
        "paths": paths.names,
        "best_path": paths.best,
        "notes": notes,
        "frame_step": [],
        "breakdown": [],
        "single_stream_by_path": {},
        "concurrency_by_path": {},
        "largest_real_time": {},
    }

    def save() -> None:
        result["total_s"] = time.monotonic() - START
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"built {'tiny' if args.tiny else 'real-size'} CSM on {device} ({dtype}) in {build_s:.1f} s; "
        f"{budget.left():.0f} s of the {args.budget_s:.0f} s budget left; {paths.new.slot_summary}",
        flush=True,
    )
    save()

    # 1. CUDA graphs, captured for the windows the requests here need (a server captures them all at load).
    longest = max(len(t) for t in texts) + max(args.frames, args.single_frames) + 64  # byte tokens + frames + slack
    window = next((w for w in paths.new.windows if w >= longest), paths.new.max_positions)
    if cuda:
        started = time.monotonic()
        try:
            count = paths.new.capture_graphs(max_window=window)
            result["graphs"] = {"count": count, "capture_s": time.monotonic() - started, "window": window}
            print(f"captured {count} CUDA graphs in {result['graphs']['capture_s']:.1f} s", flush=True)
        except Exception as e:  # the eager paths are still worth measuring
            notes.append(f"CUDA graph capture failed, graphs left out: {type(e).__name__}: {e}"[:2000])
            paths.names.remove("new")
            paths.new.cuda_graphs = False
            result["paths"], result["best_path"] = paths.names, paths.best
        save()

    # Warm-up: kernels, allocator, both paths.
    for name in paths.names:
        engine = paths.engine(name)
        in_thread(single_stream, engine, texts[1], 3, 0)
        frame_step_ms(engine, texts, 2, 1)

    # 2. Frame step per batch size and path.
    for level in args.concurrency:
        if budget.left() < 60:
            notes.append(f"frame step: levels from {level} on skipped: time budget")
            break
        row = {"streams": level}
        for name in paths.names:
            try:
                row[name] = in_thread(frame_step_ms, paths.engine(name), texts, level, args.step_frames)
            except Exception as e:  # out of memory at a high level, say: the other paths and levels still count
                row[name] = None
                notes.append(f"frame step, {name} at {level} streams failed: {type(e).__name__}: {e}"[:500])
        result["frame_step"].append(row)
        print(f"frame step, {level} streams: " + ", ".join(f"{n} {fmt(row[n])} ms" for n in paths.names), flush=True)
    save()

    # 3. Per part (eager paths), and 4. the watermark.
    if not args.no_breakdown:
        for level in args.breakdown_streams:
            for name in ("old", "new-eager"):
                if budget.left() < 60:
                    notes.append(f"per-part timing of {name} at {level} streams skipped: time budget")
                    continue
                try:
                    row = in_thread(breakdown, paths.engine(name), name, texts, level, min(args.frames, 16))
                    result["breakdown"].append({"path": name, **row})
                except Exception as e:
                    notes.append(f"per-part timing of {name} at {level} streams failed: {type(e).__name__}: {e}"[:500])
        save()
        try:
            schedule_sizes = sorted({schedule.first_frames, schedule.max_frames})
            result["codec"] = codec_stage(
                model.codec_model, args.concurrency, schedule_sizes, args.codec_rounds, budget, notes
            )
        except Exception as e:
            result["codec"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        save()
        try:
            result["watermark"] = watermark_cost(device, args.concurrency, min(args.frames, 24), budget)
        except Exception as e:
            result["watermark"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        save()

    # 5. One stream, each path (the best new path first: it is the figure that matters).
    for name in reversed(paths.names):
        if name == "new-eager" and cuda:
            continue  # on CUDA the frame-step table already compares eager and graphs
        try:
            result["single_stream_by_path"][name] = one_stream_runs(
                paths.engine(name), texts, args.single_frames, args.runs, budget, notes, name
            )
        except Exception as e:  # one failing part must not cost the others
            notes.append(f"{name}: one-stream runs failed: {type(e).__name__}: {e}"[:500])
        save()
    result["single_stream"] = result["single_stream_by_path"].get(paths.best)

    # 6. Concurrent streams: the best new path at every level, the old one up to --old-max-streams.
    for name, levels in (
        (paths.best, args.concurrency),
        ("old", [c for c in args.concurrency if c <= args.old_max_streams]),
    ):
        try:
            rows = sweep(paths.engine(name), name, texts, levels, args.frames, budget, notes, args.max_active)
        except Exception as e:
            rows = []
            notes.append(f"{name}: concurrency sweep failed: {type(e).__name__}: {e}"[:500])
        result["concurrency_by_path"][name] = rows
        real_time = [r["streams"] for r in rows if r["real_time"]]
        result["largest_real_time"][name] = max(real_time) if real_time else None
        save()
    result["concurrency"] = result["concurrency_by_path"][paths.best]

    # 7. torch.compile, opt-in (minutes of compilation; last, after everything else is saved).
    if args.compile:
        try:
            result["compile"] = compiled_frame_steps(paths, texts, args.step_frames)
        except Exception as e:  # a compiler failure is a result too
            result["compile"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        save()

    # KV cache per stream.
    stream = paths.engine(paths.best).start(fixed_request(texts[1], 2, seed=0))
    positions = next((r["positions_per_stream"] for r in result["concurrency"] if r["positions_per_stream"]), None)
    result["kv_cache"] = {
        "backbone_bytes_per_position": paths.new.kv_bytes_per_position,
        "positions_measured": int(positions or stream.positions),
        "backbone_bytes_measured": int((positions or stream.positions) * paths.new.kv_bytes_per_position),
        "full_context_positions": paths.new.max_positions,
        "backbone_bytes_full_context": paths.new.slot_bytes,
        "slots": paths.new.max_streams,
        "codec_bytes_per_slot": paths.new.codec.slot_bytes,
        "codec_slots": paths.new.codec.slots,
        "note": "each stream slot holds the full context, preallocated; a stream fills one position per 80 ms "
        "frame; a codec slot (the transformer's key/value ring over its sliding window, convolution histories) has a "
        "fixed size; the depth decoder's 32-position cache is shared by all slots and reused every frame",
    }
    paths.new.release(stream)
    save()
    print_report(result)
    if args.json:
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
