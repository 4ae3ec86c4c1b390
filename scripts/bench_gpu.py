"""CSM-1B at its real size with random weights, in-process (no Triton): speed of one stream and of many.

    python scripts/bench_gpu.py --json out.json              # one CUDA GPU, bf16: under 6 minutes on an H100
    python scripts/bench_gpu.py --quick                      # a shorter pass (about 2-3 minutes)
    python scripts/bench_gpu.py --device cpu --frames 4 --single-frames 4 --runs 1 --concurrency 1,2   # shows it works

Needs only torch, transformers (and what transformers itself installs: tokenizers) and numpy, plus this repository's
`csm_tts` package, which it imports from the checkout: no download, no network, no other project dependency. The
model is `CsmConfig()` as transformers defines it, i.e. the shapes of `sesame/csm-1b`: a Llama-3.2-1B-sized backbone
(16 layers x 2048), the depth decoder (4 layers x 1024) and the full Mimi codec, with random weights, in bf16 on
CUDA (fp32 on CPU). Text goes through a tiny byte-level tokenizer whose ids stay inside the 128256-entry text vocab,
so nothing has to be downloaded; prompt lengths therefore differ a little from the real Llama tokenizer's.

Every request is seeded and fixed-length (ignore EOS, exactly --frames frames): random weights give comparable
numbers. Measured:

- one stream (`CsmEngine.generate`): time to first audio with the default chunk schedule (first chunk after 2
  frames), frames/s, real-time factor (generation time / audio duration), and where a frame's time goes;
- bytes of KV cache per stream (backbone per position, at the measured length and at the full 2048-position context;
  the codec decoder's cache);
- concurrency sweep (default 1, 4, 8, 16, 32, 64 streams, all submitted at once to
  `csm_tts.speech.scheduler.StreamScheduler`,
  which batches whatever it batches at the time): aggregate audio seconds per wall second, p50/p99 time to first
  audio, worst stream's real-time factor, stalls (a chunk that arrives after the audio delivered before it has
  finished playing, i.e. an audible gap), peak GPU memory.

A global time budget (--budget-s, counted from start-up) cancels a concurrency level that would overrun it and skips
the remaining ones, with a note, so the script always finishes and writes its JSON.
"""

from __future__ import annotations

import time

START = time.monotonic()  # the time budget counts imports and model construction too

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # csm_tts from the checkout (it is not installed on a bare GPU machine)

from csm_tts import FRAME_MS, SAMPLE_RATE  # noqa: E402
from csm_tts.speech.checkpoint import CHAT_TEMPLATE  # noqa: E402
from csm_tts.speech.chunk_schedule import ChunkSchedule  # noqa: E402
from csm_tts.speech.engine import CsmEngine, GenerationRequest  # noqa: E402
from csm_tts.speech.scheduler import StreamScheduler  # noqa: E402
from csm_tts.tooling.stream_stats import percentile, playback_stalls  # noqa: E402
from csm_tts.tooling.tiny_checkpoints import (  # noqa: E402
    TINY_SPECIAL_TOKENS,
    randomize_codec,
    tiny_config,
    tiny_tokenizer,
)

TEXTS_FILE = ROOT / "benchmarks" / "texts.json"
DEFAULT_CONCURRENCY = "1,4,8,16,32,64"
QUICK = {"frames": 24, "single_frames": 40, "runs": 1, "concurrency": "1,8,32", "budget_s": 170.0}
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


def build_engine(device: torch.device, dtype: torch.dtype, seed: int, tiny: bool, schedule: ChunkSchedule):
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
        try:
            model = CsmForConditionalGeneration._from_config(config, dtype=dtype)
        except TypeError:  # transformers releases before `dtype` replaced `torch_dtype`
            model = CsmForConditionalGeneration._from_config(config, torch_dtype=dtype)
    model.eval()
    randomize_codec(model)
    processor = CsmProcessor(
        feature_extractor=EncodecFeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    return CsmEngine(model, processor, schedule=schedule)


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


def model_summary(engine: CsmEngine) -> dict:
    model = engine.model
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
    total = sum(parts.values())
    config = model.config
    return {
        "parameters": {**parts, "total": total},
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "dtype": str(model.dtype).replace("torch.", ""),
        "backbone": {k: getattr(config, k) for k in REAL_SHAPES["backbone"]},
        "depth_decoder": {k: getattr(config.depth_decoder_config, k) for k in REAL_SHAPES["depth_decoder"]},
        "codec": {k: getattr(config.codec_config, k) for k in REAL_SHAPES["codec"]},
    }


def cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.nbytes
    return total


# -- one stream -------------------------------------------------------------------------------------------------------
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


def single_stream(engine: CsmEngine, text: str, frames: int, seed: int) -> dict:
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


def frame_breakdown(engine: CsmEngine, text: str, frames: int) -> dict:
    """Where one stream's time goes: prefill, codes of a frame (backbone head + 31 depth steps), the backbone step
    that feeds a frame back, and codec decoding (per frame). The device is synchronised around each part."""
    device = engine.device
    timings: dict[str, list[float]] = {}
    originals = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            sync(device)
            t = time.perf_counter()
            result = fn(*args, **kwargs)
            sync(device)
            timings.setdefault(name, []).append(time.perf_counter() - t)
            return result

        return wrapper

    for name in ("start", "frame_codes", "backbone_step", "take_chunk"):
        originals[name] = getattr(engine, name)
        setattr(engine, name, timed(name, originals[name]))  # instance attributes shadow the methods
    try:
        for _ in engine.generate(fixed_request(text, frames, seed=1)):
            pass
    finally:
        for name in originals:
            delattr(engine, name)
    per_frame = lambda name: sum(timings.get(name, [])) * 1000 / frames  # noqa: E731
    return {
        "prefill_ms": sum(timings.get("start", [])) * 1000,
        "frame_codes_ms_per_frame": per_frame("frame_codes"),
        "backbone_step_ms_per_frame": per_frame("backbone_step"),
        "codec_decode_ms_per_frame": per_frame("take_chunk"),
    }


# -- many streams -----------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class RecordingSink:
    """One scheduled stream: arrival time and duration of each chunk; cancelled when the time budget runs out."""

    submitted: float
    deadline: float
    arrivals: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    error: str | None = None
    kv_bytes: int | None = None
    codec_cache_bytes: int | None = None
    positions: int | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def send_chunk(self, stream, chunk) -> None:
        self.arrivals.append(time.perf_counter() - self.submitted)
        self.durations.append(chunk.audio.size / SAMPLE_RATE)
        if chunk.is_last:
            self.kv_bytes = stream.kv_cache_bytes
            self.codec_cache_bytes = cache_bytes(getattr(stream.codec, "cache", None))
            self.positions = stream.prompt_length + stream.frames_generated
            self.done.set()

    def send_error(self, message: str, code: str) -> None:
        self.error = f"{code}: {message}"
        self.done.set()

    def is_cancelled(self) -> bool:
        return time.perf_counter() > self.deadline


def concurrent_streams(
    engine: CsmEngine, texts: list[str], streams: int, frames: int, deadline: float, max_active: int | None = None
) -> dict:
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


# -- output ------------------------------------------------------------------------------------------------------------
def fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_report(result: dict) -> None:
    env, model, single = result["environment"], result["model"], result.get("single_stream")
    params = model["parameters"]
    print(
        f"\nCSM-1B shapes{' (TINY, not the real size)' if result['config']['tiny'] else ''}, random weights, "
        f"{model['dtype']} on {env['device_name']} -- torch {env['torch']}, transformers {env['transformers']}, "
        f"{result['date']}"
    )
    print(
        f"parameters: backbone {params['backbone'] / 1e9:.3f} B, depth decoder {params['depth_decoder'] / 1e9:.3f} B, "
        f"codec {params['codec'] / 1e9:.3f} B, total {params['total'] / 1e9:.3f} B "
        f"({model['weights_bytes'] / 2**30:.2f} GiB of weights); model built in {result['build_s']:.1f} s"
    )
    kv = result["kv_cache"]
    print(
        f"KV cache per stream: {kv['backbone_bytes_per_position'] / 1024:.0f} KiB per position; "
        f"{kv['backbone_bytes_measured'] / 2**20:.1f} MiB at {kv['positions_measured']} positions (prompt + frames); "
        f"{kv['backbone_bytes_full_context'] / 2**20:.1f} MiB at the full {kv['full_context_positions']}-position "
        f"context; codec decoder cache "
        f"{fmt(kv['codec_bytes_measured'] and kv['codec_bytes_measured'] / 2**20, '.2f')} MiB"
    )
    if single:
        print(
            f"\none stream, {single['frames']} frames ({single['frames'] * FRAME_MS / 1000:.1f} s of audio), "
            f"median of {single['runs']} run(s), first chunk {single['first_chunk_audio_ms']:.0f} ms of audio"
        )
        print(
            f"  time to first audio {single['ttfa_ms']:.0f} ms | {single['frames_per_s']:.2f} frames/s | "
            f"RTF {single['rtf']:.3f} ({'faster' if single['rtf'] < 1 else 'slower'} than real time; "
            f"real time needs {1000 / FRAME_MS:.1f} frames/s)"
        )
        b = single.get("breakdown")
        if b:
            print(
                f"  per frame: codes (backbone head + 31 depth-decoder steps) {b['frame_codes_ms_per_frame']:.1f} ms, "
                f"backbone step {b['backbone_step_ms_per_frame']:.1f} ms, codec decode "
                f"{b['codec_decode_ms_per_frame']:.1f} ms; prefill {b['prefill_ms']:.0f} ms"
            )
    rows = result["concurrency"]
    if rows:
        print(
            f"\nconcurrent streams through StreamScheduler, {rows[0]['frames_per_stream']} frames each, "
            "all submitted at once (seeded, fixed length)"
        )
        header = (
            f"{'streams':>7} {'audio s/s':>9} {'frames/s':>9} {'TTFA p50':>9} {'TTFA p99':>9} "
            f"{'worst RTF':>9} {'stalls':>6} {'errors':>6} {'mem/stream':>10} {'real time':>9}"
        )
        print(header)
        for r in rows:
            mem = r.get("peak_extra_memory_bytes_per_stream")
            print(
                f"{r['streams']:>7} {r['audio_s_per_s']:>9.2f} {r['frames_per_s']:>9.1f} "
                f"{fmt(r['ttfa_ms']['p50'], '.0f'):>9} {fmt(r['ttfa_ms']['p99'], '.0f'):>9} "
                f"{fmt(r['rtf']['worst'], '.3f'):>9} {r['stalls']:>6} {r['errors']:>6} "
                f"{fmt(mem and mem / 2**20, '.0f', '-') + (' MiB' if mem else ''):>10} "
                f"{'yes' if r['real_time'] else 'no':>9}"
            )
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"total {result['total_s']:.0f} s (budget {result['config']['budget_s']:.0f} s)")


# -- main -------------------------------------------------------------------------------------------------------------
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
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-part timing of one stream")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes instead of the real size (tests only)")
    parser.add_argument(
        "--cpu-threads",
        type=int,
        help="torch intra-op threads (CPU runs; default torch's choice). 1 keeps a busy shared CPU "
        "stable: 2-thread ops ran 5-50x slower there",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    defaults = {"frames": 64, "single_frames": 125, "runs": 3, "concurrency": DEFAULT_CONCURRENCY, "budget_s": 330.0}
    for key, value in (QUICK if args.quick else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    except ValueError:
        parser.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency needs at least one level, each >= 1")
    for name in ("frames", "single_frames", "runs", "first_chunk_frames"):
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


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = resolve_device(args)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    budget_end = START + args.budget_s
    remaining = lambda: budget_end - time.monotonic()  # noqa: E731
    notes: list[str] = []
    texts = load_texts()

    built = time.monotonic()
    schedule = ChunkSchedule(
        first_frames=args.first_chunk_frames, max_frames=max(ChunkSchedule().max_frames, args.first_chunk_frames)
    )
    engine = build_engine(device, dtype, args.seed, args.tiny, schedule)
    sync(device)
    build_s = time.monotonic() - built
    mismatches = [] if args.tiny else check_real_shapes(engine.model.config)
    if mismatches:
        notes.append("NOT the real CSM-1B shapes: " + "; ".join(mismatches))
    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
    }
    result = {
        "benchmark": "bench_gpu",
        "date": datetime.date.today().isoformat(),
        "environment": env,
        "config": {
            "tiny": args.tiny,
            "frames": args.frames,
            "single_frames": args.single_frames,
            "runs": args.runs,
            "concurrency": args.concurrency,
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
        "model": model_summary(engine),
        "build_s": build_s,
        "notes": notes,
        "concurrency": [],
    }
    print(
        f"built {'tiny' if args.tiny else 'real-size'} CSM on {device} ({dtype}) in {build_s:.1f} s; "
        f"{remaining():.0f} s of the {args.budget_s:.0f} s budget left",
        flush=True,
    )

    # Warm-up: kernels, allocator, the batched path.
    in_thread(single_stream, engine, texts[1], 3, 0)
    concurrent_streams(engine, texts, 2, 2, deadline=time.perf_counter() + max(remaining(), 1))

    # One stream.
    runs = []
    for i in range(args.runs):
        if runs and remaining() < runs[-1]["total_s"] * 2:
            notes.append(f"one-stream runs stopped after {len(runs)} of {args.runs}: time budget")
            break
        runs.append(in_thread(single_stream, engine, texts[(i + 1) % len(texts)], args.single_frames, i))
        print(
            f"one stream, run {i + 1}: TTFA {runs[-1]['ttfa_ms']:.0f} ms, {runs[-1]['frames_per_s']:.2f} frames/s",
            flush=True,
        )
    single = {
        key: statistics.median(r[key] for r in runs)
        for key in ("ttfa_ms", "total_s", "audio_s", "frames_per_s", "rtf", "first_chunk_audio_ms")
    }
    single.update(
        frames=args.single_frames,
        runs=len(runs),
        stalls=sum(r["stalls"] for r in runs),
        ttfa_ms_all=[r["ttfa_ms"] for r in runs],
        frames_per_s_all=[r["frames_per_s"] for r in runs],
    )
    if not args.no_breakdown:
        frames = min(args.single_frames, 25)
        if remaining() > frames / single["frames_per_s"] * 3:
            single["breakdown"] = in_thread(frame_breakdown, engine, texts[1], frames)
        else:
            notes.append("per-part breakdown skipped: time budget")
    result["single_stream"] = single

    # Concurrency sweep.
    previous = None
    for level in args.concurrency:
        left = remaining() - 5  # keep a few seconds to write the results
        if left <= 0:
            notes.append(f"concurrency {level} and above skipped: time budget spent")
            break
        if previous is not None:
            # Pessimistic: cost grows linearly with streams (batching only makes it cheaper).
            estimate = previous["wall_s"] * level / previous["streams"]
            if estimate > left * 1.5:
                notes.append(f"concurrency {level} and above skipped: estimated {estimate:.0f} s, {left:.0f} s left")
                break
        print(f"{level} concurrent streams ...", flush=True)
        # Failures inside the scheduler (out of memory included) come back as stream errors in the row.
        row = concurrent_streams(
            engine, texts, level, args.frames, deadline=time.perf_counter() + left, max_active=args.max_active
        )
        result["concurrency"].append(row)
        previous = row
        if row["completed"] < level:
            notes.append(
                f"concurrency {level}: {level - row['completed']} stream(s) did not finish "
                f"({'; '.join(row['error_samples']) or 'time budget'}); higher levels skipped"
            )
            break
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # KV cache per stream.
    positions_measured = next(
        (r["positions_per_stream"] for r in result["concurrency"] if r["positions_per_stream"]), None
    )
    kv_measured = next(
        (r["kv_cache_bytes_per_stream"] for r in result["concurrency"] if r["kv_cache_bytes_per_stream"]), None
    )

    def one_chunk():
        stream = engine.start(fixed_request(texts[1], 2, seed=0))
        engine.step(stream)
        engine.take_chunk(stream)
        return stream

    stream = in_thread(one_chunk)
    result["kv_cache"] = {
        "backbone_bytes_per_position": engine.kv_bytes_per_position,
        "positions_measured": int(positions_measured or stream.prompt_length + stream.frames_generated),
        "backbone_bytes_measured": int(kv_measured or stream.kv_cache_bytes),
        "full_context_positions": engine.max_positions,
        "backbone_bytes_full_context": engine.kv_bytes_per_position * engine.max_positions,
        "codec_bytes_measured": cache_bytes(stream.codec.cache),
        "note": "backbone KV grows by one position per 80 ms frame; the codec decoder's cache is bounded by its "
        "sliding window; the depth decoder's cache lives only during one frame",
    }
    result["total_s"] = time.monotonic() - START
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
