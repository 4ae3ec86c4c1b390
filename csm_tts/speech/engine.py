"""CSM-1B generation, one 80 ms frame at a time, with exact streaming audio.

One frame = one backbone step (Llama with KV cache) that samples codebook 0 through `lm_head`, then 31 depth-decoder
steps for codebooks 1..31. This is the loop of transformers' `CsmForConditionalGeneration.generate`, written out so
that a caller can stop between frames (cancellation), emit audio as it is produced (chunk schedule), and advance many
streams from one scheduler. Everything a stream needs lives in one `Stream` object.
"""

from __future__ import annotations

import math
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from csm_tts import FRAME_MS, SAMPLE_RATE, SAMPLES_PER_FRAME
from csm_tts.speech.checkpoint import load_csm
from csm_tts.speech.chunk_schedule import ChunkSchedule
from csm_tts.speech.codec_stream import StreamingCodecDecoder
from csm_tts.speech.length_rule import default_audio_length_ms


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


@dataclass(eq=False)
class Stream:
    """All per-stream state: KV cache, next backbone hidden state, RNG, codec decoder state, counters."""

    request: GenerationRequest
    stream_id: str
    max_frames: int
    prompt_length: int
    cache: DynamicCache
    hidden: torch.Tensor  # backbone output for the last position, [1, hidden]
    generator: torch.Generator | None
    codec: StreamingCodecDecoder
    pending: list[torch.Tensor] = field(default_factory=list)  # frames not yet decoded, each [32]
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
        """Memory held by this stream's backbone KV cache (freed with the stream)."""
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers if layer.is_initialized)


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
    logits: torch.Tensor, temperatures: torch.Tensor, topks: torch.Tensor, uniforms: torch.Tensor, valid_ids: int
) -> torch.Tensor:
    """Sample one id per row of [batch, vocab] logits, each row with its own temperature, top-k and uniform draw.

    Ids >= valid_ids (CSM's special codes, which the codec cannot decode) are never chosen. Temperature 0 is greedy
    (argmax, like transformers). Otherwise: temperature, top-k, softmax, then inverse-CDF sampling with the row's
    uniform number. Each stream draws its uniforms from its own generator, so what a stream samples does not depend
    on which other streams share the batch (a multinomial call over the batch would interleave their randomness).
    """
    logits = logits.float()
    logits[..., valid_ids:] = -math.inf
    greedy = logits.argmax(dim=-1)
    k = min(int(topks.max()), valid_ids)
    top_values, top_ids = torch.topk(logits / temperatures.clamp(min=1e-5)[:, None], k, dim=-1)
    ranks = torch.arange(k, device=logits.device)
    top_values = top_values.masked_fill(ranks[None, :] >= topks[:, None], -math.inf)
    cdf = torch.softmax(top_values, dim=-1).cumsum(dim=-1)
    index = (cdf < uniforms[:, None]).sum(dim=-1).clamp(max=k - 1)
    index = torch.minimum(index, topks - 1)  # rounding in the cdf must not step past the row's top-k
    sampled = top_ids.gather(-1, index[:, None]).squeeze(-1)
    return torch.where(temperatures == 0, greedy, sampled)


class CsmEngine:
    def __init__(self, model, processor, schedule: ChunkSchedule | None = None, limits: Limits | None = None):
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
        # Keys and values of every backbone layer, per position: a stream at full context holds
        # max_positions times this (32 KiB x 2048 = 64 MiB for CSM-1B in bf16).
        self.kv_bytes_per_position = (
            2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * model.dtype.itemsize
        )

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
        """Run the prefill of a prepared prompt (or prepare the request first). Raises InvalidRequest."""
        prompt = request if isinstance(request, Prompt) else self.prepare(request)
        request, embeds, max_frames, prompt_length = prompt.request, prompt.embeds, prompt.max_frames, prompt.length
        cache = DynamicCache(config=self.model.config)
        out = self.model.backbone_model(inputs_embeds=embeds, cache=cache, use_cache=True)
        generator = None
        if request.temperature > 0:
            # On the CPU whatever the model's device: 32 uniforms a frame cost nothing, and CPU generators give the
            # same numbers on every machine, so a seed means the same audio on a laptop and on a GPU server.
            generator = torch.Generator()
            generator.manual_seed(request.seed if request.seed is not None else secrets.randbits(63))
        return Stream(
            request=request,
            stream_id=stream_id or uuid.uuid4().hex,
            max_frames=max_frames,
            prompt_length=prompt_length,
            cache=cache,
            hidden=out.last_hidden_state[:, -1],
            generator=generator,
            codec=StreamingCodecDecoder(self.model.codec_model),
        )

    @torch.inference_mode()
    def frame_codes(self, streams: list[Stream]) -> torch.Tensor:
        """One frame for each stream, batched: codebook 0 from the backbone's hidden state, then codebooks 1..31
        from the depth decoder, whose 31 sequential steps dominate the cost of a frame. Returns [batch, 32]."""
        device = self.device
        hidden = torch.cat([s.hidden for s in streams])
        temperatures = torch.tensor([float(s.request.temperature) for s in streams], device=device)
        topks = torch.tensor([s.request.topk for s in streams], device=device)
        # One draw per codebook per frame from each stream's own generator (greedy streams have none).
        uniforms = torch.stack(
            [
                torch.rand(self.num_codebooks, generator=s.generator)
                if s.generator
                else torch.zeros(self.num_codebooks)
                for s in streams
            ]
        ).to(device)

        def sample(logits, codebook):
            return sample_codes(logits, temperatures, topks, uniforms[:, codebook], self.codebook_size)

        c0 = sample(self.model.lm_head(hidden), 0)
        depth_cache = DynamicCache(config=self.depth_config)
        # Position 0 is the backbone's hidden state, position 1 codebook 0; then one codebook per step.
        first = self.depth.embed_tokens(c0)[:, None]
        logits = self._depth_logits(torch.cat([hidden[:, None].to(first.dtype), first], dim=1), depth_cache, 0)
        codes = [c0]
        for codebook in range(1, self.num_codebooks):
            code = sample(logits, codebook)
            codes.append(code)
            if codebook < self.num_codebooks - 1:
                embeds = self.depth.embed_tokens(code + codebook * self.depth_config.vocab_size)[:, None]
                logits = self._depth_logits(embeds, depth_cache, codebook + 1)
        return torch.stack(codes, dim=1)

    def _depth_logits(self, embeds: torch.Tensor, cache: DynamicCache, position: int) -> torch.Tensor:
        """The depth decoder's forward pass for new positions, returning the logits of the next codebook.

        The same modules and operations as `CsmDepthDecoderForCausalLM.forward`, called directly: its wrappers
        (output capturing, config merging, mask construction) cost as much as the layers themselves at these sizes,
        31 times per frame. SDPA infers the causal mask when no mask is given (tests check equality with
        transformers' `generate`).
        """
        hidden = self.depth.inputs_embeds_projector(embeds)
        positions = torch.arange(position, position + embeds.shape[1], device=embeds.device)[None]
        rotary = self.depth.rotary_emb(hidden, positions)
        for layer in self.depth.layers:
            hidden = layer(hidden, position_ids=positions, cache=cache, use_cache=True, position_embeddings=rotary)
        hidden = self.depth.norm(hidden[:, -1])
        # Codebook c (1..31) has its own head; position p predicts codebook p.
        head = self.model.depth_decoder.codebooks_head.weight[position + embeds.shape[1] - 2]
        return hidden @ head

    @torch.inference_mode()
    def backbone_step(self, streams: list[Stream], frames: torch.Tensor) -> None:
        """Feed each stream's new frame to the backbone, all streams in one call.

        Streams have KV caches of different lengths: they are left-padded to a common length for the call (padding
        masked out, each stream at its own position) and each stream keeps only its own new key/value row.
        """
        embeds = self.model.backbone_model.embed_tokens(frames[:, None, :])
        if len(streams) == 1:
            out = self.model.backbone_model(inputs_embeds=embeds, cache=streams[0].cache, use_cache=True)
            streams[0].hidden = out.last_hidden_state[:, -1]
            return
        lengths = [s.cache.get_seq_length() for s in streams]
        longest = max(lengths)
        batch_cache = DynamicCache(config=self.model.config)
        for layer_index, layer in enumerate(batch_cache.layers):
            own = [s.cache.layers[layer_index] for s in streams]
            pad = [(0, 0, longest - n, 0) for n in lengths]  # left-pad the sequence dimension
            keys = torch.cat([torch.nn.functional.pad(o.keys, p) for o, p in zip(own, pad, strict=True)])
            values = torch.cat([torch.nn.functional.pad(o.values, p) for o, p in zip(own, pad, strict=True)])
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        mask = torch.zeros(len(streams), longest + 1, dtype=torch.long, device=self.device)
        for row, n in enumerate(lengths):
            mask[row, longest - n :] = 1
        positions = torch.tensor(lengths, device=self.device)[:, None]
        out = self.model.backbone_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=batch_cache, use_cache=True
        )
        for row, stream in enumerate(streams):
            stream.hidden = out.last_hidden_state[row : row + 1, -1]
            for layer_index, layer in enumerate(batch_cache.layers):
                stream.cache.layers[layer_index].update(
                    layer.keys[row : row + 1, :, -1:], layer.values[row : row + 1, :, -1:]
                )

    @torch.inference_mode()
    def step_many(self, streams: list[Stream]) -> None:
        """Advance every unfinished stream by one frame (or finish it at EOS / its length limit), in one batch."""
        streams = [s for s in streams if not s.finished]
        if not streams:
            return
        frames = self.frame_codes(streams)
        continuing = []
        for stream, frame in zip(streams, frames, strict=True):
            # transformers' EOS rule: codebooks 0..30 all equal to the EOS id (an all-zero frame).
            if not stream.request.ignore_eos and bool((frame[:-1] == self.eos_id).all()):
                stream.finish_reason = "eos"
                continue
            stream.pending.append(frame)
            stream.codes.append(frame)
            if stream.frames_generated >= stream.max_frames:
                stream.finish_reason = "length"
                continue
            continuing.append(stream)
        if continuing:
            index = [streams.index(s) for s in continuing]
            self.backbone_step(continuing, frames[index])

    def step(self, stream: Stream) -> None:
        self.step_many([stream])

    def chunk_ready(self, stream: Stream) -> bool:
        return stream.finished or len(stream.pending) >= self.schedule.frames_in_chunk(stream.chunk_index)

    def take_chunk(self, stream: Stream) -> AudioChunk:
        """Decode the pending frames into the next chunk (empty audio when a stream ends on a chunk border)."""
        codes = torch.stack(stream.pending) if stream.pending else torch.zeros(0, self.num_codebooks, dtype=torch.long)
        stream.pending = []
        audio = stream.codec.decode(codes)
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
        while True:
            self.step(stream)
            if self.chunk_ready(stream):
                chunk = self.take_chunk(stream)
                yield chunk
                if chunk.is_last:
                    return
