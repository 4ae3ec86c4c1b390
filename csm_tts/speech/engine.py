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

import secrets
import threading
import uuid
from collections.abc import Iterator

import torch
from transformers.cache_utils import DynamicCache

from csm_tts.speech.checkpoint import ATTENTION, load_csm
from csm_tts.speech.chunk_schedule import ChunkSchedule
from csm_tts.speech.codec_stream import CodecSlots, next_chunks
from csm_tts.speech.graphs import FrameGraphs, compare_probe, probe_frame
from csm_tts.speech.prompt import PromptBuilder
from csm_tts.speech.request import GenerationRequest, Limits
from csm_tts.speech.sampling import sample_codes
from csm_tts.speech.slots import SMALL_TOPK, WINDOWS, SlotOwners, SlotState, batch_buckets, fit_slots
from csm_tts.speech.stream import AudioChunk, NoFreeSlot, Prompt, Stream


class CsmEngine(PromptBuilder):
    """Generation for many streams at once.

    Threads: the slots' tensors are shared by all streams, so calls that touch them (start, step_many, release,
    capture_graphs) take the engine lock and take turns. A stream's own state has two parts with one owner each: the
    stepping thread's (`pending` frames, appended by `step_many`; `cut_chunk` moves them to `due` once `chunk_ready`)
    and the decoding thread's (`due`, the codec state, `chunk_index`, `samples_sent`, used by `take_chunks`). So a
    stream is stepped while its last chunk is decoded; a caller that runs the two on different threads (the
    scheduler's stepper and output stage) cuts a stream's next chunk only after its previous one has been taken, and
    releases slots on the stepping thread. `prepare` touches no slot at all."""

    def __init__(
        self,
        model,
        processor,
        schedule: ChunkSchedule | None = None,
        limits: Limits | None = None,
        max_streams: int = 8,
        cuda_graphs: str | bool | None = "auto",
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
        # Each stream's codec state, in slots of its own: a finished stream frees its backbone slot at once but
        # keeps its codec slot until its last chunk is decoded, so twice the slots: room for a new stream in every
        # backbone slot while the streams that left it still wait for the output stage.
        self.codec = CodecSlots(model.codec_model, 2 * max_streams, self.schedule.max_frames)
        self.graphs = FrameGraphs(cuda_graphs, self.device)  # auto|on|off (graphs.py)
        self.batch_sizes = batch_buckets(max_streams)
        self.windows = tuple(sorted({min(w, self.max_positions) for w in WINDOWS}))
        self.topk_bounds = (min(SMALL_TOPK, self.codebook_size), self.codebook_size)
        self._owners = SlotOwners(max_streams)  # slot -> its stream
        self._state: SlotState | None = None  # allocated by the first start (or capture)
        self._lock = threading.RLock()

    @property
    def cuda_graphs(self) -> bool:
        """Whether frames replay CUDA graphs (False when eager, `auto` on a CPU or after a fallback)."""
        return self.graphs.enabled

    @cuda_graphs.setter
    def cuda_graphs(self, enabled: bool) -> None:  # benchmarks switch one engine between graphs and eager
        self.graphs.enabled = enabled

    @classmethod
    def from_dir(cls, model_dir, device: str = "cpu", dtype: torch.dtype | None = None, **kwargs) -> CsmEngine:
        model, processor = load_csm(model_dir, device=device, dtype=dtype)
        return cls(model, processor, **kwargs)

    def check_health(self) -> None:
        """A tiny computation on the model's device: raises when the device itself is broken (a CUDA error poisons
        the whole context), so the scheduler can tell a failed batch from a dead engine."""
        probe = torch.ones(2, device=self.device)
        if float((probe + probe).sum().cpu()) != 4.0:
            raise RuntimeError(f"the device {self.device} computes wrong results")

    # -- slots --------------------------------------------------------------------------------------------------
    def _slot_state(self) -> SlotState:
        if self._state is None:
            self._state = SlotState.allocate(self.model, self.max_streams)
        return self._state

    def _free_slot(self) -> int:
        slot = self._owners.free_slot()
        if slot is None:
            raise NoFreeSlot(f"all {self.max_streams} stream slots are taken")
        return slot

    @property
    def streams_active(self) -> int:
        return self._owners.taken

    def release(self, stream: Stream) -> None:
        """Give the stream's slots back (idempotent). Finished streams release their backbone slot themselves and
        their codec slot with their last chunk; a caller that drops a stream (cancelled, failed) calls this."""
        self._release_backbone(stream)
        self.codec.release(stream)

    def _release_backbone(self, stream: Stream) -> None:
        with self._lock:
            slot, stream.slot = stream.slot, None
            self._owners.free(slot, stream)

    # -- generation ---------------------------------------------------------------------------------------------
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
                kv_bytes_per_position=self.kv_bytes_per_position,
                slot=slot,
                positions=prompt_length,
            )
            self._owners.take(slot, stream)
            try:
                stream.codec_slot = self.codec.claim(stream)
            except NoFreeSlot:
                self._owners.free(slot, stream)
                raise
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
        """Apply the `cuda_graphs` policy at model load (graphs.py): capture the frame step for every batch size,
        window (up to `max_window`) and top-k bound, so that no stream pays for a capture later, and check a probe
        replay against the eager step. Returns how many graphs are in use (0 when frames run eagerly)."""
        self.load_graphs(max_window)
        return len(self.graphs.graphs)

    @torch.inference_mode()
    def load_graphs(self, max_window: int | None = None) -> str:
        """`capture_graphs`, returning the sentence for the log (it says when `auto` fell back to eager frames)."""
        shapes = [
            (rows, window, topk)
            for rows in self.batch_sizes
            for window in self.windows
            if max_window is None or window <= max_window
            for topk in self.topk_bounds
        ]
        with self._lock:
            return self.graphs.load(shapes, self._graph, self._check_graphs)

    def _graph(self, shape: tuple[int, int, int]):
        # A capture's warm-up run steps no row (inputs zeroed): lengths and hidden states stay as they were.
        return self.graphs.get(shape, lambda: self._frame(*shape), lambda: self._slot_state().inputs.zero_())

    def _check_graphs(self) -> str | None:
        shape = (self.batch_sizes[-1], self.windows[0], self.topk_bounds[0])
        state, graph = self._slot_state(), self._graph(shape)  # captured first: a capture resets the inputs
        eager = probe_frame(state, shape[0], lambda: self._frame(*shape))
        return compare_probe(eager, probe_frame(state, shape[0], graph.replay))

    @torch.inference_mode()
    def step_many(self, streams: list[Stream]) -> None:
        """Advance every unfinished stream by one frame (or finish it at EOS / its length limit), in one batch."""
        streams = [s for s in streams if not s.finished]
        if streams:
            with self._lock:
                self._step_locked(streams)

    def _step_locked(self, streams: list[Stream]) -> None:
        for stream in streams:
            if stream.slot is None or self._owners.owner(stream.slot) is not stream:
                raise ValueError(f"stream {stream.stream_id} has no slot (it was released)")
        shape = self._shape(streams)
        graph = self._graph(shape)  # None when eager; a capture (once per shape) resets the inputs
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
                stream.frames_generated += 1
                if stream.frames_generated >= stream.max_frames:
                    stream.finish_reason = "length"
            if stream.finished:
                self._release_backbone(stream)  # its keys/values are no longer needed; its frames are on the host

    def step(self, stream: Stream) -> None:
        self.step_many([stream])

    def chunk_ready(self, stream: Stream) -> bool:
        return stream.finished or len(stream.pending) >= self.schedule.frames_in_chunk(stream.chunk_index)

    def cut_chunk(self, stream: Stream) -> None:
        """The stepping thread, once `chunk_ready`: see `Stream.cut`."""
        stream.cut()

    def take_chunk(self, stream: Stream) -> AudioChunk:
        """Decode the due frames (cut now if nobody has) into the next chunk (empty audio when a stream ends on a
        chunk border)."""
        return self.take_chunks([stream])[0]

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

    def take_chunks(self, streams: list[Stream]) -> list[AudioChunk]:
        """Decode the due chunk of each stream (`cut_chunk`; cut now where nobody has), in order: the output stage's
        codec call per round, batched across streams (one call per frame bucket present). A stream's last chunk gives
        its codec slot back. Touches only the decoding side of these streams (due frames, codec slots, counters),
        never the backbone slots or `pending`, so it runs without the engine lock beside a frame step that advances
        the same streams."""
        return next_chunks(self.codec, streams)
