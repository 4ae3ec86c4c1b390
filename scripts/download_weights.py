"""Download the real weights into a directory that Triton mounts (read-only) at /models.

    python scripts/download_weights.py --what all --dest /models           # needs HF_TOKEN for sesame/csm-1b
    python scripts/download_weights.py --what all --dest /models --check   # verify only, no network

Layout written under --dest (what the gpu profile of model_repository/ expects):

    csm-1b/        sesame/csm-1b in the HF transformers format (config, generation config, tokenizer, processor,
                   safetensors); the original-format `ckpt.pt` is not downloaded
    silentcipher/  sony/silentcipher's 44.1 kHz model folder: hparams.yaml, enc_c.ckpt, dec_c.ckpt, dec_m_0.ckpt

`sesame/csm-1b` is a *gated* repository: sign in on the hub, accept the model's licence on its page, create a read
token, and pass it as HF_TOKEN (or log in once with `hf auth login`). This script is the only place that reads
HF_TOKEN: the serving images never see it, and nothing downloads weights at run time.

Exit codes: 0 done (or already complete), 2 bad arguments, 3 no token for the gated repository, 4 access refused
(licence not accepted, token invalid, repository missing), 5 hub unreachable or failing, 6 incomplete download or
incomplete directory (--check), 7 destination not writable.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NO_TOKEN = 3
EXIT_ACCESS_REFUSED = 4
EXIT_HUB_UNREACHABLE = 5
EXIT_INCOMPLETE = 6
EXIT_DEST = 7


@dataclass(frozen=True)
class Weights:
    key: str  # --what value
    repo_id: str
    subdir: str  # under --dest
    gated: bool
    allow_patterns: tuple[str, ...]
    required: tuple[str, ...]  # files that must exist in subdir afterwards
    hub_folder: str = ""  # files live in this folder of the repository; they are moved to subdir's top level

    @property
    def page(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"


# Required CSM files: what csm_tts.speech.checkpoint.REQUIRED_FILES checks before loading, plus the weights themselves
# (tests/test_download_weights.py keeps the two lists in step).
CSM = Weights(
    key="csm",
    repo_id="sesame/csm-1b",
    subdir="csm-1b",
    gated=True,
    allow_patterns=("*.json", "*.safetensors", "*.jinja", "tokenizer.*"),
    required=("config.json", "generation_config.json", "tokenizer_config.json", "processor_config.json"),
)
SILENTCIPHER_FOLDER = "44_1_khz/73999_iteration"  # the 44.1 kHz model, as silentcipher.get_model('44.1k') uses it
WATERMARK = Weights(
    key="watermark",
    repo_id="sony/silentcipher",
    subdir="silentcipher",
    gated=False,
    allow_patterns=tuple(
        f"{SILENTCIPHER_FOLDER}/{name}" for name in ("hparams.yaml", "enc_c.ckpt", "dec_c.ckpt", "dec_m_0.ckpt")
    ),
    required=("hparams.yaml", "enc_c.ckpt", "dec_c.ckpt", "dec_m_0.ckpt"),
    hub_folder=SILENTCIPHER_FOLDER,
)
WHAT = {"csm": (CSM,), "watermark": (WATERMARK,), "all": (CSM, WATERMARK)}


class DownloadError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def missing_files(weights: Weights, directory: Path) -> list[str]:
    """What is missing for `weights` in `directory` (empty: complete). Checks sharded safetensors indexes too."""
    if not directory.is_dir():
        return [f"{directory} (the whole directory)"]
    missing = [name for name in weights.required if not (directory / name).is_file()]
    if weights is CSM:
        shards = sorted(directory.glob("*.safetensors"))
        if not shards:
            missing.append("*.safetensors")
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                listed = set(json.loads(index.read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError) as e:
                missing.append(f"a readable {index.name} ({e})")
            else:
                missing.extend(sorted(name for name in listed if not (directory / name).is_file()))
    return missing


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"


def find_token() -> str | None:
    """HF_TOKEN, else the token saved by `hf auth login` (never printed)."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return token
    try:
        from huggingface_hub import get_token
    except ImportError:
        return None
    return get_token() or None


def download(weights: Weights, dest: Path, token: str | None, revision: str | None, timeout_s: float) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:
        raise DownloadError(
            f"huggingface_hub is not installed ({e}): pip install -c constraints.txt huggingface_hub", EXIT_USAGE
        ) from None

    target = dest / weights.subdir
    hub_log = _HubWarnings()
    # silentcipher's files sit two folders deep in its repository: download into a staging folder on the same
    # filesystem, then move them up, so that the model folder is exactly what CSM_WATERMARK_MODEL_DIR points at.
    staging = Path(tempfile.mkdtemp(prefix=f".{weights.subdir}-", dir=dest)) if weights.hub_folder else target
    try:
        try:
            with hub_log:
                snapshot_download(
                    weights.repo_id,
                    revision=revision,
                    local_dir=staging,
                    allow_patterns=list(weights.allow_patterns),
                    token=token or None,
                    etag_timeout=timeout_s,
                )
        except GatedRepoError:
            raise DownloadError(
                f"access to {weights.repo_id} was refused: it is a gated repository. "
                f"Sign in at {weights.page} with the "
                "account that owns HF_TOKEN, accept the licence there, and try again",
                EXIT_ACCESS_REFUSED,
            ) from None
        except RevisionNotFoundError:
            raise DownloadError(f"{weights.repo_id} has no revision {revision!r}", EXIT_ACCESS_REFUSED) from None
        except RepositoryNotFoundError:
            raise DownloadError(
                f"{weights.repo_id} was not found or the token was refused (HTTP 401/404): check HF_TOKEN and that "
                f"{weights.page} exists",
                EXIT_ACCESS_REFUSED,
            ) from None
        except OfflineModeIsEnabled:
            raise DownloadError(
                "HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to download", EXIT_HUB_UNREACHABLE
            ) from None
        except LocalEntryNotFoundError as e:
            # snapshot_download's answer when the hub cannot be reached and nothing is cached.
            cause = e.__cause__ or e.__context__
            if isinstance(cause, OfflineModeIsEnabled):
                raise DownloadError(
                    "HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to download", EXIT_HUB_UNREACHABLE
                ) from None
            raise DownloadError(
                f"cannot reach the hub at {hub_endpoint()} to download {weights.repo_id}"
                f"{f' ({type(cause).__name__}: {cause})' if cause else ''}: check the network, a proxy (HTTPS_PROXY), "
                "or HF_ENDPOINT",
                EXIT_HUB_UNREACHABLE,
            ) from None
        except HfHubHTTPError as e:
            raise DownloadError(
                f"the hub failed while downloading {weights.repo_id}: {e}", EXIT_HUB_UNREACHABLE
            ) from None
        except OSError as e:  # connection errors raised outside the snapshot fallback, or a full disk
            raise DownloadError(
                f"downloading {weights.repo_id} failed: {type(e).__name__}: {e}", EXIT_HUB_UNREACHABLE
            ) from None
        except Exception as e:  # the HTTP client's own errors (e.g. the connection dropped during a file)
            if type(e).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore", "httpcore2"):
                raise
            raise DownloadError(
                f"the connection to {hub_endpoint()} failed while downloading {weights.repo_id}: "
                f"{type(e).__name__}: {e}. Run the same command again to resume",
                EXIT_HUB_UNREACHABLE,
            ) from None
        if weights.hub_folder:
            target.mkdir(parents=True, exist_ok=True)
            for name in weights.required:
                source = staging / weights.hub_folder / name
                if source.is_file():
                    os.replace(source, target / name)
    finally:
        if weights.hub_folder:
            shutil.rmtree(staging, ignore_errors=True)
    missing = missing_files(weights, target)
    if missing and hub_log.unreachable:
        # With files already in local_dir, snapshot_download returns them (with a warning) instead of failing.
        raise DownloadError(
            f"cannot reach the hub at {hub_endpoint()} to finish {weights.repo_id} in {target} "
            f"(missing {', '.join(missing)}): {hub_log.unreachable}",
            EXIT_HUB_UNREACHABLE,
        )
    if missing:
        raise DownloadError(
            f"{weights.repo_id} downloaded incompletely into {target}: missing {', '.join(missing)}. Run the same "
            "command again (finished files are kept); if it persists, the repository layout changed",
            EXIT_INCOMPLETE,
        )
    return target


class _HubWarnings(logging.Handler):
    """Records huggingface_hub's warning that it fell back to local files because the hub could not be reached."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.unreachable = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "cannot be accessed" in message:
            self.unreachable = message

    def __enter__(self):
        logging.getLogger("huggingface_hub").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("huggingface_hub").removeHandler(self)


def writable_dest(dest: Path) -> None:
    if dest.exists() and not dest.is_dir():
        raise DownloadError(f"--dest {dest} exists and is not a directory", EXIT_DEST)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create --dest {dest}: {e.strerror or e}", EXIT_DEST) from None
    if not os.access(dest, os.W_OK | os.X_OK):
        raise DownloadError(f"--dest {dest} is not writable by this user (uid {os.getuid()})", EXIT_DEST)


def run(args: argparse.Namespace) -> int:
    selected = WHAT[args.what]
    dest: Path = args.dest
    if args.check:
        problems = {w.repo_id: missing_files(w, dest / w.subdir) for w in selected}
        for weights in selected:
            missing = problems[weights.repo_id]
            state = "complete" if not missing else "INCOMPLETE, missing " + ", ".join(missing)
            print(f"{weights.repo_id} in {dest / weights.subdir}: {state}")
        if any(problems.values()):
            print(
                f"download them with: python scripts/download_weights.py --what {args.what} --dest {dest}",
                file=sys.stderr,
            )
            return EXIT_INCOMPLETE
        return EXIT_OK

    token = find_token()
    for weights in selected:
        if weights.gated and not token:
            raise DownloadError(
                f"{weights.repo_id} is a gated repository and no Hugging Face token was found. Accept the licence at "
                f"{weights.page}, create a read token at https://huggingface.co/settings/tokens, and set HF_TOKEN "
                "(in .env for docker compose, in the csm-tts-hf-token Secret for Kubernetes)",
                EXIT_NO_TOKEN,
            )
    writable_dest(dest)
    for weights in selected:
        target = dest / weights.subdir
        if not args.force and not missing_files(weights, target):
            print(f"{weights.repo_id}: already complete in {target} (--force downloads again)")
            continue
        revision = args.csm_revision if weights is CSM else args.watermark_revision
        print(f"{weights.repo_id}: downloading into {target} ...", flush=True)
        download(weights, dest, token, revision, args.timeout)
        print(f"{weights.repo_id}: complete in {target}")
    variables = {CSM: "CSM_MODEL_DIR", WATERMARK: "CSM_WATERMARK_MODEL_DIR"}
    print(
        "Mount the folder at /models for the Triton image; for the local stack: "
        + " ".join(f"{variables[w]}={(dest / w.subdir).resolve()}" for w in selected)
        + " make serve"
    )
    return EXIT_OK


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download sesame/csm-1b (gated: needs HF_TOKEN) and sony/silentcipher for the Triton models.",
        epilog="Exit codes: 0 ok, 2 bad arguments, 3 no token, 4 access refused, 5 hub unreachable, "
        "6 incomplete, 7 destination not writable.",
    )
    parser.add_argument("--what", choices=sorted(WHAT), default="all", help="which weights (default: all)")
    parser.add_argument(
        "--dest",
        type=Path,
        required=True,
        help="directory that Triton mounts at /models (csm-1b/ and silentcipher/ go below it)",
    )
    parser.add_argument("--check", action="store_true", help="only verify that the files are complete (no network)")
    parser.add_argument("--force", action="store_true", help="download again even when the files are complete")
    parser.add_argument("--csm-revision", default=None, help="branch, tag or commit of sesame/csm-1b (default: main)")
    parser.add_argument(
        "--watermark-revision", default=None, help="branch, tag or commit of sony/silentcipher (default: main)"
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the hub's first answer per file (default: 10)"
    )
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error("--timeout must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except DownloadError as e:
        print(f"download_weights: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("download_weights: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
