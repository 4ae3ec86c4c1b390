"""Load CSM-1B (HF format, as `sesame/csm-1b` ships it) from a local directory.

Weights are never downloaded at run time: a missing or incomplete directory is a clear error that names the fix
(`scripts/download_weights.py` for the real model, `scripts/make_tiny_checkpoint.py` for the tiny test model).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CsmForConditionalGeneration, CsmProcessor

REQUIRED_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "processor_config.json")

# Sesame's chat template as shipped with sesame/csm-1b (transformers' conversion script): one turn is
# `<bos>[speaker]text<eos>`, followed by `<|AUDIO|><|audio_eos|>` when the turn carries audio.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- bos_token }}{{- '[' + message['role'] + ']' }}{{- message['content'][0]['text'] }}{{- eos_token }}"
    "{%- if message['content']|length > 1 %}{{- '<|AUDIO|><|audio_eos|>' }}{%- endif %}"
    "{%- endfor %}"
)


# The engine's depth decoder feeds its first two positions with no mask and relies on SDPA treating that as causal
# (eager attention would make that step bidirectional); transformers' default may change, so it is pinned.
ATTENTION = "sdpa"


class CheckpointError(FileNotFoundError):
    pass


def check_checkpoint_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    fix = (
        "download the real weights with `python scripts/download_weights.py --what csm --dest DIR` "
        "(needs HF_TOKEN) or write the tiny test model with `python scripts/make_tiny_checkpoint.py DIR`, "
        "then point CSM_MODEL_DIR at DIR/csm-1b (or at the tiny DIR)"
    )
    if not path.is_dir():
        raise CheckpointError(f"CSM checkpoint directory {path} does not exist: {fix}")
    missing = [f for f in REQUIRED_FILES if not (path / f).exists()]
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise CheckpointError(f"CSM checkpoint {path} is incomplete (missing {', '.join(missing)}): {fix}")
    return path


def load_csm(model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Return (model, processor) from a local directory; never touches the network."""
    path = check_checkpoint_dir(model_dir)
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    processor = CsmProcessor.from_pretrained(path, local_files_only=True)
    model = CsmForConditionalGeneration.from_pretrained(
        path, local_files_only=True, dtype=dtype, attn_implementation=ATTENTION
    )
    model.to(device).eval()
    return model, processor
