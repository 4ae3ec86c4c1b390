"""Exact streaming decode of Mimi codes to 24 kHz PCM, for many streams in one batched call.

transformers' `MimiModel.decode(..., decoder_cache=...)` carries only the codec transformer's KV cache; its causal
convolutions and transposed-convolution upsamplers keep no state, so decoding chunk by chunk with it clicks at every
chunk border. The codec is causal end to end, so every layer streams exactly with a little state per stream:

    codes -> quantizer (per frame) -> upsample (transposed conv: its previous input frame)
          -> decoder transformer (keys/values of the last `sliding_window - 1` steps)
          -> SEANet decoder (each causal conv: its last (kernel - 1) x dilation inputs; each transposed conv: its
             previous input step)

Zero state is exactly the zero padding of a one-shot decode, so a stream's chunks concatenated equal a one-shot decode
of its codes (to float rounding: tests/test_codec_slots.py), for any chunk sizes and whoever shares the call.

Every stream's state lives in one slot of buffers allocated once, like the backbone's KV slots (slots.py). A call
gathers its streams' slots into a batch of a fixed row bucket, runs the layers over a fixed frame bucket and writes
the states back: static shapes, no host synchronisation inside, so on a GPU the call can be captured per (rows,
frames) bucket; on the CPU it runs eagerly. Streams in one call may bring different frame counts: rows are padded to
the bucket of the frames they bring, and each row's state advances by its own valid count (a gather at a per-row
offset), so padding never reaches a state or a kept sample. `decode` groups streams by frame bucket (one call per
bucket present; usually one): a 2-frame first chunk is not padded to a 10-frame chunk's cost.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import defaultdict

import numpy as np
import torch
from transformers.models.mimi.modeling_mimi import MimiConv1d, MimiConvTranspose1d, MimiResnetBlock

from csm_tts.speech.slots import batch_buckets
from csm_tts.speech.stream import NoFreeSlot


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


class _WindowCache:
    """What the codec transformer's attention layers see as their cache during one call: each row's stored keys and
    values (the last `window - 1` steps, oldest first) followed by the call's new ones. Keeps the concatenation, from
    which the next state is cut."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states], dim=2)
        self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]


class CodecSlots:
    """Streaming Mimi decode of up to `slots` streams, each owning one slot of state from `claim` to `free`.
    Thread-safe: claims and frees are bookkeeping on the host; decode calls take turns."""

    def __init__(self, codec, slots: int, max_frames: int):
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
        self._owners: list[weakref.ref | None] = [None] * slots
        self._fresh = [True] * slots  # claimed since its last decode: its state starts from zeros
        self._histories: list[torch.Tensor] | None = None  # allocated by the first decode
        self._lock = threading.Lock()  # decode calls
        self._claims = threading.Lock()  # slot bookkeeping (never held during a decode)

    # -- slots --------------------------------------------------------------------------------------------------
    def claim(self, owner) -> int:
        """A free slot for `owner` (a stream), reset: its next decode starts from silence. A slot whose owner was
        garbage-collected without `free` is free again."""
        with self._claims:
            for slot, held in enumerate(self._owners):
                if held is None or held() is None:
                    self._owners[slot] = weakref.ref(owner)
                    self._fresh[slot] = True
                    return slot
        raise NoFreeSlot(f"all {self.slots} codec slots are taken (streams whose last chunk was not taken yet)")

    def free(self, slot: int | None, owner) -> None:
        """Give `owner`'s slot back (idempotent; a slot now owned by someone else is left alone)."""
        with self._claims:
            if slot is not None and self._owners[slot] is not None and self._owners[slot]() is owner:
                self._owners[slot] = None

    @property
    def slots_taken(self) -> int:
        return sum(1 for held in self._owners if held is not None and held() is not None)

    def _allocate(self) -> list[torch.Tensor]:
        """Every slot's state, plus one scratch slot (index `slots`) that a batch's padding rows read and write."""
        rows, config = self.slots + 1, self.transformer.config
        kv = (rows, config.num_key_value_heads, self.window - 1, config.head_dim)
        states = [torch.zeros(rows, dtype=torch.long, device=self.device)]  # transformer steps decoded so far
        for _ in range(2 * config.num_hidden_layers):  # keys then values, per layer
            states.append(torch.zeros(kv, dtype=self.dtype, device=self.device))
        for channels, steps in self._history_shapes:
            states.append(torch.zeros(rows, channels, steps, dtype=self.dtype, device=self.device))
        return states

    # -- decoding -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, work: list[tuple[int, torch.Tensor]]) -> list[np.ndarray]:
        """Decode each (slot, codes [frames, num_codebooks]) pair's frames as the next audio of that slot's stream
        (one pair per slot). Returns float32 PCM per pair, in order, exactly `frames` x samples per frame long."""
        slots = [slot for slot, _ in work]
        if len(set(slots)) != len(slots):
            raise ValueError("one decode call takes each slot at most once")
        audio: list[list[np.ndarray]] = [[] for _ in work]
        with self._lock:
            if self._histories is None:
                self._histories = self._allocate()
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
                for bucket in sorted(groups):
                    for start in range(0, len(groups[bucket]), self.slots):
                        members = groups[bucket][start : start + self.slots]
                        chunks = [work[i][1][offsets[i] : offsets[i] + n] for i, n in members]
                        out = self._decode_rows([work[i][0] for i, _ in members], chunks, bucket)
                        for (i, n), samples in zip(members, out, strict=True):
                            audio[i].append(samples)
                            offsets[i] += n
        return [np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32) for parts in audio]

    def _decode_rows(self, slots: list[int], chunks: list[torch.Tensor], frames: int) -> list[np.ndarray]:
        rows = next(b for b in self.row_buckets if b >= len(slots))
        pad = rows - len(slots)
        codes = torch.zeros(rows, self.num_codebooks, frames, dtype=torch.long)
        for row, chunk in enumerate(chunks):
            codes[row, :, : chunk.shape[0]] = chunk.T
        valid = torch.tensor([c.shape[0] for c in chunks] + [0] * pad)
        with self._claims:
            fresh = torch.tensor([self._fresh[s] for s in slots] + [True] * pad)
            for slot in slots:
                self._fresh[slot] = False
        index = torch.tensor(slots + [self.slots] * pad)  # padding rows use the scratch slot
        samples = self._run(
            codes.to(self.device), valid.to(self.device), fresh.to(self.device), index.to(self.device)
        ).cpu()
        per_frame = self.steps_per_frame * self.samples_per_step
        return [samples[row, : c.shape[0] * per_frame].numpy() for row, c in enumerate(chunks)]

    def _run(self, codes, valid, fresh, index) -> torch.Tensor:
        """One static-shape call: codes [rows, num_codebooks, frames], valid frames per row, rows whose slot is fresh,
        slot per row. Reads and writes the slots' states; returns [rows, frames x samples per frame] float32."""
        keep = ~fresh
        states = [s.index_select(0, index) for s in self._histories]
        states = [s * keep.view(-1, *[1] * (s.dim() - 1)).to(s.dtype) for s in states]  # a fresh slot starts at 0
        kv_count = 2 * len(self.transformer.layers)
        positions, kv, histories = states[0], states[1 : 1 + kv_count], states[1 + kv_count :]
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
        hidden, kv = self._transformer(hidden.transpose(1, 2), kv, positions, steps)
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
        for state, new in zip(
            self._histories, [positions + valid * self.steps_per_frame, *kv, *new_histories], strict=True
        ):
            state.index_copy_(0, index, new)
        return hidden[:, 0].float()

    def _transformer(self, hidden, kv, positions, steps):
        """The codec transformer over each row's new steps, after its stored window; returns the outputs and each
        row's next window (the last `window - 1` keys/values up to its valid steps)."""
        rows, new = hidden.shape[:2]
        stored = self.window - 1
        arange = torch.arange(-stored, new, device=hidden.device)
        key_positions = positions[:, None] + arange  # [rows, stored + new]
        query_positions = key_positions[:, stored:]
        q, k = query_positions[:, :, None], key_positions[:, None, :]
        allowed = (k <= q) & (k > q - self.window) & (k >= 0)
        mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~allowed, torch.finfo(hidden.dtype).min)[:, None]
        layers = len(self.transformer.layers)
        cache = _WindowCache(list(kv[:layers]), list(kv[layers:]))
        rotary = self.transformer.rotary_emb(hidden, query_positions)
        for layer in self.transformer.layers:
            hidden = layer(hidden, attention_mask=mask, cache=cache, use_cache=True, position_embeddings=rotary)
        cut = (steps[:, None] + torch.arange(stored, device=hidden.device))[:, None, :, None]
        window = [t.gather(2, cut.expand(-1, t.shape[1], -1, t.shape[3])) for t in cache.keys + cache.values]
        return hidden, window
