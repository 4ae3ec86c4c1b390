"""Tiny random CSM checkpoints in the exact HF layout of `sesame/csm-1b`: for tests, the local demo and benchmarks.

The real structure (32 codebooks of 2048 entries, 80 ms frames, Mimi codec, chat template) at toy widths, so every
code path runs on a CPU in seconds. The audio is noise: the weights are random.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CsmConfig,
    CsmForConditionalGeneration,
    CsmProcessor,
    EncodecFeatureExtractor,
    MimiConfig,
    PreTrainedTokenizerFast,
)

from csm_tts import SAMPLE_RATE
from csm_tts.speech.checkpoint import CHAT_TEMPLATE


def tiny_config(codebook_size: int = 2048, text_vocab_size: int = 512):
    """A CSM with the real structure (32 codebooks, 2048-entry codebooks, 80 ms frames) at toy widths."""
    codec = MimiConfig(
        hidden_size=32,
        num_filters=4,
        upsampling_ratios=[8, 6, 5, 4],
        codebook_size=codebook_size,
        codebook_dim=8,
        vector_quantization_hidden_dimension=8,
        num_quantizers=32,
        upsample_groups=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        # A short sliding window, so that tests cover the codec transformer's windowed attention in streaming.
        sliding_window=24,
        max_position_embeddings=8000,
        use_cache=True,
    )
    return CsmConfig(
        num_codebooks=32,
        vocab_size=codebook_size + 3,
        text_vocab_size=text_vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        codebook_pad_token_id=codebook_size + 2,
        codebook_eos_token_id=0,
        bos_token_id=0,
        pad_token_id=2,
        audio_token_id=3,
        audio_eos_token_id=4,
        depth_decoder_config=dict(
            num_codebooks=32,
            backbone_hidden_size=128,
            vocab_size=codebook_size + 3,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=33,
        ),
        codec_config=codec.to_dict(),
    )


@torch.no_grad()
def randomize_codec(model) -> None:
    """Make a randomly initialised CSM's Mimi codec produce code-dependent audio of a sane level."""
    # Mimi initialises its codebooks to zeros (they are learned by EMA), which would make every code decode to the
    # same vector and the audio independent of what the model generates. Give each code its own vector.
    for module in model.codec_model.modules():
        if hasattr(module, "embed_sum") and hasattr(module, "cluster_usage"):
            module.embed_sum.normal_()
            module._embed = None
    # Keep the random codec's output roughly within [-1, 1], like real speech, so WAV files do not clip.
    final_conv = model.codec_model.decoder.decoder_seanet.layers[-1].conv
    final_conv.weight.mul_(0.01)
    final_conv.bias.zero_()


TINY_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|AUDIO|>", "<|audio_eos|>"]
# Deterministic training text for the toy byte-level BPE tokenizer.
TINY_CORPUS = [
    "The past is just a story we tell ourselves.",
    "Hello from Sesame. How are you doing today? I am fine, thank you very much.",
    "Streaming speech arrives chunk by chunk while the rest is still being generated.",
    "0123456789 [0] [1] [2] [3] ,.;:!?'\"-()",
] * 4


def tiny_tokenizer(vocab_size: int):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TINY_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|pad|>",
        model_max_length=2048,
    )


def make_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random CSM checkpoint in the exact HF layout of sesame/csm-1b (a few seconds, ~60 MB)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(vocab_size=400)
    config = tiny_config(text_vocab_size=len(tokenizer))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in TINY_SPECIAL_TOKENS}
    config.bos_token_id, config.pad_token_id = ids["<|begin_of_text|>"], ids["<|pad|>"]
    config.audio_token_id, config.audio_eos_token_id = ids["<|AUDIO|>"], ids["<|audio_eos|>"]

    torch.manual_seed(seed)
    model = CsmForConditionalGeneration(config).eval()
    randomize_codec(model)
    # Sesame's generation defaults; max_new_tokens avoids transformers' silent 20-frame default.
    model.generation_config.update(do_sample=True, temperature=0.9, top_k=50, max_new_tokens=125)
    model.generation_config._from_model_config = False  # otherwise every depth_decoder_* key is dropped on reload
    model.depth_decoder.generation_config.update(do_sample=True, temperature=0.9, top_k=50)
    model.depth_decoder.generation_config._from_model_config = False
    model.save_pretrained(out)

    feature_extractor = EncodecFeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0)
    processor = CsmProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    (out / "tiny_checkpoint.json").write_text(json.dumps({"seed": seed, "note": "random weights, for tests"}))
    return out
