"""The engine's fixed buffers: one backbone KV cache of batch slots, the depth decoder's cache, and the per-slot
tensors a frame step reads and writes (allocated once: fixed addresses, as CUDA graphs need)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

# Static shapes of a frame step (a CUDA graph per combination): batch rows are rounded up to a power of two (and
# `max_streams`), the attended context to one of these windows, the top-k to a small or the full bound.
WINDOWS = (256, 512, 1024, 2048)
SMALL_TOPK = 64  # covers the default top-k (50) with a cheap selection; larger top-k use the whole codebook


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

    @classmethod
    def allocate(cls, model, slots: int) -> SlotState:
        """Every buffer for `slots` streams of a CSM model, on its device and in its dtype."""
        config, depth, device, dtype = model.config, model.depth_decoder.config, model.device, model.dtype
        codebooks, context = config.num_codebooks, config.max_position_embeddings
        staging = torch.zeros(slots, codebooks + 1)
        probe = torch.zeros(1, dtype=dtype, device=device)
        depth_positions = torch.arange(codebooks, device=device)[None]
        backbone_shape = (config.num_hidden_layers, slots, config.num_key_value_heads, context, config.head_dim)
        depth_shape = (depth.num_hidden_layers, slots, depth.num_key_value_heads, codebooks, depth.head_dim)
        return cls(
            backbone=SlotCache(*backbone_shape, dtype, device),
            depth=DepthCache(*depth_shape, dtype, device),
            lengths=torch.zeros(slots, dtype=torch.long, device=device),
            hidden=torch.zeros(slots, config.hidden_size, dtype=dtype, device=device),
            temperature=torch.zeros(slots, device=device),
            topk=torch.ones(slots, dtype=torch.long, device=device),
            inputs=torch.zeros(slots, codebooks + 1, device=device),
            staging=staging.pin_memory() if device.type == "cuda" else staging,
            codes=torch.zeros(slots, codebooks, dtype=torch.long, device=device),
            window_ids=torch.arange(context, device=device),
            depth_rotary=model.depth_decoder.model.rotary_emb(probe, depth_positions),
        )


class SlotOwners:
    """Which stream holds each of `n` slots (the backbone's and the codec's), by weak reference: a stream dropped
    without being released frees its slot too. The caller holds its own lock around these calls."""

    def __init__(self, n: int):
        self._refs: list[weakref.ref | None] = [None] * n

    def owner(self, slot: int):
        ref = self._refs[slot]
        return None if ref is None else ref()

    def free_slot(self) -> int | None:
        return next((slot for slot in range(len(self._refs)) if self.owner(slot) is None), None)

    def take(self, slot: int, owner) -> None:
        self._refs[slot] = weakref.ref(owner)

    def free(self, slot: int | None, owner) -> None:
        """Give `owner`'s slot back (idempotent; a slot now held by another is left alone)."""
        if slot is not None and self.owner(slot) is owner:
            self._refs[slot] = None

    @property
    def taken(self) -> int:
        return sum(self.owner(slot) is not None for slot in range(len(self._refs)))
