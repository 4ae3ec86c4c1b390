"""Render `model_repository/` for one deployment profile (local CPU or GPU image) from the same templates.

Each `config.pbtxt` in the source repository may hold `${name}` placeholders; a profile fills them. Rendering fails
on any placeholder left unfilled, so a CPU and a GPU repository can only differ where a profile says they do
(tests/test_deploy.py checks exactly that). Everything else (model.py files, the ensemble's empty `1/`)
is copied as it is.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
SOURCE = ROOT / "model_repository"
PLACEHOLDER = re.compile(r"\$\{([a-z_][a-z0-9_]*)\}")

# What differs between the local CPU stack and the GPU image. Paths are filled by the caller (render(..., values)).
# The GPU profile's stream counts are the CSM-1B fast path's target (32 real-time streams per GPU), NOT measured
# yet: change them to what `scripts/bench_gpu.py` reports as the largest real-time count. A queued stream waits at
# most 2 s on a GPU (a slot frees within a clip or two) and 30 s on the slow CPU stack. (A 1 s CPU wait answers a
# burst of long requests within 2 s, tests/test_flow_control_live.py, but refuses 20 concurrent 1 s clients,
# tests/test_proxy_live.py: one fixed wait cannot serve both; see docs/benchmarks.md, issue 20.)
# csm_instance_count is per device: KIND_GPU without a `gpus` list gives each visible GPU that many instances. The
# watermarker keeps per-stream state in one process, so it is exactly one instance, pinned to one GPU (GPU 0; another
# one with `--set 'watermark_instance_group={ kind: KIND_GPU, count: 1, gpus: [ 1 ] }'`) however many GPUs Triton sees.
# The watermarker takes one stream per pass on a CPU (batching gains nothing there, and a pass is what a joining
# stream's first chunk waits for) and up to 64 on a GPU. ensemble_max_inflight stays empty: Triton 2.51 (local) and
# 25.10 (Dockerfile.triton) lack the ensemble's max_inflight_requests; on 25.11 or later build with
# ENSEMBLE_MAX_INFLIGHT_REQUESTS (docs/deployment.md).
PROFILES: dict[str, dict[str, str]] = {
    "cpu": {
        "instance_kind": "KIND_CPU",
        "csm_instance_count": "1",
        "max_active_streams": "8",
        "max_queued_streams": "32",
        "max_queue_wait_ms": "30000",
        "watermark_instance_group": "{ kind: KIND_CPU, count: 1 }",
        "watermark_streams_per_pass": "1",
        "ensemble_max_inflight": "",
    },
    "gpu": {
        "instance_kind": "KIND_GPU",
        "csm_instance_count": "1",
        "max_active_streams": "32",
        "max_queued_streams": "32",
        "max_queue_wait_ms": "2000",
        "watermark_instance_group": "{ kind: KIND_GPU, count: 1, gpus: [ 0 ] }",
        "watermark_streams_per_pass": "64",
        "ensemble_max_inflight": "",
    },
}
DEFAULT_PATHS: dict[str, dict[str, str]] = {
    "cpu": {
        "csm_model_dir": str(ROOT / "checkpoints" / "csm-tiny"),
        "watermark_model_dir": str(ROOT / "checkpoints" / "silentcipher-tiny"),
    },
    "gpu": {"csm_model_dir": "/models/csm-1b", "watermark_model_dir": "/models/silentcipher"},
}


class UnfilledPlaceholder(ValueError):
    pass


def fill(text: str, values: dict[str, str], where: str = "template") -> str:
    missing = sorted({m.group(1) for m in PLACEHOLDER.finditer(text)} - values.keys())
    if missing:
        raise UnfilledPlaceholder(f"{where}: no value for placeholder(s) {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def render(dest: Path, profile: str, overrides: dict[str, str] | None = None, source: Path = SOURCE) -> Path:
    """Write the repository for `profile` to `dest` (replacing it) and return `dest`."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    values = {**PROFILES[profile], **DEFAULT_PATHS[profile], **(overrides or {})}
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for config in sorted(dest.glob("*/config.pbtxt")):
        config.write_text(fill(config.read_text(), values, where=str(config.relative_to(dest))))
    return dest
