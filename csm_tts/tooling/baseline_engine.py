"""The engine as it was before fixed batch slots (commit f595bcd), kept as the "old path" to compare against.

Each stream owns a `DynamicCache` that grows by concatenation; a batched frame left-pads and concatenates every
stream's cache into a fresh batch cache (and copies each stream's new row back), builds a new depth-decoder cache
every frame, and reads values back from the device inside the frame (`int(topks.max())` per codebook, an EOS test
per stream). Same prompt, sampling rule, codec and chunking as `CsmEngine` (it subclasses it), so the two differ only
in how a frame is computed. Used by tests (greedy output must be identical) and by the benchmarks (old vs new in one
run); the runtime never imports it.
"""

from __future__ import annotations

import secrets
import sys
import uuid
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from csm_tts import FRAME_MS
from csm_tts.speech.codec_stream import CodecSlots
from csm_tts.speech.engine import CsmEngine
from csm_tts.speech.request import GenerationRequest, InvalidRequest
from csm_tts.speech.sampling import sample_codes
from csm_tts.speech.stream import Stream


@dataclass(eq=False)
class BaselineStream(Stream):
    cache: DynamicCache | None = None  # this stream's own backbone KV cache
    hidden: torch.Tensor | None = None  # backbone output for the last position, [1, hidden]


class BaselineEngine(CsmEngine):
    def __init__(self, model, processor, schedule=None, limits=None):
        super().__init__(model, processor, schedule, limits, max_streams=1, cuda_graphs=False)
        self.max_streams = sys.maxsize  # no slots: a stream's cache lives and dies with the stream
        self.codec = CodecSlots(model.codec_model, 64, self.schedule.max_frames)  # the same codec path, more slots

    @torch.inference_mode()
    def start(self, request: GenerationRequest, stream_id: str | None = None) -> BaselineStream:
        self.validate(request)
        embeds = self.prompt_embeds(request)
        prompt_length = embeds.shape[1]
        max_frames = request.max_audio_length_ms // FRAME_MS
        if prompt_length + max_frames > self.max_positions:
            raise InvalidRequest(f"the prompt takes {prompt_length} positions; the context holds {self.max_positions}")
        cache = DynamicCache(config=self.model.config)
        out = self.model.backbone_model(inputs_embeds=embeds, cache=cache, use_cache=True)
        generator = None
        if request.temperature > 0:
            generator = torch.Generator()
            generator.manual_seed(request.seed if request.seed is not None else secrets.randbits(63))
        stream = BaselineStream(
            request=request,
            stream_id=stream_id or uuid.uuid4().hex,
            max_frames=max_frames,
            prompt_length=prompt_length,
            generator=generator,
            kv_bytes_per_position=self.kv_bytes_per_position,
            positions=prompt_length,
            cache=cache,
            hidden=out.last_hidden_state[:, -1],
        )
        stream.codec_slot = self.codec.claim(stream)
        return stream

    def release(self, stream: Stream) -> None:
        stream.cache = None
        self.codec.release(stream)

    @torch.inference_mode()
    def frame_codes(self, streams: list[BaselineStream]) -> torch.Tensor:
        device = self.device
        hidden = torch.cat([s.hidden for s in streams])
        temperatures = torch.tensor([float(s.request.temperature) for s in streams], device=device)
        topks = torch.tensor([s.request.topk for s in streams], device=device)
        uniforms = torch.stack(
            [
                torch.rand(self.num_codebooks, generator=s.generator)
                if s.generator
                else torch.zeros(self.num_codebooks)
                for s in streams
            ]
        ).to(device)

        def sample(logits, codebook):
            # The old top-k bound: read back from the device, once per codebook.
            bound = int(topks.max())
            return sample_codes(logits, temperatures, topks, uniforms[:, codebook], self.codebook_size, bound)

        c0 = sample(self.model.lm_head(hidden), 0)
        depth_cache = DynamicCache(config=self.depth_config)
        first = self.depth.embed_tokens(c0)[:, None]
        logits = self._old_depth_logits(torch.cat([hidden[:, None].to(first.dtype), first], dim=1), depth_cache, 0)
        codes = [c0]
        for codebook in range(1, self.num_codebooks):
            code = sample(logits, codebook)
            codes.append(code)
            if codebook < self.num_codebooks - 1:
                embeds = self.depth.embed_tokens(code + codebook * self.depth_config.vocab_size)[:, None]
                logits = self._old_depth_logits(embeds, depth_cache, codebook + 1)
        return torch.stack(codes, dim=1)

    def _old_depth_logits(self, embeds: torch.Tensor, cache: DynamicCache, position: int) -> torch.Tensor:
        hidden = self.depth.inputs_embeds_projector(embeds)
        positions = torch.arange(position, position + embeds.shape[1], device=embeds.device)[None]
        rotary = self.depth.rotary_emb(hidden, positions)
        for layer in self.depth.layers:
            hidden = layer(hidden, position_ids=positions, cache=cache, use_cache=True, position_embeddings=rotary)
        hidden = self.depth.norm(hidden[:, -1])
        head = self.model.depth_decoder.codebooks_head.weight[position + embeds.shape[1] - 2]
        return hidden @ head

    @torch.inference_mode()
    def backbone_step(self, streams: list[BaselineStream], frames: torch.Tensor) -> None:
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
    def step_many(self, streams: list[BaselineStream]) -> None:
        streams = [s for s in streams if not s.finished]
        if not streams:
            return
        frames = self.frame_codes(streams)
        continuing = []
        for stream, frame in zip(streams, frames, strict=True):
            if not stream.request.ignore_eos and bool((frame[:-1] == self.eos_id).all()):
                stream.finish_reason = "eos"
                continue
            stream.pending.append(frame)
            stream.frames_generated += 1
            if stream.frames_generated >= stream.max_frames:
                stream.finish_reason = "length"
                continue
            continuing.append(stream)
        if continuing:
            index = [streams.index(s) for s in continuing]
            self.backbone_step(continuing, frames[index])
            for stream in continuing:
                stream.positions += 1
