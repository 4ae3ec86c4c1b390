"""The repository's shape: what imports what, and that every path a file names exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A path inside this repository, as files name them: `docs/api.md`, tests/test_engine.py, csm_tts/speech/engine.py.
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:tests|scripts|docs|csm_tts|proxy|deploy|benchmarks|model_repository)/[\w./-]*[\w/])"
)
# A pointer to the development notes kept outside the repository (`../shared/...`), which users do not have.
OUTSIDE = re.compile(r"(?<![\w.-])(?:\.\./)*shared/")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    files = []
    for name in names:
        path = ROOT / name
        if path.suffix in (".png", ".wav", ".ico") or path.name.endswith("ignore") or not path.is_file():
            continue
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def test_no_file_points_outside_the_repository():
    found = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in tracked_text_files()
        if p != Path(__file__)  # this file spells the pattern out
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not found, f"these lines point to notes outside the repository (move what users need into docs/): {found}"


def test_every_named_repository_path_exists():
    missing = []
    for path in tracked_text_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in REPO_PATH.finditer(line):
                named = match.group(1).rstrip("./")
                if any(c in named for c in "*{}<>") or "__pycache__" in named:
                    continue
                if not (ROOT / named).exists():
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {named}")
    assert not missing, "files name repository paths that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize(
    "module",
    [
        "proxy.app",
        "csm_tts.watermark.options",
        "csm_tts.parsing",
        "csm_tts.triton.errors",
        "csm_tts.text.frontend",
        "csm_tts.text.elevenlabs",
    ],
)
def test_what_the_proxy_imports_needs_no_torch(module):
    """The proxy image installs no torch: the proxy and the csm_tts modules it shares must not import it."""
    code = f"import sys, {module}; heavy = {{'torch', 'transformers'}} & set(sys.modules); print(sorted(heavy))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", f"{module} imports {result.stdout.strip()}"


def test_the_runtime_never_imports_the_tooling():
    runtime = [
        *(ROOT / "csm_tts").glob("[!t]*/*.py"),
        *(ROOT / "csm_tts" / "triton").glob("*.py"),
        *(ROOT / "proxy").rglob("*.py"),
        *(ROOT / "model_repository").rglob("*.py"),
    ]
    offenders = [str(p.relative_to(ROOT)) for p in runtime if "csm_tts.tooling" in p.read_text()]
    assert not offenders
