"""Install a real Triton Inference Server (2.51.0) for this CPU machine, from PyPI alone.

The `nvidia-pytriton` wheel ships a complete `tritonserver` binary, its shared libraries, the Python backend and
backend stubs for Python 3.8-3.13. We only need those files, not PyTriton's Python API, so the wheel is downloaded
(not installed) and the server parts are extracted into an ignored folder (default `.triton/`):

    .triton/bin/tritonserver
    .triton/backends/python/            libtriton_python.so + the stub for the running Python
    .triton/lib/                        the wheel's bundled libraries (libtritonserver, libb64, libcudart, ...)

The version comes from constraints.txt, the project's single list of pins.
"""

from __future__ import annotations

import argparse
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER_PREFIX = "pytriton/tritonserver/"
LIBS_PREFIX = "nvidia_pytriton.libs/"


def pinned_version(package: str, constraints: Path = ROOT / "constraints.txt") -> str:
    for line in constraints.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep and name.strip().lower() == package:
            return version.strip()
    raise SystemExit(f"{package} is not pinned in {constraints}")


def download_wheel(version: str, cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"nvidia_pytriton-{version}-*.whl"))
    if not found:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "-d",
                str(cache),
                f"nvidia-pytriton=={version}",
            ],
            check=True,
        )
        found = sorted(cache.glob(f"nvidia_pytriton-{version}-*.whl"))
    if not found:
        raise SystemExit(f"pip did not produce an nvidia_pytriton-{version} wheel in {cache}")
    return found[-1]


def extract(wheel: Path, dest: Path) -> None:
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        staging = Path(tmp) / "triton"
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                if info.filename.startswith(SERVER_PREFIX):
                    rel = info.filename[len(SERVER_PREFIX) :]
                elif info.filename.startswith(LIBS_PREFIX):
                    rel = "lib/" + info.filename[len(LIBS_PREFIX) :]
                else:
                    continue
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
        stub = staging / "python_backend_stubs" / py / "triton_python_backend_stub"
        if not stub.exists():
            raise SystemExit(f"the wheel has no Python backend stub for Python {py}")
        shutil.copy2(stub, staging / "backends" / "python" / "triton_python_backend_stub")
        shutil.rmtree(staging / "python_backend_stubs")
        for exe in (staging / "bin" / "tritonserver", staging / "backends" / "python" / "triton_python_backend_stub"):
            exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=ROOT / ".triton")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "wheels")
    args = parser.parse_args()
    dest = args.dest.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    version = pinned_version("nvidia-pytriton")
    wheel = download_wheel(version, args.cache)
    extract(wheel, dest)
    print(f"Triton server from {wheel.name} installed in {dest}")


if __name__ == "__main__":
    main()
