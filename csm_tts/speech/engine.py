"""CSM-1B generation, one 80 ms frame at a time, with exact streaming audio.

One frame = one backbone step (Llama with KV cache) that samples codebook 0 through `lm_head`, then 31 depth-decoder
steps for codebooks 1..31. This is the loop of transformers' `CsmForConditionalGeneration.generate`, written out so
that a caller can stop between frames (cancellation), emit audio as it is produced (chunk schedule), and advance many
streams from one scheduler. Per-stream bookkeeping lives in one `Stream` object; the tensors live in the engine.

Fixed batch slots: the engine preallocates one backbone KV cache of `max_streams` slots x the model's context, and a
stream owns one slot from `start` until it finishes or is released. A frame runs the first `rows` slots (a batch-size
bucket) as one batch: each row writes its new key/value at its own position with an index operation and attends
under a mask of its own length, so caches are never copied, padded or concatenated. The whole frame (codebook 0,
31 depth steps, the backbone step) reads and writes only these fixed buffers and never waits for the device, so on a
GPU it is captured once per shape as a CUDA graph and replayed; on the CPU the same code runs eagerly.
"""

from __future__ import annotations

import math
import secrets
import threading
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from csm_tts import FRAME_MS, SAMPLE_RATE, SAMPLES_PER_FRAME
from csm_tts.speech.checkpoint import ATTENTION, load_csm
from csm_tts.speech.chunk_schedule import ChunkSchedule
from csm_tts.speech.codec_stream import StreamingCodecDecoder
from csm_tts.speech.length_rule import default_audio_length_ms

# Static shapes of a frame step (a CUDA graph per combination): batch rows are rounded up to a power of two (and
# `max_streams`), the attended context to one of these windows, the top-k to a small or the full bound.
WINDOWS = (256, 512, 1024, 2048)
SMALL_TOPK = 64  # covers the default top-k (50) with a cheap selection; larger top-k use the whole codebook


class InvalidRequest(ValueError):
    """Bad input; the message is meant for the client."""


@dataclass(frozen=True)
class ContextSegment:
    """An earlier turn: what `speaker` said (`text`) and how it sounded (24 kHz mono float32 `audio`)."""

    speaker: int
    text: str
    audio: np.ndarray


@dataclass(frozen=True)
class GenerationRequest:
    text: str
    speaker_id: int = 0
    temperature: float = 0.9  # 0 = greedy
    topk: int = 50
    max_audio_length_ms: int | None = None  # None: follows the text (csm_tts/speech/length_rule.py)
    seed: int | None = None
    context: tuple[ContextSegment, ...] = ()
    ignore_eos: bool = False  # benchmarks: always generate max_audio_length_ms


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. The context bounds keep a request's prompt building (tokenizing, Mimi encoding
    of context audio) and prefill bounded: 120 s of context is ~1500 of the 2048 positions."""

    max_speaker_id: int = 31
    max_text_chars: int = 5_000
    max_audio_length_ms: int = 90_000  # also caps the default limit that follows the text
    max_context_audio_s: float = 120.0
    max_context_segments: int = 32
    max_context_text_chars: int = 20_000  # all context segments' texts together


@dataclass(frozen=True)
class Prompt:
    """A request with its prompt built (tokenized text, Mimi-encoded context): everything before the prefill."""

    request: GenerationRequest
    embeds: torch.Tensor  # [1, positions, hidden]
    max_frames: int

    @property
    def length(self) -> int:
        return self.embeds.shape[1]


@dataclass(frozen=True)
class AudioChunk:
    index: int
    audio: np.ndarray  # float32, 24 kHz
    sample_offset: int
    is_last: bool
    finish_reason: str | None = None  # "eos" or "length" on the last chunk


class NoFreeSlot(RuntimeError):
    """Every batch slot is taken; the caller admits at most `max_streams` streams at a time."""


@dataclass(eq=False)
class Stream:
    """Per-stream bookkeeping: its slot in the engine's batch, RNG, codec decoder state, frames and counters."""

    request: GenerationRequest
    stream_id: str
    max_frames: int
    prompt_length: int
    generator: torch.Generator | None
    codec: StreamingCodecDecoder
    kv_bytes_per_position: int
    slot: int | None = None  # the engine's batch slot, owned until the stream finishes or is released
    positions: int = 0  # positions of the backbone context filled (prompt, then one per frame fed back)
    pending: list[torch.Tensor] = field(default_factory=list)  # frames not yet decoded, each [32] on the CPU
    codes: list[torch.Tensor] = field(default_factory=list)  # every frame generated so far
    chunk_index: int = 0
    samples_sent: int = 0
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def frames_generated(self) -> int:
        return len(self.codes)

    @property
    def kv_cache_bytes(self) -> int:
        """Backbone KV cache this stream's positions occupy (in its preallocated slot)."""
        return self.positions * self.kv_bytes_per_position


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, e.g. "\ud800" from JSON
        raise InvalidRequest(f"{what} cannot be encoded as UTF-8 (character {e.start} is a lone surrogate)") from None


def validate_request(request: GenerationRequest, limits: Limits, codebook_size: int) -> None:
    """Cheap checks that need no model; the prompt-length checks happen in `CsmEngine.prepare`."""
    if not isinstance(request.text, str) or not request.text.strip():
        raise InvalidRequest("text must be a non-empty string")
    if len(request.text) > limits.max_text_chars:
        raise InvalidRequest(f"text has {len(request.text)} characters; the limit is {limits.max_text_chars}")
    _check_utf8(request.text, "text")
    for name, value in (("speaker_id", request.speaker_id), *(("context speaker", s.speaker) for s in request.context)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limits.max_speaker_id:
            raise InvalidRequest(f"{name} must be an integer from 0 to {limits.max_speaker_id}, got {value!r}")
    if not (isinstance(request.temperature, (int, float)) and 0.0 <= request.temperature <= 2.0):
        raise InvalidRequest(f"temperature must be between 0 (greedy) and 2, got {request.temperature!r}")
    if not isinstance(request.topk, int) or not 1 <= request.topk <= codebook_size:
        raise InvalidRequest(f"topk must be an integer from 1 to {codebook_size}, got {request.topk!r}")
    if request.max_audio_length_ms is not None and (
        not isinstance(request.max_audio_length_ms, int)
        or isinstance(request.max_audio_length_ms, bool)
        or not FRAME_MS <= request.max_audio_length_ms <= limits.max_audio_length_ms
    ):
        raise InvalidRequest(
            f"max_audio_length_ms must be an integer from {FRAME_MS} to {limits.max_audio_length_ms}, "
            f"got {request.max_audio_length_ms!r}"
        )
    if request.seed is not None and (not isinstance(request.seed, int) or not 0 <= request.seed < 2**63):
        raise InvalidRequest(f"seed must be an integer from 0 to 2**63-1, got {request.seed!r}")
    if len(request.context) > limits.max_context_segments:
        raise InvalidRequest(f"context has {len(request.context)} segments; the limit is {limits.max_context_segments}")
    total_context = context_chars = 0
    for i, segment in enumerate(request.context):
        if not isinstance(segment.text, str) or not segment.text.strip():
            raise InvalidRequest(f"context segment {i} has empty text")
        _check_utf8(segment.text, f"context segment {i} text")
        context_chars += len(segment.text)
        if context_chars > limits.max_context_text_chars:
            raise InvalidRequest(
                f"context texts have more than {limits.max_context_text_chars} characters together (the limit)"
            )
        audio = segment.audio
        if not isinstance(audio, np.ndarray) or audio.ndim != 1 or audio.size == 0:
            raise InvalidRequest(f"context segment {i} audio must be a non-empty 1-D array of 24 kHz samples")
        if not np.isfinite(audio).all():
            raise InvalidRequest(f"context segment {i} audio contains NaN or infinite samples")
        total_context += audio.size
    if total_context > limits.max_context_audio_s * SAMPLE_RATE:
        raise InvalidRequest(
            f"context audio totals {total_context / SAMPLE_RATE:.1f} s; the limit is {limits.max_context_audio_s:.0f} s"
        )


def sample_codes(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    topks: torch.Tensor,
    uniforms: torch.Tensor,
    valid_ids: int,
    topk_bound: int | None = None,
) -> torch.Tensor:
    """Sample one id per row of [batch, vocab] logits, each row with its own temperature, top-k and uniform draw.

    Ids >= valid_ids (CSM's special codes, which the codec cannot decode) are never chosen. Temperature 0 is greedy
    (argmax, like transformers). Otherwise: temperature, top-k, softmax, then inverse-CDF sampling with the row's
    uniform number. Each stream draws its uniforms from its own generator, so what a stream samples does not depend
    on which other streams share the batch (a multinomial call over the batch would interleave their randomness).
    `topk_bound` (>= every row's top-k; default: all valid ids) is a fixed size known without reading `topks`
    back from the device, so sampling never synchronises and keeps static shapes; each row masks its own top-k.
    """
    logits = logits.float()
    logits[..., valid_ids:] = -math.inf
    greedy = logits.argmax(dim=-1)
    k = min(topk_bound or valid_ids, valid_ids)
    top_values, top_ids = torch.topk(logits / temperatures.clamp(min=1e-5)[:, None], k, dim=-1)
    ranks = torch.arange(k, device=logits.device)
    top_values = top_values.masked_fill(ranks[None, :] >= topks[:, None], -math.inf)
    cdf = torch.softmax(top_values, dim=-1).cumsum(dim=-1)
    index = (cdf < uniforms[:, None]).sum(dim=-1).clamp(max=k - 1)
    index = torch.minimum(index, topks - 1)  # rounding in the cdf must not step past the row's top-k
    sampled = top_ids.gather(-1, index[:, None]).squeeze(-1)
    return torch.where(temperatures == 0, greedy, sampled)


def batch_buckets(max_streams: int) -> tuple[int, ...]:
    """Batch sizes a frame step runs at: powers of two below `max_streams`, and `max_streams` itself."""
    sizes, size = [], 1
    while size < max_streams:
        sizes.append(size)
        size *= 2
    return (*sizes, max_streams)


def fit_slots(requested: int, slot_bytes: int, free_bytes: int, total_bytes: int) -> tuple[int, str]:
    """How many stream slots of `slot_bytes` to preallocate on a GPU, and a sentence for the log. Keeps a reserve
    (10% of the GPU, at least 2 GiB) for activations, CUDA graphs, the codec and the watermarker."""
    reserve = max(2 * 2**30, total_bytes // 10)
    fits = max(0, (free_bytes - reserve) // slot_bytes)
    slots = max(1, min(requested, fits))
    why = "as configured" if slots == requested else f"reduced from {requested}: free GPU memory"
    return slots, (
        f"{slots} stream slots x {slot_bytes / 2**20:.0f} MiB of KV cache = {slots * slot_bytes / 2**30:.2f} GiB "
        f"({why}; {free_bytes / 2**30:.1f} GiB free of {total_bytes / 2**30:.1f} GiB, room for {fits})"
    )


class SlotCache:
    """What the backbone's attention layers see as their cache during a batched frame step.

    Keys/values of every slot, [slots, kv_heads, context, head_dim] per layer, allocated once. `update` (called by
    transformers' attention) writes each row's new key/value at that row's own position and returns the first
    `window` positions of the batch's slots: views, never copies. Positions past a row's length hold leftovers
    (of this stream or of the slot's previous owner); the attention mask hides them.
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, context: int, head_dim: int, dtype, device):
        shape = (slots, kv_heads, context, head_dim)
        # Zeros, not empty: a masked position still multiplies its value by a zero weight, and 0 x NaN is NaN.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.row_ids = torch.arange(slots, device=device)
        self.rows, self.window, self.positions = 0, 0, None

    def bind(self, rows: int, window: int, positions: torch.Tensor) -> None:
        self.rows, self.window, self.positions = rows, window, positions

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        rows = self.row_ids[: self.rows]
        keys[rows, :, self.positions] = key_states[:, :, 0]
        values[rows, :, self.positions] = value_states[:, :, 0]
        return keys[: self.rows, :, : self.window], values[: self.rows, :, : self.window]

    def fill(self, slot: int, prefill: DynamicCache) -> None:
        """Copy a prefill's keys/values (batch of one) into positions 0.. of `slot` (once per stream)."""
        for layer, own in enumerate(prefill.layers):
            length = own.keys.shape[2]
            self.keys[layer][slot, :, :length] = own.keys[0]
            self.values[layer][slot, :, :length] = own.values[0]


class DepthCache:
    """The depth decoder's cache: 32 positions (backbone state, codebooks 0..30) per row, reused every frame. A
    frame writes positions 0, 1, 2, ... in order, so earlier frames' leftovers are overwritten before being read."""

    def __init__(self, layers: int, rows: int, kv_heads: int, positions: int, head_dim: int, dtype, device):
        shape = (rows, kv_heads, positions, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.rows, self.start = 0, 0

    def bind(self, rows: int, start: int) -> None:
        self.rows, self.start = rows, start

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        end = self.start + key_states.shape[2]
        keys, values = self.keys[layer_idx][: self.rows], self.values[layer_idx][: self.rows]
        keys[:, :, self.start : end] = key_states
        values[:, :, self.start : end] = value_states
        return keys[:, :, :end], values[:, :, :end]


@dataclass
class SlotState:
    """Every tensor a frame step reads or writes, allocated once (fixed addresses, as CUDA graphs need)."""

    backbone: SlotCache
    depth: DepthCache
    lengths: torch.Tensor  # [slots] positions filled per slot
    hidden: torch.Tensor  # [slots, hidden] backbone output at each slot's last position
    temperature: torch.Tensor  # [slots]
    topk: torch.Tensor  # [slots]
    inputs: torch.Tensor  # [slots, num_codebooks + 1]: each row's uniforms for the frame, then 1 if it steps
    staging: torch.Tensor  # the same on the CPU (pinned on CUDA): filled on the host, moved in one copy
    codes: torch.Tensor  # [slots, num_codebooks] the frame's codes
    window_ids: torch.Tensor  # arange(context), for the length masks
    depth_rotary: tuple[torch.Tensor, torch.Tensor]  # the depth decoder's cos/sin for its positions


class CsmEngine:
    """Generation for many streams at once. The slots' tensors are shared by all streams, so calls that touch them
    (start, step_many, release, capture_graphs) take one lock: threads may share an engine, their calls take turns."""

    def __init__(
        self,
        model,
        processor,
        schedule: ChunkSchedule | None = None,
        limits: Limits | None = None,
        max_streams: int = 8,
        cuda_graphs: bool | None = None,
    ):
        self.model = model
        self.processor = processor
        self.schedule = schedule or ChunkSchedule()
        self.limits = limits or Limits()
        self.device = next(model.parameters()).device
        config = model.config
        self.num_codebooks = config.num_codebooks
        self.codebook_size = config.codec_config.codebook_size
        self.eos_id = config.codebook_eos_token_id
        self.max_positions = config.max_position_embeddings
        self.depth_config = model.depth_decoder.config
        self.depth = model.depth_decoder.model
        for part in (config, self.depth_config):
            # The depth decoder's first step feeds two positions with no mask: only SDPA makes that causal.
            if part._attn_implementation != ATTENTION:
                raise ValueError(
                    f"CsmEngine needs attn_implementation={ATTENTION!r}, got {part._attn_implementation!r} "
                    f"for {type(part).__name__}: load the model with csm_tts.speech.checkpoint.load_csm"
                )
        # Keys and values of every backbone layer, per position: a slot holds max_positions times this
        # (32 KiB x 2048 = 64 MiB for CSM-1B in bf16).
        self.kv_bytes_per_position = (
            2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * model.dtype.itemsize
        )
        self.slot_bytes = self.kv_bytes_per_position * self.max_positions
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            max_streams, self.slot_summary = fit_slots(max_streams, self.slot_bytes, free, total)
        else:
            self.slot_summary = (
                f"{max_streams} stream slots x {self.slot_bytes / 2**20:.0f} MiB of KV cache "
                f"= {max_streams * self.slot_bytes / 2**30:.2f} GiB"
            )
        self.max_streams = max_streams
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device")
        self.batch_sizes = batch_buckets(max_streams)
        self.windows = tuple(sorted({min(w, self.max_positions) for w in WINDOWS}))
        self.topk_bounds = (min(SMALL_TOPK, self.codebook_size), self.codebook_size)
        self._owners: list[weakref.ref | None] = [None] * max_streams  # slot -> its stream
        self._state: SlotState | None = None  # allocated by the first start (or capture)
        self._graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self._lock = threading.RLock()

    @classmethod
    def from_dir(cls, model_dir, device: str = "cpu", dtype: torch.dtype | None = None, **kwargs) -> CsmEngine:
        model, processor = load_csm(model_dir, device=device, dtype=dtype)
        return cls(model, processor, **kwargs)

    def validate(self, request: GenerationRequest) -> None:
        validate_request(request, self.limits, self.codebook_size)

    def check_health(self) -> None:
        """A tiny computation on the model's device: raises when the device itself is broken (a CUDA error poisons
        the whole context), so the scheduler can tell a failed batch from a dead engine."""
        probe = torch.ones(2, device=self.device)
        if float((probe + probe).sum().cpu()) != 4.0:
            raise RuntimeError(f"the device {self.device} computes wrong results")

    # -- limits -------------------------------------------------------------------------------------------------
    def min_prompt_positions(self, request: GenerationRequest) -> int:
        """A lower bound of the prompt's positions, cheap: the texts' tokens plus one position per 80 ms frame of
        context audio (Mimi's frame rate). The chat template's markers only add to it. No Mimi, no chat template."""
        tokenizer = self.processor.tokenizer
        texts = [request.text, *(s.text for s in request.context)]
        tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
        return tokens + sum(-(-s.audio.size // SAMPLES_PER_FRAME) for s in request.context)

    def max_frames(self, request: GenerationRequest, prompt_length: int, estimated: bool = False) -> int:
        """Frames this request may generate. An explicit max_audio_length_ms must fit the context with the prompt;
        without one the limit follows the text (length_rule.py) and shrinks to what the context has left."""
        room = self.max_positions - prompt_length
        takes = f"takes {'at least ' if estimated else ''}{prompt_length} positions"
        if request.max_audio_length_ms is not None:
            frames = request.max_audio_length_ms // FRAME_MS
            if frames > room:
                raise InvalidRequest(
                    f"the prompt {takes} (text and context) and max_audio_length_ms "
                    f"{request.max_audio_length_ms} needs {frames} more; the model's context holds "
                    f"{self.max_positions}: shorten the text or context, or lower max_audio_length_ms"
                )
            return frames
        if room < 1:
            raise InvalidRequest(
                f"the prompt {takes} (text and context); the model's context holds "
                f"{self.max_positions}, leaving no room for audio: shorten the text or context"
            )
        return min(default_audio_length_ms(request.text, self.limits.max_audio_length_ms) // FRAME_MS, room)

    # -- prompt -------------------------------------------------------------------------------------------------
    def prompt_embeds(self, request: GenerationRequest) -> torch.Tensor:
        conversation = [
            {"role": str(s.speaker), "content": [{"type": "text", "text": s.text}, {"type": "audio", "audio": s.audio}]}
            for s in request.context
        ]
        conversation.append({"role": str(request.speaker_id), "content": [{"type": "text", "text": request.text}]})
        inputs = self.processor.apply_chat_template(conversation, tokenize=True, return_dict=True).to(self.device)
        if "input_values" in inputs:
            inputs["input_values"] = inputs["input_values"].to(self.model.dtype)
        # transformers' own merge of text embeddings with Mimi-encoded context audio, as `generate` uses it.
        merged = self.model._merge_input_ids_with_input_values(
            input_ids=inputs["input_ids"],
            input_values=inputs.get("input_values"),
            input_values_cutoffs=inputs.get("input_values_cutoffs"),
        )
        return merged["inputs_embeds"]

    # -- slots --------------------------------------------------------------------------------------------------
    def _slot_state(self) -> SlotState:
        if self._state is None:
            config, depth, device, dtype = self.model.config, self.depth_config, self.device, self.model.dtype
            slots = self.max_streams
            staging = torch.zeros(slots, self.num_codebooks + 1)
            depth_positions = torch.arange(self.num_codebooks, device=device)[None]
            probe = torch.zeros(1, dtype=dtype, device=device)
            self._state = SlotState(
                backbone=SlotCache(
                    config.num_hidden_layers,
                    slots,
                    config.num_key_value_heads,
                    self.max_positions,
                    config.head_dim,
                    dtype,
                    device,
                ),
                depth=DepthCache(
                    depth.num_hidden_layers,
                    slots,
                    depth.num_key_value_heads,
                    self.num_codebooks,
                    depth.head_dim,
                    dtype,
                    device,
                ),
                lengths=torch.zeros(slots, dtype=torch.long, device=device),
                hidden=torch.zeros(slots, config.hidden_size, dtype=dtype, device=device),
                temperature=torch.zeros(slots, device=device),
                topk=torch.ones(slots, dtype=torch.long, device=device),
                inputs=torch.zeros(slots, self.num_codebooks + 1, device=device),
                staging=staging.pin_memory() if device.type == "cuda" else staging,
                codes=torch.zeros(slots, self.num_codebooks, dtype=torch.long, device=device),
                window_ids=torch.arange(self.max_positions, device=device),
                depth_rotary=self.depth.rotary_emb(probe, depth_positions),
            )
        return self._state

    def _free_slot(self) -> int:
        for slot, owner in enumerate(self._owners):
            if owner is None or owner() is None:  # a stream dropped without release frees its slot too
                return slot
        raise NoFreeSlot(f"all {self.max_streams} stream slots are taken")

    @property
    def streams_active(self) -> int:
        return sum(1 for owner in self._owners if owner is not None and owner() is not None)

    def release(self, stream: Stream) -> None:
        """Give the stream's slot back (idempotent). Finished streams release theirs themselves; a caller that drops
        an unfinished stream (cancelled, failed) calls this."""
        with self._lock:
            slot, stream.slot = stream.slot, None
            if slot is not None and self._owners[slot] is not None and self._owners[slot]() is stream:
                self._owners[slot] = None

    # -- generation ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prepare(self, request: GenerationRequest) -> Prompt:
        """Validate and build the prompt, cheap checks first: the prompt's positions are bounded from below before
        any context audio is Mimi-encoded, so a request that cannot fit costs a tokenizer call, not seconds of
        encoding. Raises InvalidRequest. Needs no stream state: the scheduler runs it off its stepping thread."""
        self.validate(request)
        self.max_frames(request, self.min_prompt_positions(request), estimated=True)  # raises early when it cannot fit
        embeds = self.prompt_embeds(request)
        return Prompt(request, embeds, self.max_frames(request, embeds.shape[1]))

    @torch.inference_mode()
    def start(self, request: GenerationRequest | Prompt, stream_id: str | None = None) -> Stream:
        """Take a free slot and run the prefill of a prepared prompt into it (or prepare the request first). Raises
        InvalidRequest, or NoFreeSlot when `max_streams` streams are running."""
        prompt = request if isinstance(request, Prompt) else self.prepare(request)
        request, embeds, max_frames, prompt_length = prompt.request, prompt.embeds, prompt.max_frames, prompt.length
        if self.streams_active >= self.max_streams:  # fail before the prefill; the locked check below decides
            raise NoFreeSlot(f"all {self.max_streams} stream slots are taken")
        # Prefill stays eager (transformers' own forward, one per step at most), then its keys/values move into
        # the slot once; positions past the prompt keep the previous owner's leftovers, masked by the length.
        prefill = DynamicCache(config=self.model.config)
        out = self.model.backbone_model(inputs_embeds=embeds, cache=prefill, use_cache=True)
        generator = None
        if request.temperature > 0:
            # On the CPU whatever the model's device: 32 uniforms a frame cost nothing, and CPU generators give the
            # same numbers on every machine, so a seed means the same audio on a laptop and on a GPU server.
            generator = torch.Generator()
            generator.manual_seed(request.seed if request.seed is not None else secrets.randbits(63))
        with self._lock:
            slot = self._free_slot()
            state = self._slot_state()
            state.backbone.fill(slot, prefill)
            state.lengths[slot] = prompt_length
            state.hidden[slot] = out.last_hidden_state[0, -1]
            state.temperature[slot] = float(request.temperature)
            state.topk[slot] = request.topk
            stream = Stream(
                request=request,
                stream_id=stream_id or uuid.uuid4().hex,
                max_frames=max_frames,
                prompt_length=prompt_length,
                generator=generator,
                codec=StreamingCodecDecoder(self.model.codec_model),
                kv_bytes_per_position=self.kv_bytes_per_position,
                slot=slot,
                positions=prompt_length,
            )
            self._owners[slot] = weakref.ref(stream)
        return stream

    def _frame(self, rows: int, window: int, topk_bound: int) -> None:
        """One frame for slots 0..rows-1, on the state's fixed buffers only (what a CUDA graph captures): codebook 0
        from each slot's hidden state, codebooks 1..31 from the depth decoder, then the backbone step that feeds
        the frame back. Rows whose step flag is 0 (idle slots, streams not stepped now) compute too, but their
        length and hidden state stay as they were; what they write lands past their length, masked."""
        state = self._state
        hidden = state.hidden[:rows]
        temperature, topk = state.temperature[:rows], state.topk[:rows]
        uniforms, stepping = state.inputs[:rows, :-1], state.inputs[:rows, -1] > 0

        def sample(logits, codebook):
            return sample_codes(
                logits, temperature, topk, uniforms[:, codebook], self.codebook_size, topk_bound=topk_bound
            )

        c0 = sample(self.model.lm_head(hidden), 0)
        # Position 0 is the backbone's hidden state, position 1 codebook 0; then one codebook per step.
        first = self.depth.embed_tokens(c0)[:, None]
        logits = self._depth_logits(torch.cat([hidden[:, None].to(first.dtype), first], dim=1), rows, 0)
        codes = [c0]
        for codebook in range(1, self.num_codebooks):
            code = sample(logits, codebook)
            codes.append(code)
            if codebook < self.num_codebooks - 1:
                embeds = self.depth.embed_tokens(code + codebook * self.depth_config.vocab_size)[:, None]
                logits = self._depth_logits(embeds, rows, codebook + 1)
        frame = torch.stack(codes, dim=1)
        state.codes[:rows] = frame
        self._backbone_step(frame, rows, window, stepping)

    def _depth_logits(self, embeds: torch.Tensor, rows: int, position: int) -> torch.Tensor:
        """The depth decoder's forward pass for new positions, returning the logits of the next codebook.

        The same modules and operations as `CsmDepthDecoderForCausalLM.forward`, called directly: its wrappers
        (output capturing, config merging, mask construction) cost as much as the layers themselves at these sizes,
        31 times per frame. SDPA infers the causal mask when no mask is given (pinned at load; a test checks that
        the two-position first step equals feeding the positions one by one).
        """
        length = embeds.shape[1]
        hidden = self.depth.inputs_embeds_projector(embeds)
        cos, sin = self._state.depth_rotary
        rotary = (cos[:, position : position + length], sin[:, position : position + length])
        cache = self._state.depth
        cache.bind(rows, position)
        for layer in self.depth.layers:
            hidden = layer(hidden, cache=cache, use_cache=True, position_embeddings=rotary)
        hidden = self.depth.norm(hidden[:, -1])
        # Codebook c (1..31) has its own head; position p predicts codebook p.
        head = self.model.depth_decoder.codebooks_head.weight[position + length - 2]
        return hidden @ head

    def _backbone_step(self, frame: torch.Tensor, rows: int, window: int, stepping: torch.Tensor) -> None:
        """Feed each row's new frame to the backbone: one call for the batch, each row at its own position."""
        state, backbone = self._state, self.model.backbone_model
        embeds = backbone.embed_tokens(frame[:, None, :])
        positions = state.lengths[:rows].clamp(max=self.max_positions - 1)
        # A row attends to its own filled positions and the new one; [rows, 1, 1, window], shared by all heads.
        mask = (state.window_ids[None, :window] <= positions[:, None])[:, None, None, :]
        rotary = backbone.rotary_emb(embeds, positions[:, None])
        state.backbone.bind(rows, window, positions)
        hidden = embeds
        for layer in backbone.layers[: self.model.config.num_hidden_layers]:
            hidden = layer(
                hidden, attention_mask=mask, cache=state.backbone, use_cache=True, position_embeddings=rotary
            )
        hidden = backbone.norm(hidden[:, -1])
        state.hidden[:rows] = torch.where(stepping[:, None], hidden, state.hidden[:rows])
        state.lengths[:rows] += stepping.long()

    def _shape(self, streams: list[Stream]) -> tuple[int, int, int]:
        """The static shape a frame of these streams runs at: batch rows, context window, top-k bound."""
        rows = next(b for b in self.batch_sizes if b > max(s.slot for s in streams))
        window = next(w for w in self.windows if w > max(s.positions for s in streams))
        topk = max((s.request.topk for s in streams if s.request.temperature > 0), default=1)
        return rows, window, next(k for k in self.topk_bounds if k >= topk)

    @torch.inference_mode()
    def capture_graphs(self, max_window: int | None = None) -> int:
        """Capture the frame step as a CUDA graph for every batch size, window (up to `max_window`) and top-k bound,
        so that no stream pays for a capture later (at model load). Returns how many graphs exist."""
        if not self.cuda_graphs:
            return 0
        with self._lock:
            for rows in self.batch_sizes:
                for window in self.windows:
                    if max_window is None or window <= max_window:
                        for topk in self.topk_bounds:
                            self._graph((rows, window, topk))
            return len(self._graphs)

    def _graph(self, shape: tuple[int, int, int]):
        graph = self._graphs.get(shape)
        if graph is None:
            state = self._slot_state()
            state.inputs.zero_()  # no row steps: the warm-up run leaves every length and hidden state as it was
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._frame(*shape)  # warm-up outside the capture (library handles, workspaces)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):  # graphs never run at once: one memory pool
                self._frame(*shape)
            self._graphs[shape] = graph
        return graph

    @torch.inference_mode()
    def step_many(self, streams: list[Stream]) -> None:
        """Advance every unfinished stream by one frame (or finish it at EOS / its length limit), in one batch."""
        streams = [s for s in streams if not s.finished]
        if streams:
            with self._lock:
                self._step_locked(streams)

    def _step_locked(self, streams: list[Stream]) -> None:
        for stream in streams:
            owner = None if stream.slot is None else self._owners[stream.slot]
            if owner is None or owner() is not stream:
                raise ValueError(f"stream {stream.stream_id} has no slot (it was released)")
        shape = self._shape(streams)
        graph = self._graph(shape) if self.cuda_graphs else None  # a capture (once per shape) resets the inputs
        state = self._state
        rows = shape[0]
        # Each stream's uniforms come from its own generator, on the CPU; with the step flags they reach the device
        # in one copy. Rows that do not step get zeros (and flag 0).
        staging = state.staging[:rows]
        staging.zero_()
        for stream in streams:
            if stream.generator is not None:
                staging[stream.slot, :-1] = torch.rand(self.num_codebooks, generator=stream.generator)
            staging[stream.slot, -1] = 1
        state.inputs[:rows].copy_(staging, non_blocking=True)
        if graph is not None:
            graph.replay()
        else:
            self._frame(*shape)
        # The frame's one synchronisation: its codes, for the whole batch, to the host (EOS test, chunks).
        frames = state.codes[:rows].to("cpu", copy=True)
        for stream in streams:
            frame = frames[stream.slot]
            stream.positions += 1
            # transformers' EOS rule: codebooks 0..30 all equal to the EOS id (an all-zero frame).
            if not stream.request.ignore_eos and bool((frame[:-1] == self.eos_id).all()):
                stream.finish_reason = "eos"
            else:
                stream.pending.append(frame)
                stream.codes.append(frame)
                if stream.frames_generated >= stream.max_frames:
                    stream.finish_reason = "length"
            if stream.finished:
                self.release(stream)  # its keys/values are no longer needed; its pending frames are on the host

    def step(self, stream: Stream) -> None:
        self.step_many([stream])

    def chunk_ready(self, stream: Stream) -> bool:
        return stream.finished or len(stream.pending) >= self.schedule.frames_in_chunk(stream.chunk_index)

    def take_chunk(self, stream: Stream) -> AudioChunk:
        """Decode the pending frames into the next chunk (empty audio when a stream ends on a chunk border)."""
        codes = torch.stack(stream.pending) if stream.pending else torch.zeros(0, self.num_codebooks, dtype=torch.long)
        stream.pending = []
        audio = stream.codec.decode(codes.to(self.device))
        chunk = AudioChunk(
            index=stream.chunk_index,
            audio=audio,
            sample_offset=stream.samples_sent,
            is_last=stream.finished,
            finish_reason=stream.finish_reason,
        )
        stream.chunk_index += 1
        stream.samples_sent += audio.size
        return chunk

    def generate(self, request: GenerationRequest) -> Iterator[AudioChunk]:
        """Stream one request on its own: chunks in order, the last with is_last=True."""
        stream = self.start(request)
        try:
            while True:
                self.step(stream)
                if self.chunk_ready(stream):
                    chunk = self.take_chunk(stream)
                    yield chunk
                    if chunk.is_last:
                        return
        finally:
            self.release(stream)  # a consumer that stops early frees the slot at once
