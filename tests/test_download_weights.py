"""scripts/download_weights.py: arguments, exit codes and clear failures. Nothing is ever downloaded here.

Every run points HF_ENDPOINT at a closed local port (connection refused at once) and HF_HOME at a temporary folder
(no saved token, no cache), so the tests are fast and never touch the real hub, even on a machine that can reach it.
Download behaviour past the network (silentcipher's folder moved up, incomplete downloads, refused access) is tested
in-process with a fake `snapshot_download`.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "download_weights.py"


def load_script():
    spec = importlib.util.spec_from_file_location("download_weights", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


dw = load_script()


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """An environment in which the hub is unreachable and no token is saved."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1"
    )
    for name in [k for k in os.environ if k.startswith(("HF_", "HUGGING"))]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("HF_"):
            monkeypatch.setenv(name, value)
    return env


def run(args, env, timeout=60):
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    proc.elapsed = time.monotonic() - started
    return proc


def write_csm(directory: Path, shards: tuple[str, ...] = ("model.safetensors",)) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in dw.CSM.required:
        (directory / name).write_text("{}")
    for shard in shards:
        (directory / shard).write_bytes(b"\0" * 8)
    return directory


def write_watermark(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in dw.WATERMARK.required:
        (directory / name).write_bytes(b"x")
    return directory


# -- arguments -------------------------------------------------------------------------------------------------------
def test_help_documents_the_exit_codes(hub_env):
    proc = run(["--help"], hub_env)
    assert proc.returncode == 0
    assert "--what" in proc.stdout and "--dest" in proc.stdout and "Exit codes" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--dest"),
        (["--dest", "x", "--what", "everything"], "invalid choice"),
        (["--dest", "x", "--timeout", "0"], "--timeout must be positive"),
    ],
)
def test_bad_arguments_exit_2(hub_env, args, message):
    proc = run(args, hub_env)
    assert proc.returncode == dw.EXIT_USAGE == 2
    assert message in proc.stderr


def test_what_selects_the_repositories():
    assert [w.repo_id for w in dw.WHAT["all"]] == ["sesame/csm-1b", "sony/silentcipher"]
    assert [w.repo_id for w in dw.WHAT["csm"]] == ["sesame/csm-1b"]
    assert [w.repo_id for w in dw.WHAT["watermark"]] == ["sony/silentcipher"]
    args = dw.parse_args(["--dest", "/models"])
    assert args.what == "all" and args.dest == Path("/models") and not args.check and not args.force


# -- clear failures (subprocess, no network) -------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["csm", "all"])
def test_gated_repository_without_token_fails_before_any_download(hub_env, tmp_path, what):
    dest = tmp_path / "models"
    proc = run(["--what", what, "--dest", str(dest)], hub_env)
    assert proc.returncode == dw.EXIT_NO_TOKEN == 3, proc.stderr
    assert "gated" in proc.stderr and "https://huggingface.co/sesame/csm-1b" in proc.stderr
    assert "HF_TOKEN" in proc.stderr and "licence" in proc.stderr
    assert not dest.exists(), "nothing is created before the token check"


def test_watermark_alone_needs_no_token(hub_env, tmp_path):
    proc = run(["--what", "watermark", "--dest", str(tmp_path / "models")], hub_env)
    assert proc.returncode == dw.EXIT_HUB_UNREACHABLE, proc.stderr  # it got as far as the (unreachable) hub


@pytest.mark.parametrize("what", ["csm", "watermark", "all"])
def test_unreachable_hub_fails_fast_and_clearly(hub_env, tmp_path, what):
    env = {**hub_env, "HF_TOKEN": "hf_not_a_real_token"}
    proc = run(["--what", what, "--dest", str(tmp_path / "models"), "--timeout", "2"], env)
    assert proc.returncode == dw.EXIT_HUB_UNREACHABLE == 5, proc.stderr
    assert f"cannot reach the hub at {hub_env['HF_ENDPOINT']}" in proc.stderr
    assert "hf_not_a_real_token" not in proc.stdout + proc.stderr, "the token is never printed"
    assert proc.elapsed < 30
    assert not list((tmp_path / "models").glob(".silentcipher-*")), "no staging folder left behind"


def test_unreachable_hub_with_a_partial_download_says_so(hub_env, tmp_path):
    """With files already present, huggingface_hub returns them instead of failing: still a network error."""
    partial = tmp_path / "models" / "csm-1b"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    proc = run(["--what", "csm", "--dest", str(tmp_path / "models")], {**hub_env, "HF_TOKEN": "hf_x"})
    assert proc.returncode == dw.EXIT_HUB_UNREACHABLE, proc.stderr
    assert "cannot reach the hub" in proc.stderr and "safetensors" in proc.stderr


def test_offline_mode_is_named(hub_env, tmp_path):
    proc = run(["--what", "watermark", "--dest", str(tmp_path / "m")], {**hub_env, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == dw.EXIT_HUB_UNREACHABLE and "HF_HUB_OFFLINE" in proc.stderr


def test_destination_that_is_a_file_exits_7(hub_env, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("")
    proc = run(["--what", "watermark", "--dest", str(target)], hub_env)
    assert proc.returncode == dw.EXIT_DEST == 7 and "not a directory" in proc.stderr


def test_complete_weights_are_not_downloaded_again(hub_env, tmp_path):
    write_csm(tmp_path / "models" / "csm-1b")
    write_watermark(tmp_path / "models" / "silentcipher")
    proc = run(["--what", "all", "--dest", str(tmp_path / "models")], {**hub_env, "HF_TOKEN": "hf_x"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("already complete") == 2


# -- --check (no network) --------------------------------------------------------------------------------------------
def test_check_reports_missing_and_complete_weights(hub_env, tmp_path):
    proc = run(["--check", "--dest", str(tmp_path)], hub_env)
    assert proc.returncode == dw.EXIT_INCOMPLETE == 6
    assert "INCOMPLETE" in proc.stdout and "download_weights.py --what all" in proc.stderr
    write_csm(tmp_path / "csm-1b")
    assert run(["--check", "--what", "csm", "--dest", str(tmp_path)], hub_env).returncode == 0
    write_watermark(tmp_path / "silentcipher")
    proc = run(["--check", "--dest", str(tmp_path)], hub_env)
    assert proc.returncode == 0 and proc.stdout.count("complete") == 2


def test_sharded_checkpoint_needs_every_shard(tmp_path):
    directory = write_csm(tmp_path / "csm-1b", shards=("model-00001-of-00002.safetensors",))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    assert dw.missing_files(dw.CSM, directory) == ["model-00002-of-00002.safetensors"]
    (directory / "model-00002-of-00002.safetensors").write_bytes(b"")
    assert dw.missing_files(dw.CSM, directory) == []


# -- past the network, with a fake hub -------------------------------------------------------------------------------
@pytest.fixture
def fake_hub(monkeypatch, hub_env):
    """Replaces huggingface_hub.snapshot_download; `files` says what the fake repository holds."""
    import huggingface_hub

    state = {"files": {}, "calls": [], "error": None}

    def snapshot_download(repo_id, *, local_dir, allow_patterns, token=None, revision=None, **kwargs):
        state["calls"].append(
            {"repo_id": repo_id, "allow_patterns": allow_patterns, "token": token, "revision": revision}
        )
        if state["error"] is not None:
            raise state["error"]
        import fnmatch

        for name, data in state["files"].get(repo_id, {}).items():
            if any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                path = Path(local_dir) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    return state


def test_silentcipher_model_folder_is_moved_up_and_nothing_else_kept(fake_hub, tmp_path):
    folder = dw.SILENTCIPHER_FOLDER
    fake_hub["files"]["sony/silentcipher"] = {
        **{f"{folder}/{name}": b"w" for name in dw.WATERMARK.required},
        f"{folder}/extra.txt": b"not needed",
        "16_khz/97561_iteration/enc_c.ckpt": b"other model",
    }
    assert dw.main(["--what", "watermark", "--dest", str(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "silentcipher").iterdir()) == sorted(dw.WATERMARK.required)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["silentcipher"], "the staging folder is removed"
    assert fake_hub["calls"][0]["allow_patterns"] == [f"{folder}/{name}" for name in dw.WATERMARK.required]


def test_csm_download_fetches_only_the_hf_format_files(fake_hub, tmp_path):
    fake_hub["files"]["sesame/csm-1b"] = {
        **{name: b"{}" for name in dw.CSM.required},
        "model.safetensors": b"w",
        "tokenizer.json": b"{}",
        "chat_template.jinja": b"t",
        "ckpt.pt": b"original format, 6 GB",
        "README.md": b"r",
    }
    assert dw.main(["--what", "csm", "--dest", str(tmp_path), "--csm-revision", "abc123"]) == 0
    names = {p.name for p in (tmp_path / "csm-1b").iterdir()}
    assert "ckpt.pt" not in names and "README.md" not in names
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja", *dw.CSM.required} <= names
    call = fake_hub["calls"][0]
    assert call["token"] == "hf_fake" and call["revision"] == "abc123"


def test_incomplete_download_exits_6(fake_hub, tmp_path, capsys):
    fake_hub["files"]["sesame/csm-1b"] = {"config.json": b"{}", "model.safetensors": b"w"}
    assert dw.main(["--what", "csm", "--dest", str(tmp_path)]) == dw.EXIT_INCOMPLETE
    err = capsys.readouterr().err
    assert "incompletely" in err and "generation_config.json" in err


def http_error(cls, status: int):
    import httpx2

    response = httpx2.Response(status, request=httpx2.Request("GET", "http://127.0.0.1/api/models/x"))
    return cls(f"{status} error", response=response)


@pytest.mark.parametrize(
    "error_name, message",
    [
        ("GatedRepoError", "accept the licence"),
        ("RepositoryNotFoundError", "not found or the token was refused"),
    ],
)
def test_refused_access_exits_4(fake_hub, tmp_path, capsys, error_name, message):
    from huggingface_hub import errors

    fake_hub["error"] = http_error(getattr(errors, error_name), 401)
    assert dw.main(["--what", "csm", "--dest", str(tmp_path)]) == dw.EXIT_ACCESS_REFUSED == 4
    assert message in capsys.readouterr().err


def test_connection_dropped_during_a_file_exits_5(fake_hub, tmp_path, capsys):
    import httpx2

    fake_hub["error"] = httpx2.ReadTimeout("timed out")
    assert dw.main(["--what", "watermark", "--dest", str(tmp_path)]) == dw.EXIT_HUB_UNREACHABLE
    assert "run the same command again" in capsys.readouterr().err.lower()


def test_hub_server_error_exits_5(fake_hub, tmp_path, capsys):
    from huggingface_hub.errors import HfHubHTTPError

    fake_hub["error"] = http_error(HfHubHTTPError, 503)
    assert dw.main(["--what", "watermark", "--dest", str(tmp_path)]) == dw.EXIT_HUB_UNREACHABLE
    assert "the hub failed" in capsys.readouterr().err


# -- the layout agrees with the loaders and the GPU model repository ------------------------------------------------
def module_constant(path: Path, name: str):
    """A literal module-level constant, read without importing the module (which would import torch)."""
    tree = ast.parse(path.read_text())
    return next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets)
    )


def test_required_files_cover_what_the_loaders_read():
    assert set(module_constant(ROOT / "csm_tts" / "speech" / "checkpoint.py", "REQUIRED_FILES")) <= set(dw.CSM.required)
    # The watermark stage loads exactly these files from CSM_WATERMARK_MODEL_DIR.
    weights = ROOT / "csm_tts" / "watermark" / "weights.py"
    assert set(module_constant(weights, "CHECKPOINT_FILES")) == set(dw.WATERMARK.required)


def test_layout_matches_the_gpu_profile_paths():
    from csm_tts.tooling.model_repository import DEFAULT_PATHS

    gpu = DEFAULT_PATHS["gpu"]
    assert gpu["csm_model_dir"] == f"/models/{dw.CSM.subdir}"
    assert gpu["watermark_model_dir"] == f"/models/{dw.WATERMARK.subdir}"
