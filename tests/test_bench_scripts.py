"""Fast checks of the benchmark scripts (they are scripts that print numbers, not timed tests).

- argument parsing of bench_stream.py, bench_gpu.py and perf_analyzer.py;
- the stall rule both benchmark scripts share, and the committed inputs (texts, perf_analyzer input data);
- bench_codec.py on the tiny checkpoint's codec (two streams, one round);
- bench_gpu.py runs from a bare Python that has only torch, transformers and numpy (and what those install): it is
  run, at tiny shapes on the CPU, with `python -I -S` and a site folder holding only those distributions, so importing
  anything else (tritonclient, soxr, scipy, ...) anywhere in it or in csm_tts fails the test;
- bench_stream.py's JSON schema on a tiny seeded fixed-length run against the session's live Triton;
- bench_text_frontend.py runs and prints both of its measurements (its streaming figures use a simulated clock).
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from csm_tts.tooling import stream_stats

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
GPU_SCRIPT = SCRIPTS / "bench_gpu.py"


def load_script(name: str):
    """A script as a module under its own name (a `perf_analyzer` package may exist in site-packages)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


bench_stream = load_script("bench_stream")
perf_analyzer = load_script("perf_analyzer")
BARE_PACKAGES = ("torch", "transformers", "numpy")


# -- arguments --------------------------------------------------------------------------------------------------------
def test_bench_stream_arguments():
    args = bench_stream.parse_args(
        [
            "--target",
            "tts,ws",
            "--concurrency",
            "1,4",
            "--fixed-frames",
            "25",
            "--watermark",
            "on,off",
            "--json",
            "out.json",
        ]
    )
    assert args.targets == ["tts", "ws"]
    assert args.levels == [1, 4]
    assert args.fixed_frames == 25
    assert args.watermarks == [True, False]
    assert args.json == Path("out.json")
    defaults = bench_stream.parse_args([])
    assert defaults.targets == ["tts", "csm_1b", "ws", "generate"]
    assert defaults.levels == [1, 2, 4, 8]
    assert defaults.watermarks == [None] and defaults.fixed_frames is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--target", "tts,nope"],
        ["--concurrency", "0"],
        ["--concurrency", "a"],
        ["--requests", "0"],
        ["--fixed-frames", "0"],
        ["--watermark", "maybe"],
    ],
)
def test_bench_stream_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit):
        bench_stream.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_bench_stream_request_plan():
    plan = bench_stream.Plan(["a", "b"], fixed_frames=4, max_audio_length_ms=10_000)
    assert plan.text(3) == "b"
    assert plan.grpc_parameters(3, None) == {"max_audio_length_ms": 320, "seed": 3, "ignore_eos": True}
    assert plan.grpc_parameters(0, False)["watermark"] is False
    body = plan.proxy_body(5, True)
    assert body == {
        "text": "b",
        "max_audio_length_ms": 1000,
        "seed": 5,
        "watermark": True,
    }  # the proxy refuses ignore_eos
    free = bench_stream.Plan(["a"], fixed_frames=None, max_audio_length_ms=2000)
    assert free.grpc_parameters(0, None) == {"max_audio_length_ms": 2000}


def test_bench_gpu_arguments():
    bench_gpu = load_script("bench_gpu")  # torch and transformers are installed here; the bare-Python check is below

    args = bench_gpu.parse_args(["--quick", "--json", "x.json"])
    assert (args.frames, args.single_frames, args.runs, args.concurrency) == (24, 40, 1, [1, 8, 32, 64])
    args = bench_gpu.parse_args(["--device", "cpu", "--frames", "4", "--concurrency", "1,2"])
    assert (args.device, args.frames, args.concurrency, args.budget_s) == ("cpu", 4, [1, 2], 330.0)
    defaults = bench_gpu.parse_args([])
    assert defaults.concurrency == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert (defaults.breakdown_streams, defaults.old_max_streams, defaults.compile) == ([1, 8], 8, False)
    bad_arguments = (
        ["--concurrency", "0"],
        ["--frames", "0"],
        ["--concurrency", "x"],
        ["--budget-s", "0"],
        ["--breakdown-streams", "0"],
    )
    for bad in bad_arguments:
        with pytest.raises(SystemExit):
            bench_gpu.parse_args(bad)


def test_perf_analyzer_arguments_and_command(tmp_path):
    args = perf_analyzer.parse_args(
        ["--models", "tts", "--concurrency", "1,4", "--frames", "10", "--", "--max-threads", "8"]
    )
    assert args.model_list == ["tts"] and args.levels == [1, 4] and args.extra == ["--max-threads", "8"]
    cmd = perf_analyzer.command(Path("pa"), args, "tts", "h:1", 4, 12, tmp_path / "r.csv", tmp_path / "p.json")
    joined = " ".join(cmd)
    for part in (
        "-m tts",
        "-u h:1",
        "-i grpc",
        "--streaming",
        "--concurrency-range 4",
        "--request-count 12",
        "max_audio_length_ms:800:int",
        "seed:0:int",
        "ignore_eos:true:bool",
        "--max-threads 8",
        f"--input-data {perf_analyzer.INPUT_DATA}",
    ):
        assert part in joined


def test_perf_analyzer_profile_reading(tmp_path):
    profile = tmp_path / "p.json"
    profile.write_text(
        json.dumps(
            {
                "experiments": [
                    {
                        "experiment": {"mode": "concurrency", "value": 1},
                        "requests": [
                            {"timestamp": 0, "response_timestamps": [100_000_000, 900_000_000]},
                            {
                                "timestamp": 1_000_000_000,
                                "response_timestamps": [1_200_000_000, 1_500_000_000, 2_000_000_000],
                            },
                        ],
                    }
                ]
            }
        )
    )
    result = perf_analyzer.read_profile(profile)
    assert result["first_response_ms"]["p50"] == pytest.approx(150.0)
    assert result["whole_stream_ms"]["p50"] == pytest.approx(950.0)
    assert result["requests"] == 2 and result["responses_per_request"] == 2.5


# -- shared definitions and committed inputs -----------------------------------------------------------------------
def test_playback_stalls():
    stalls = bench_stream.playback_stalls
    assert stalls([0.1, 0.2, 0.3], [0.16, 0.16, 0.32]) == (0, 0.0)  # always ahead of playback
    count, silence = stalls([0.1, 0.5, 0.6], [0.16, 0.32, 0.32])  # 0.24 s of buffer, next chunk 0.4 s later
    assert count == 1 and silence == pytest.approx(0.24)
    # After a stall playback restarts when the late chunk arrives: the buffer is counted from there.
    assert stalls([0.0, 1.0, 1.3], [0.16, 0.32, 0.32])[0] == 1
    assert stalls([], []) == (0, 0.0) and stalls([0.3], [0.16]) == (0, 0.0)


def test_bench_scripts_share_the_stall_rule():
    """Both benchmarks count stalls with the one function in csm_tts/tooling/stream_stats.py."""
    assert bench_stream.playback_stalls is stream_stats.playback_stalls
    # bench_gpu.py is not imported here (it needs torch): its imports are read from its syntax tree, so a reworded
    # or reordered import line still counts and a comment naming the function does not.
    imported = {
        (node.module, alias.name)
        for node in ast.walk(ast.parse(GPU_SCRIPT.read_text()))
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert ("csm_tts.tooling.stream_stats", "playback_stalls") in imported
    assert not any(
        isinstance(n, ast.FunctionDef) and n.name == "playback_stalls"
        for n in ast.walk(ast.parse(GPU_SCRIPT.read_text()))
    )


def test_committed_inputs_agree():
    texts = bench_stream.load_texts()
    assert len(texts) >= 8 and len(set(texts)) == len(texts)
    lengths = sorted(len(t) for t in texts)
    assert lengths[0] < 20 and lengths[-1] > 200  # mixed lengths
    data = json.loads(perf_analyzer.INPUT_DATA.read_text())["data"]
    assert [step["text"] for step in data] == [[t] for t in texts]


def test_bench_codec_runs_on_the_tiny_codec(capsys):
    bench_codec = load_script("bench_codec")
    with pytest.raises(SystemExit):
        bench_codec.parse_args(["--codec", "huge"])
    rows = bench_codec.main(["--codec", "tiny", "--streams", "2", "--chunk-frames", "2,3", "--rounds", "1"])
    assert [(r["codec"], r["streams"], r["frames"]) for r in rows] == [("tiny", 2, 2), ("tiny", 2, 3)]
    assert all(r["batched_ms"] > 0 and r["in_turn_ms"] > 0 and r["max_difference"] < 1e-5 for r in rows)
    assert "| tiny | 2 | 3 |" in capsys.readouterr().out


# -- bench_gpu.py from a bare Python --------------------------------------------------------------------------------
def _distribution_closure(names) -> dict:
    """The installed distributions `names` need, with their own requirements (extras left out)."""
    found, todo = {}, list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional or platform-specific requirement that is not installed
        found[name] = dist
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def _bare_site(dest: Path) -> Path:
    """A site folder with links to exactly torch's, transformers' and numpy's installed files."""
    dest.mkdir()
    for dist in _distribution_closure(BARE_PACKAGES).values():
        for file in dist.files or []:
            top = file.parts[0]
            if top in ("..", "__pycache__") or top.endswith(".pth"):  # dist-info stays: packages read their metadata
                continue
            source = Path(dist.locate_file(top))
            if source.exists() and not (dest / top).exists():
                (dest / top).symlink_to(source)
    return dest


def test_bench_text_frontend_prints_both_measurements():
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_text_frontend.py"), "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "normalize (all stages)" in result.stdout
    # the simulated clock makes the streaming figures exact: the early first cut is x4.4 sooner on these answers
    assert "sentence ends only / early first cut: x4.40" in result.stdout


def test_bench_gpu_runs_from_a_bare_python(tmp_path):
    site = _bare_site(tmp_path / "site")
    assert (site / "torch").exists() and (site / "transformers").exists() and (site / "numpy").exists()
    assert not (site / "tritonclient").exists() and not (site / "soxr").exists() and not (site / "scipy").exists()
    out = tmp_path / "gpu.json"
    argv = [
        "--device",
        "cpu",
        "--tiny",
        "--frames",
        "2",
        "--single-frames",
        "3",
        "--runs",
        "1",
        "--concurrency",
        "2",
        "--breakdown-streams",
        "2",
        "--step-frames",
        "2",
        "--cpu-threads",
        "1",
        "--json",
        str(out),
    ]
    bootstrap = (
        "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", bootstrap, str(site), str(GPU_SCRIPT), *argv],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["config"]["tiny"] is True and result["environment"]["device"] == "cpu"
    assert result["model"]["attention"] == "sdpa" and result["paths"] == ["old", "new-eager"]  # no graphs on a CPU
    # Old and new path side by side: the frame step at each level, the scheduler sweep of each path.
    assert [r["streams"] for r in result["frame_step"]] == [2]
    assert all(r["old"] > 0 and r["new-eager"] > 0 for r in result["frame_step"])
    assert [r["streams"] for r in result["concurrency_by_path"]["old"]] == [2]
    assert [r["streams"] for r in result["concurrency"]] == [2]
    assert [(b["path"], b["streams"]) for b in result["breakdown"]] == [("old", 2), ("new-eager", 2)]
    assert all(b["codes_ms_per_frame"] > 0 and b["backbone_step_ms_per_frame"] > 0 for b in result["breakdown"])
    assert "silentcipher" in result["watermark"]["skipped"]  # not in a bare Python: said, not silently left out
    for row in result["concurrency"]:
        assert row["errors"] == 0 and row["completed"] == row["streams"]
        assert row["audio_s"] == pytest.approx(row["streams"] * 2 * 0.08)
        assert set(row["ttfa_ms"]) >= {"p50", "p99"} and row["rtf"]["worst"] > 0
    assert result["single_stream"]["frames"] == 3 and result["kv_cache"]["backbone_bytes_per_position"] > 0
    assert "time to first audio" in done.stdout


# -- bench_stream.py against the live Triton --------------------------------------------------------------------------
ROW_KEYS = {"target", "concurrency", "requests", "errors", "ttfa_ms", "gap_ms", "stalls", "rtf", "audio_s_per_s"}


@pytest.mark.live
def test_bench_stream_json_schema(grpc_url, tmp_path, capsys):
    targets = ["csm_1b"] + (["tts"] if (ROOT / "model_repository" / "tts").is_dir() else [])
    out = tmp_path / "stream.json"
    # Watermark off: the CPU watermark costs seconds per request; the schema is the same either way.
    bench_stream.main(
        [
            "--grpc-url",
            grpc_url,
            "--target",
            ",".join(targets),
            "--concurrency",
            "1",
            "--requests",
            "2",
            "--fixed-frames",
            "4",
            "--watermark",
            "off",
            "--no-warmup",
            "--json",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and [r["target"] for r in rows] == targets
    for row in rows:
        assert set(row) >= ROW_KEYS
        assert (row["concurrency"], row["requests"], row["errors"]) == (1, 2, 0), row["error_samples"]
        for key in ("ttfa_ms", "gap_ms"):
            assert set(row[key]) == {"p50", "p90", "p99"}
        assert 0 < row["ttfa_ms"]["p50"] <= row["ttfa_ms"]["p99"]
        assert row["gap_ms"]["p50"] is not None  # 4 frames: a 3-frame chunk, then a 1-frame chunk
        assert isinstance(row["stalls"], int) and row["rtf"]["p50"] > 0 and row["audio_s_per_s"] > 0
        assert row["audio_s"] == pytest.approx(2 * 4 * 0.08)
        assert row["fixed_frames"] == 4
    assert "TTFA ms" in capsys.readouterr().out


def test_bench_text_stream_arguments_and_tokens():
    bench = load_script("bench_text_stream")
    args = bench.parse_args(["--proxy-url", "http://127.0.0.1:1", "--rounds", "2"])
    assert (args.words_per_s, args.rounds, args.proxy_model) == (8.0, 2, "csm_1b")
    assert bench.tokens("Sure, it is.") == ["Sure,", " it", " is."]
    assert "".join(bench.tokens("a  b")) == "a  b"
    with pytest.raises(SystemExit):
        bench.parse_args(["--words-per-s", "0"])
