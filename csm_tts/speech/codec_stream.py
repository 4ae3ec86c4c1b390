"""Exact streaming decode of Mimi codes to 24 kHz PCM, for many streams in one batched call.

transformers' `MimiModel.decode(..., decoder_cache=...)` carries only the codec transformer's KV cache; its causal
convolutions and transposed-convolution upsamplers keep no state, so decoding chunk by chunk with it clicks at every
chunk border. The codec is causal end to end, so every layer streams exactly with a little state per stream:

    codes -> quantizer (per frame) -> upsample (transposed conv: its previous input frame)
          -> decoder transformer (keys/values of the last `sliding_window - 1` steps, in a ring)
          -> SEANet decoder (each causal conv: its last (kernel - 1) x dilation inputs; each transposed conv: its
             previous input step)

Zero state is exactly the zero padding of a one-shot decode, so a stream's chunks concatenated equal a one-shot decode
of its codes (to float rounding: tests/test_codec_slots.py), for any chunk sizes and whoever shares the call.

Every stream's state lives in one slot of buffers allocated once, like the backbone's KV slots (slots.py). A call
gathers its streams' slots into a batch of a fixed row bucket (padding rows use a scratch slot), runs the layers over a
fixed frame bucket and writes the states back: static shapes, inputs in fixed buffers, no host synchronisation inside,
so on a GPU the call can be captured as a CUDA graph per (rows, frames) bucket (`cuda_graphs=True`, opt-in: the engine
decodes eagerly until the gpu-marked test has passed on a GPU); on the CPU it runs eagerly. Streams in one call may
bring different frame counts: rows are padded to the bucket, and each row's state advances by its own valid count
(convolution histories are cut at a per-row offset; keys/values of padded steps land in the ring past the row's last
step, where its next call overwrites them before any query can see them), so padding never reaches a kept sample.
`decode` groups streams by frame bucket, one call per bucket present (in steady state every due chunk has the largest
size: one call), rather than padding all to the largest chunk: a 2-frame first chunk does not pay for a 10-frame one (5x
the work on a CPU), and small chunks are decoded first."""

from __future__ import annotations

import math
import threading
from collections import defaultdict

import numpy as np
import torch
from transformers.models.mimi.modeling_mimi import MimiConv1d, MimiConvTranspose1d, MimiResnetBlock

from csm_tts.speech.slots import SlotOwners, batch_buckets
from csm_tts.speech.stream import AudioChunk, NoFreeSlot, Stream


def _check_streamable(module) -> None:
    if isinstance(module, MimiConv1d):
        if not module.causal or module.conv.stride[0] != 1 or module.pad_mode != "constant":
            raise ValueError("streaming needs causal, stride-1, zero-padded convolutions in the Mimi decoder")
    elif isinstance(module, MimiConvTranspose1d) and (not module.causal or module.padding_left != 0):
        raise ValueError("streaming needs causal transposed convolutions trimmed on the right (trim_right_ratio 1)")


def _history(module) -> int:
    """Earlier inputs a layer needs per stream: a causal conv its receptive field less one; a transposed conv the
    inputs whose kernels overlap its next output (one when the kernel is at most twice the stride)."""
    conv = module.conv
    if isinstance(module, MimiConvTranspose1d):
        return math.ceil(conv.kernel_size[0] / conv.stride[0]) - 1
    return (conv.kernel_size[0] - 1) * conv.dilation[0]


class _RingCache:
    """What the codec transformer's attention layers see as their cache during one call. Each slot keeps its keys and
    values in a ring of `window - 1` + the largest call's steps; step t of a stream lives at index t mod ring. `update`
    writes the call's new keys/values into the slots' rings and into this call's gathered copy, which it returns."""

    def __init__(self, keys, values, slot_keys, slot_values, index, ring_index):
        self.keys, self.values = keys, values  # per layer [rows, heads, ring, head_dim], gathered for this call
        self.slot_keys, self.slot_values = slot_keys, slot_values  # per layer, every slot's ring
        self.index, self.ring_index = index, ring_index  # slot per row [rows]; ring index per new step [rows, S]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        heads, head_dim = key_states.shape[1], key_states.shape[3]
        where = self.ring_index[:, None, :, None].expand(-1, heads, -1, head_dim)
        keys = self.keys[layer_idx].scatter_(2, where, key_states)
        values = self.values[layer_idx].scatter_(2, where, value_states)
        # Padding rows share the scratch slot: whichever of their writes lands there is garbage nobody reads.
        slots, ring = self.index[:, None], self.ring_index
        self.slot_keys[layer_idx][slots, :, ring] = key_states.transpose(1, 2)
        self.slot_values[layer_idx][slots, :, ring] = value_states.transpose(1, 2)
        return keys, values


class CodecSlots:
    """Streaming Mimi decode of up to `slots` streams, each owning one slot of state from `claim` to `free`.
    Thread-safe: claims and frees are bookkeeping on the host; decode calls take turns."""

    def __init__(self, codec, slots: int, max_frames: int, cuda_graphs: bool = False):
        decoder = codec.decoder
        self.quantizer = codec.quantizer
        self.upsample = decoder.upsample
        self.transformer = decoder.decoder_transformer
        self.seanet = decoder.decoder_seanet
        config = self.transformer.config
        if config.sliding_window is None:
            raise ValueError("streaming needs the codec transformer's sliding window (its cache would grow forever)")
        self.window = config.sliding_window
        self.num_codebooks = config.num_quantizers
        self.codebook_size = config.codebook_size
        self.steps_per_frame = 1 if self.upsample is None else self.upsample.conv.stride[0]
        self.samples_per_step = math.prod(
            m.conv.stride[0] for m in self.seanet.modules() if isinstance(m, MimiConvTranspose1d)
        )
        # Every layer with a history, in a fixed order: the upsampler, then SEANet's convolutions.
        layers = [] if self.upsample is None else [self.upsample]
        layers += [m for m in self.seanet.modules() if isinstance(m, MimiConv1d | MimiConvTranspose1d)]
        for layer in layers:
            _check_streamable(layer)
        self._state_index = {id(m): i for i, m in enumerate(m for m in layers if _history(m) > 0)}
        self._history_shapes = [(m.conv.in_channels, _history(m)) for m in layers if _history(m) > 0]
        self.slots = slots
        self.row_buckets = batch_buckets(slots)
        self.frame_buckets = batch_buckets(max_frames)
        param = next(codec.parameters())
        self.device, self.dtype = param.device, param.dtype
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs the codec on a CUDA device")
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool = None
        self._owners = SlotOwners(slots)
        self._fresh = [True] * slots  # claimed since its last decode: its state starts from zeros
        # Keys/values of the last `window - 1` steps, and room for the largest call's new ones.
        self.ring = self.window - 1 + self.frame_buckets[-1] * self.steps_per_frame
        self._histories: list[torch.Tensor] | None = None  # allocated by the first decode, with the other states
        self._lock = threading.Lock()  # decode calls
        self._claims = threading.Lock()  # slot bookkeeping (never held during a decode)

    # -- slots --------------------------------------------------------------------------------------------------
    def claim(self, owner) -> int:
        """A free slot for `owner` (a stream), reset: its next decode starts from silence. A slot whose owner was
        garbage-collected without `free` is free again."""
        with self._claims:
            slot = self._owners.free_slot()
            if slot is not None:
                self._owners.take(slot, owner)
                self._fresh[slot] = True
                return slot
        raise NoFreeSlot(f"all {self.slots} codec slots are taken (streams whose last chunk was not taken yet)")

    def free(self, slot: int | None, owner) -> None:
        """Give `owner`'s slot back (idempotent; a slot now owned by someone else is left alone)."""
        with self._claims:
            self._owners.free(slot, owner)

    def release(self, stream) -> None:
        """The stream's codec slot back, and the stream told so (its last chunk decoded, or it was released)."""
        self.free(stream.codec_slot, stream)
        stream.codec_slot = None

    @property
    def slot_bytes(self) -> int:
        """State bytes per slot: the transformer's key/value ring and the convolutions' histories."""
        config, itemsize = self.transformer.config, self.dtype.itemsize
        ring = 2 * config.num_hidden_layers * config.num_key_value_heads * self.ring * config.head_dim
        return (ring + sum(c * s for c, s in self._history_shapes)) * itemsize + 8

    @property
    def slots_taken(self) -> int:
        return self._owners.taken

    def _allocate(self) -> None:
        """Every slot's state, plus one scratch slot (index `slots`) that a batch's padding rows read and write."""
        rows, config = self.slots + 1, self.transformer.config
        ring = (rows, config.num_key_value_heads, self.ring, config.head_dim)
        self._positions = torch.zeros(rows, dtype=torch.long, device=self.device)  # transformer steps decoded
        self._keys = [torch.zeros(ring, dtype=self.dtype, device=self.device) for _ in self.transformer.layers]
        self._values = [torch.zeros(ring, dtype=self.dtype, device=self.device) for _ in self.transformer.layers]
        self._histories = [
            torch.zeros(rows, channels, steps, dtype=self.dtype, device=self.device)
            for channels, steps in self._history_shapes
        ]
        # A call's inputs, at fixed addresses (what a CUDA graph reads): codes, valid frames and slot per row.
        self._codes_in = torch.zeros(self.slots, self.num_codebooks, self.frame_buckets[-1], dtype=torch.long,
                                     device=self.device)  # fmt: skip
        self._valid_in = torch.zeros(self.slots, dtype=torch.long, device=self.device)
        self._index_in = torch.full((self.slots,), self.slots, dtype=torch.long, device=self.device)

    def _reset(self, slots: list[int]) -> None:
        """Silence for newly claimed slots (outside the static-shape call, only when a stream starts)."""
        index = torch.tensor(slots, device=self.device)
        for state in [self._positions, *self._keys, *self._values, *self._histories]:
            state.index_fill_(0, index, 0)

    # -- decoding -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, work: list[tuple[int, torch.Tensor]], owners: list | None = None) -> list[np.ndarray]:
        """Decode each (slot, codes [frames, num_codebooks]) pair's frames as the next audio of that slot's stream
        (one pair per slot). Returns float32 PCM per pair, in order, exactly `frames` x samples per frame long. With
        `owners` (one per pair), a pair whose slot has meanwhile passed to another owner (its stream was released
        from another thread) is not decoded and gets no audio: it never touches the new owner's state."""
        slots = [slot for slot, _ in work]
        if len(set(slots)) != len(slots):
            raise ValueError("one decode call takes each slot at most once")
        for slot, codes in work:
            if not 0 <= slot < self.slots or (owners is None and self._owners.owner(slot) is None):
                raise ValueError(f"codec slot {slot} is not claimed")
            if codes.dim() != 2 or codes.shape[1] != self.num_codebooks or codes.is_floating_point():
                raise ValueError(f"codes must be integers of shape [frames, {self.num_codebooks}], got {codes.shape}")
            if codes.numel() and not 0 <= int(codes.min()) <= int(codes.max()) < self.codebook_size:
                raise ValueError(f"codes must lie in [0, {self.codebook_size}): the codec cannot decode others")
        audio: list[list[np.ndarray]] = [[] for _ in work]
        with self._lock:
            if self._histories is None:
                self._allocate()
            offsets = [0] * len(work)
            largest = self.frame_buckets[-1]
            while True:  # passes of at most the largest bucket (a stream may bring a backlog of frames)
                groups = defaultdict(list)
                for i, (_, codes) in enumerate(work):
                    frames = min(codes.shape[0] - offsets[i], largest)
                    if frames > 0:
                        groups[next(b for b in self.frame_buckets if b >= frames)].append((i, frames))
                if not groups:
                    break
                for bucket, members in sorted(groups.items()):  # small (first) chunks first
                    chunks = [work[i][1][offsets[i] : offsets[i] + n] for i, n in members]
                    who = None if owners is None else [owners[i] for i, _ in members]
                    out = self._decode_rows([work[i][0] for i, _ in members], chunks, bucket, who)
                    for (i, n), samples in zip(members, out, strict=True):
                        audio[i].append(samples)
                        offsets[i] += n
        return [np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32) for parts in audio]

    def _decode_rows(self, slots: list[int], chunks: list[torch.Tensor], frames: int, owners) -> list[np.ndarray]:
        rows = next(b for b in self.row_buckets if b >= len(slots))
        pad = rows - len(slots)
        graph = self._graph(rows, frames) if self.cuda_graphs else None  # a capture uses the input buffers
        codes = torch.zeros(rows, self.num_codebooks, frames, dtype=torch.long)
        for row, chunk in enumerate(chunks):
            codes[row, :, : chunk.shape[0]] = chunk.T
        with self._claims:
            # A claim after this point marks the slot fresh again: its new owner's first call resets it.
            owned = [owners is None or self._owners.owner(slot) is owners[row] for row, slot in enumerate(slots)]
            slots = [slot if mine else self.slots for slot, mine in zip(slots, owned, strict=True)]
            fresh = [slot for slot in slots if slot < self.slots and self._fresh[slot]]
            for slot in fresh:
                self._fresh[slot] = False
        if fresh:
            self._reset(fresh)
        valid = [c.shape[0] if mine else 0 for c, mine in zip(chunks, owned, strict=True)]
        self._codes_in[:rows, :, :frames] = codes.to(self.device)
        self._valid_in[:rows] = torch.tensor(valid + [0] * pad).to(self.device)
        self._index_in[:rows] = torch.tensor(slots + [self.slots] * pad).to(self.device)  # padding: the scratch slot
        if graph is None:
            samples = self._run(rows, frames).cpu()
        else:
            graph[0].replay()
            samples = graph[1].cpu()
        per_frame = self.steps_per_frame * self.samples_per_step
        return [samples[row, : n * per_frame].numpy() for row, n in enumerate(valid)]

    def capture_graphs(self) -> int:
        """Capture a CUDA graph for every (rows, frames) bucket now, so that no stream pays for a capture later (for
        callers that turned graphs on: benchmarks and tests). Returns how many graphs exist."""
        if not self.cuda_graphs:
            return 0
        with self._lock:
            for rows in self.row_buckets:
                for frames in self.frame_buckets:
                    self._graph(rows, frames)
        return len(self._graphs)

    def _graph(self, rows: int, frames: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The call of this shape as a CUDA graph and its output buffer (captured on first use)."""
        entry = self._graphs.get((rows, frames))
        if entry is None:
            if self._histories is None:
                self._allocate()
            # Every row decodes nothing into the scratch slot: the warm-up run changes no stream's state.
            self._valid_in.zero_()
            self._index_in.fill_(self.slots)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._run(rows, frames)  # warm-up outside the capture (library handles, workspaces, lazy buffers)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):  # replays never overlap: one memory pool
                out = self._run(rows, frames)
            entry = self._graphs[(rows, frames)] = (graph, out)
        return entry

    def _run(self, rows: int, frames: int) -> torch.Tensor:
        """One static-shape call on the input buffers' first `rows` rows and `frames` frames. Reads and writes the
        slots' states; returns [rows, frames x samples per frame] float32."""
        codes, valid = self._codes_in[:rows, :, :frames], self._valid_in[:rows]
        index = self._index_in[:rows]
        histories = [state.index_select(0, index) for state in self._histories]
        new_histories = list(histories)

        def stream_layer(module, x, steps):
            """A causal conv or transposed conv applied after its history; the history moves on by `steps`."""
            if id(module) not in self._state_index:
                return module.conv(x) if isinstance(module, MimiConv1d) else module(x)
            at = self._state_index[id(module)]
            history = histories[at]
            padded = torch.cat([history, x], dim=-1)
            width = history.shape[-1]
            cut = steps[:, None, None] + torch.arange(width, device=x.device)
            new_histories[at] = padded.gather(-1, cut.expand(-1, padded.shape[1], -1))
            out = module.conv(padded)
            if isinstance(module, MimiConvTranspose1d):
                stride = module.conv.stride[0]
                return out[..., width * stride : (width + x.shape[-1]) * stride]
            return out

        latents = self.quantizer.decode(codes).to(self.dtype)  # [rows, D, frames]
        steps = valid
        hidden = latents if self.upsample is None else stream_layer(self.upsample, latents, steps)
        steps = valid * self.steps_per_frame
        positions = self._positions.index_select(0, index)
        hidden = self._transformer(hidden.transpose(1, 2), positions, index)
        hidden = hidden.transpose(1, 2)
        for layer in self.seanet.layers:
            if isinstance(layer, MimiResnetBlock):
                residual = hidden
                for part in layer.block:
                    hidden = stream_layer(part, hidden, steps) if isinstance(part, MimiConv1d) else part(hidden)
                shortcut = layer.shortcut
                hidden = hidden + (
                    stream_layer(shortcut, residual, steps) if isinstance(shortcut, MimiConv1d) else shortcut(residual)
                )
            elif isinstance(layer, MimiConv1d | MimiConvTranspose1d):
                hidden = stream_layer(layer, hidden, steps)
                if isinstance(layer, MimiConvTranspose1d):
                    steps = steps * layer.conv.stride[0]
            else:
                hidden = layer(hidden)
        self._positions.index_copy_(0, index, positions + valid * self.steps_per_frame)
        for state, new in zip(self._histories, new_histories, strict=True):
            state.index_copy_(0, index, new)
        return hidden[:, 0].float()

    def _transformer(self, hidden, positions, index):
        """The codec transformer over each row's new steps (a row's steps past its valid ones are computed and stored
        too: they lie after everything the row has decoded, so the row's next call overwrites them before any query
        reaches them)."""
        new = hidden.shape[1]
        query_positions = positions[:, None] + torch.arange(new, device=hidden.device)  # [rows, new]
        ring = torch.arange(self.ring, device=hidden.device)
        # After this call's writes, ring index j holds the latest step <= the row's last new step that is j mod ring.
        last = query_positions[:, -1:]
        key_positions = last - torch.remainder(last - ring, self.ring)  # [rows, ring]
        q, k = query_positions[:, :, None], key_positions[:, None, :]
        allowed = (k <= q) & (k > q - self.window) & (k >= 0)
        mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~allowed, torch.finfo(hidden.dtype).min)[:, None]
        cache = _RingCache(
            [keys.index_select(0, index) for keys in self._keys],
            [values.index_select(0, index) for values in self._values],
            self._keys,
            self._values,
            index,
            torch.remainder(query_positions, self.ring),
        )
        rotary = self.transformer.rotary_emb(hidden, query_positions)
        for layer in self.transformer.layers:
            hidden = layer(hidden, attention_mask=mask, cache=cache, use_cache=True, position_embeddings=rotary)
        return hidden


def next_chunks(codec: CodecSlots, streams: list[Stream]) -> list[AudioChunk]:
    """Each stream's due frames (`Stream.due`, cut by the stepping thread; cut here where nobody has) as its next
    chunk, in the order given, decoded in one `codec.decode` call. A stream's last chunk gives its codec slot back."""
    if len({id(s) for s in streams}) != len(streams):
        raise ValueError("a stream appears twice")
    for stream in streams:
        if (stream.due or stream.pending) and stream.codec_slot is None:
            raise ValueError(f"stream {stream.stream_id} has no codec slot (it was released)")
    taken = []
    for stream in streams:
        if stream.due is None:
            stream.cut()
        last, slot, frames = stream.due_is_last, stream.codec_slot, stream.due
        # No slot: released from another thread since the check above; its frames are dropped with it.
        taken.append((stream, last, torch.stack(frames) if frames and slot is not None else None, slot))
    decoding = [(stream, codes, slot) for stream, _, codes, slot in taken if codes is not None]
    decoded = iter(codec.decode([(slot, codes) for _, codes, slot in decoding], owners=[s for s, _, _ in decoding]))
    chunks = []
    for stream, last, codes, _ in taken:
        audio = next(decoded) if codes is not None else np.zeros(0, dtype=np.float32)
        chunks.append(
            AudioChunk(
                index=stream.chunk_index,
                audio=audio,
                sample_offset=stream.samples_sent,
                is_last=last,
                finish_reason=stream.finish_reason if last else None,
            )
        )
        stream.chunk_index += 1
        stream.samples_sent += audio.size
        stream.due = None  # after the counters: flow control reads them from the stepping thread
        if last:
            codec.release(stream)
    return chunks
