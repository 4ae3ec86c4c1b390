"""Triton's own perf_analyzer against the decoupled `csm_1b` and `tts` models (gRPC streaming), plus what it hides.

    python scripts/perf_analyzer.py                                  # starts its own CPU Triton (tiny checkpoints)
    python scripts/perf_analyzer.py --grpc-url 127.0.0.1:8001 --models tts --concurrency 1,4,8 --frames 25
    python scripts/perf_analyzer.py --perf-analyzer /usr/local/bin/perf_analyzer ...   # e.g. the NGC SDK image's

The binary: perf_analyzer 2.51.0 ships inside the `tritonclient==2.51.0` wheel (installed as `.venv/bin/perf_analyzer`;
later wheels need glibc 2.38, see docs/development.md). It needs `libb64.so.0d` and `libcudart.so.12`, which the
nvidia-pytriton wheel carries under hashed names (.triton/lib/libb64-*.so.0d, libcudart-*.so.12.*): this script links
them under their real names into the ignored folder .triton/perf_analyzer_libs and puts it on LD_LIBRARY_PATH. When
the binary is missing it installs the pinned tritonclient (constraints.txt) with pip.

What it runs, per model and concurrency level (one perf_analyzer process each, since --request-count takes a single
level):

    perf_analyzer -m MODEL -u URL -i grpc --streaming --input-data benchmarks/perf_analyzer_input.json
        --request-parameter max_audio_length_ms:MS:int --request-parameter seed:0:int
        --request-parameter ignore_eos:true:bool --concurrency-range C --request-count N
        -f report.csv --profile-export-file profile.json

What its latency means for a decoupled model: perf_analyzer 2.51 prints "Detected decoupled model, using the first
response for measuring latency", yet the p50/p99 latency in its report is each request's WHOLE stream, from sending
the request to its last response: with --profile-export-file, the reported p50 and p99 equal, to the microsecond,
the last-response times of the requests in the export (2026-11-26, csm_1b). For a TTS stream that is the time to
generate the whole clip, not the time to first audio, and its "infer/sec" counts whole streams. This script
therefore also prints the first-response and whole-stream times computed from the export's per-response timestamps
(percentiles interpolated, so they can differ from perf_analyzer's nearest-rank ones on few requests), and
scripts/bench_stream.py measures time to first audio, gaps and stalls directly, which is what a listener hears.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from csm_tts import FRAME_MS  # noqa: E402
from csm_tts.tooling.local_triton import start_local_triton  # noqa: E402

LIB_DIR = ROOT / ".triton" / "perf_analyzer_libs"
INPUT_DATA = ROOT / "benchmarks" / "perf_analyzer_input.json"
# Real name -> glob of the hashed copy the nvidia-pytriton wheel ships.
LIBRARIES = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


def find_binary(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    venv_bin = Path(sys.executable).parent / "perf_analyzer"
    if venv_bin.exists():
        return venv_bin
    found = shutil.which("perf_analyzer")
    return Path(found) if found else None


def install_binary() -> Path:
    """pip install the pinned tritonclient (its wheel carries bin/perf_analyzer)."""
    command = [sys.executable, "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), "tritonclient[grpc]"]
    print("perf_analyzer not found; installing:", " ".join(command), file=sys.stderr)
    subprocess.run(command, check=True)
    binary = Path(sys.executable).parent / "perf_analyzer"
    if not binary.exists():
        raise SystemExit(f"{binary} is still missing after installing tritonclient; pass --perf-analyzer PATH")
    return binary


def library_dirs() -> list[Path]:
    """Where the hashed copies may be: the extracted Triton, or the nvidia-pytriton wheel if it is installed."""
    dirs = [ROOT / ".triton" / "lib"]
    for site in map(Path, sys.path):
        if (site / "nvidia_pytriton.libs").is_dir():
            dirs.append(site / "nvidia_pytriton.libs")
    return [d for d in dirs if d.is_dir()]


def missing_libraries(binary: Path, env: dict) -> list[str]:
    try:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env, check=False).stdout
    except FileNotFoundError:
        return []
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


def library_env(binary: Path) -> dict:
    """An environment in which the binary's libraries resolve (symlinks under their real names, if needed)."""
    env = dict(os.environ)
    missing = missing_libraries(binary, env)
    if not missing:
        return env
    LIB_DIR.mkdir(parents=True, exist_ok=True)
    for name in missing:
        pattern = LIBRARIES.get(name)
        candidates = sorted(p for d in library_dirs() for p in d.glob(pattern)) if pattern else []
        if not candidates:
            raise SystemExit(
                f"{binary} needs {name}, and no copy was found in {', '.join(map(str, library_dirs()))} "
                "(run `make setup`, which extracts Triton's libraries into .triton/lib)"
            )
        link = LIB_DIR / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(candidates[-1])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(LIB_DIR), env.get("LD_LIBRARY_PATH", "")) if p)
    still = missing_libraries(binary, env)
    if still:
        raise SystemExit(f"{binary} still cannot find {', '.join(still)}")
    return env


def command(
    binary: Path, args, model: str, url: str, level: int, requests: int, report: Path, profile: Path
) -> list[str]:
    return [
        str(binary),
        "-m",
        model,
        "-u",
        url,
        "-i",
        "grpc",
        "--streaming",
        "--input-data",
        str(args.input_data),
        "--request-parameter",
        f"max_audio_length_ms:{args.frames * FRAME_MS}:int",
        "--request-parameter",
        "seed:0:int",
        "--request-parameter",
        "ignore_eos:true:bool",
        "--concurrency-range",
        str(level),
        "--request-count",
        str(requests),
        "-f",
        str(report),
        "--profile-export-file",
        str(profile),
        *args.extra,
    ]


def percentiles(values_ms: list[float]) -> dict:
    if not values_ms:
        return {"p50": None, "p90": None, "p99": None}
    array = np.asarray(values_ms, dtype=float)
    return {f"p{q}": float(np.percentile(array, q)) for q in (50, 90, 99)}


def read_profile(path: Path) -> dict:
    """First-response and whole-stream latency of every request, from perf_analyzer's own timestamps (ns)."""
    data = json.loads(path.read_text())
    first, whole, responses = [], [], []
    for experiment in data.get("experiments", []):
        for request in experiment.get("requests", []):
            stamps = request.get("response_timestamps") or []
            if not stamps:
                continue
            first.append((stamps[0] - request["timestamp"]) / 1e6)
            whole.append((stamps[-1] - request["timestamp"]) / 1e6)
            responses.append(len(stamps))
    return {
        "first_response_ms": percentiles(first),
        "whole_stream_ms": percentiles(whole),
        "responses_per_request": float(np.median(responses)) if responses else None,
        "requests": len(first),
    }


def read_report(path: Path) -> dict:
    with open(path, newline="") as f:
        row = next(csv.DictReader(f))
    us = lambda key: float(row[key]) / 1000 if row.get(key) not in (None, "") else None  # noqa: E731
    return {
        "infer_per_s": float(row["Inferences/Second"]),
        "responses_per_s": float(row["Response Throughput"]) if row.get("Response Throughput") else None,
        "latency_ms": {"p50": us("p50 latency"), "p90": us("p90 latency"), "p99": us("p99 latency")},
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc-url", help="a running Triton (host:port); default: start one (CPU, tiny checkpoints)")
    parser.add_argument("--models", default="csm_1b,tts", help="comma-separated (default csm_1b,tts)")
    parser.add_argument("--concurrency", default="1,2,4", help="comma-separated levels (default 1,2,4)")
    parser.add_argument("--requests", type=int, help="requests per level (default 3 x concurrency, at least 6)")
    parser.add_argument(
        "--frames", type=int, default=25, help="fixed length of each request in 80 ms frames (default 25)"
    )
    parser.add_argument("--input-data", type=Path, default=INPUT_DATA)
    parser.add_argument("--perf-analyzer", help="the binary to use (default: the venv's, installed if missing)")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "checkpoints" / "csm-tiny")
    parser.add_argument("--watermark-dir", type=Path, default=ROOT / "checkpoints" / "silentcipher-tiny")
    parser.add_argument(
        "--cpu-threads", type=int, help="OMP_NUM_THREADS of a Triton started here (1 keeps a busy shared CPU stable)"
    )
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per perf_analyzer run")
    parser.add_argument("--keep", type=Path, help="keep perf_analyzer's CSV and profile exports in this folder")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("extra", nargs="*", help="after `--`: more perf_analyzer options")
    args = parser.parse_args(argv)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error("--concurrency takes comma-separated integers")
    if not args.model_list or not args.levels or min(args.levels) < 1 or args.frames < 1:
        parser.error("need at least one model, concurrency levels >= 1 and --frames >= 1")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    binary = find_binary(args.perf_analyzer) or install_binary()
    env = library_env(binary)
    server = None
    url = args.grpc_url
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="perf-analyzer-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        if url is None:
            print("starting Triton ...", file=sys.stderr, flush=True)
            threads = {"OMP_NUM_THREADS": str(args.cpu_threads)} if args.cpu_threads else {}
            server = start_local_triton(
                workdir / "model_repository",
                args.model_dir,
                args.watermark_dir,
                {"CSM_WATERMARK_IDLE_TIMEOUT_S": "30", **threads},
            )
            url = server.grpc_url
        for level in args.levels:
            for model in args.model_list:
                requests = args.requests or max(6, 3 * level)
                report, profile = workdir / f"{model}-c{level}.csv", workdir / f"{model}-c{level}.profile.json"
                cmd = command(binary, args, model, url, level, requests, report, profile)
                print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout_s)
                row = {
                    "model": model,
                    "concurrency": level,
                    "requests": requests,
                    "frames": args.frames,
                    "returncode": done.returncode,
                }
                if done.returncode != 0 or not report.exists():
                    row["error"] = (done.stdout + done.stderr).strip().splitlines()[-3:]
                    print(f"perf_analyzer failed for {model} at {level}:\n{done.stdout}{done.stderr}", file=sys.stderr)
                else:
                    row.update(perf_analyzer=read_report(report), from_profile=read_profile(profile))
                    row["perf_analyzer_says"] = next(
                        (line.strip() for line in done.stdout.splitlines() if "decoupled" in line.lower()), None
                    )
                rows.append(row)
                if not args.keep:
                    profile.unlink(missing_ok=True)  # it holds every response's audio
    finally:
        if server is not None:
            server.stop()
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")
    return rows


def print_table(rows: list[dict]) -> None:
    f = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    print(
        f"{'model':<8} {'conc':>4} {'reqs':>4} {'infer/s':>8} | {'perf_analyzer latency p50/p99 ms':>32} | "
        f"{'first response p50/p99 ms':>25} | {'whole stream p50/p99 ms':>23} | {'resp/req':>8}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<8} {r['concurrency']:>4} {r['requests']:>4}  failed: {' '.join(r['error'])[:120]}")
            continue
        pa, pr = r["perf_analyzer"], r["from_profile"]
        print(
            f"{r['model']:<8} {r['concurrency']:>4} {r['requests']:>4} {pa['infer_per_s']:>8.2f} | "
            f"{f(pa['latency_ms']['p50']) + ' / ' + f(pa['latency_ms']['p99']):>32} | "
            f"{f(pr['first_response_ms']['p50']) + ' / ' + f(pr['first_response_ms']['p99']):>25} | "
            f"{f(pr['whole_stream_ms']['p50']) + ' / ' + f(pr['whole_stream_ms']['p99']):>23} | "
            f"{pr['responses_per_request'] or 0:>8.0f}"
        )


if __name__ == "__main__":
    main()
