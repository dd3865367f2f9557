"""The decode path's KV cache: static storage, allocated once, in slots.

Every layer's keys and values live in one tensor each, shaped ``(slots, kv_heads, max_context,
head_dim)``, allocated (and zeroed) when the decode batch is made and never reallocated, concatenated or
restacked afterwards. A request owns one slot from its prefill to its end: its token at position ``p`` is
stored in column ``p`` of its slot, so a row never moves and joins and leaves cost no copy of anyone
else's cache (vLLM's persistent batch; gpt-fast's static cache, one row per request).

A decode step runs over the first ``rows`` slots and reads the first ``key_len`` columns, both rounded up
to a bucket by :mod:`faithlens.decode_step`, so the attention costs what the live context needs, not the
maximum, and a step has one of a few fixed shapes that a CUDA graph can hold.

:class:`SlotKVCache` is a transformers :class:`~transformers.cache_utils.Cache` whose ``update`` writes in
place: a prefill writes the prompt's columns of one slot; a step scatters each row's new column at its
own position (rows are at different positions). The model gets a 4D mask built from the positions, so
transformers never asks the cache for lengths or offsets.

Storage is zeroed, not left empty: masked columns still enter SDPA's matmuls (with weight 0), and a NaN
bit pattern there would turn ``0 × NaN`` into NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache


@dataclass(frozen=True)
class KVShape:
    """What one cached token costs in each layer."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, config, dtype: torch.dtype) -> KVShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, dtype)

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of every layer for one token."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.layers * self.kv_heads * self.head_dim * itemsize


def check_supported(config) -> None:
    """The static cache keeps every position and the step's mask is plain causal: a model whose layers
    attend within a sliding window would silently attend past it. Refuse it up front."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is not None and (layer_types is None or "sliding_attention" in layer_types):
        raise ValueError(
            f"{type(config).__name__} uses sliding-window attention ({window} tokens), which the decode "
            "path's static cache does not implement"
        )


@dataclass(frozen=True)
class KVPlan:
    """How many slots of how many columns the cache holds, and why."""

    slots: int
    max_context: int
    bytes: int
    source: str  # "settings" (CPU, or a request sized to its work) or "free memory" (CUDA)


def plan_kv(
    shape: KVShape,
    slots: int,
    max_context: int,
    device: torch.device,
    memory_fraction: float = 0.8,
) -> KVPlan:
    """Size the cache. On a CPU the caller's ``slots`` × ``max_context`` stand (settings, or the work at
    hand). On CUDA the cache may take ``memory_fraction`` of the memory that is free once the model is
    loaded (``torch.cuda.mem_get_info``); the rest is left for activations, the prefill's temporaries and
    CUDA graphs. If the asked-for cache does not fit, the context stays and the slots shrink (a shorter
    context would refuse requests the API admits); with not even one slot it raises."""
    per_slot = shape.bytes_per_token * max_context
    if device.type != "cuda":
        return KVPlan(slots, max_context, slots * per_slot, "settings")
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(free * memory_fraction) // per_slot
    if fits < 1:
        raise MemoryError(
            f"one slot of {max_context} tokens needs {per_slot / 2**20:.0f} MiB of KV cache; "
            f"{free * memory_fraction / 2**20:.0f} MiB of GPU memory is available to it"
        )
    chosen = min(slots, fits)
    return KVPlan(chosen, max_context, chosen * per_slot, "free memory")


class SlotKVCache(Cache):
    """Static per-slot KV storage that transformers' attention writes into (see the module docstring).

    Before each forward pass the owner says what the pass writes: :meth:`for_prefill` (one slot, columns
    ``[0, length)``) or :meth:`for_step` (slots ``[0, rows)``, one column each at ``positions``, keys read
    up to ``key_len``). Both are Python attributes, so a compiled or captured step sees them as constants
    of its bucket.
    """

    def __init__(self, shape: KVShape, slots: int, max_context: int, device: torch.device) -> None:
        super().__init__(layers=[])
        self.shape, self.slots, self.max_context = shape, slots, max_context
        dims = (slots, shape.kv_heads, max_context, shape.head_dim)
        self.keys = [torch.zeros(dims, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        self.values = [torch.zeros(dims, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        self._prefill: tuple[int, int] | None = None
        self._step: tuple[int, int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.shape.layers

    def data_ptrs(self) -> list[int]:
        """Where every layer's storage lives (a test checks that these never change)."""
        return [t.data_ptr() for t in (*self.keys, *self.values)]

    def for_prefill(self, slot: int, length: int) -> SlotKVCache:
        self._prefill, self._step = (slot, length), None
        return self

    def for_step(self, rows: int, key_len: int, positions: torch.Tensor) -> SlotKVCache:
        self._prefill, self._step = None, (rows, key_len, positions)
        return self

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._prefill is not None:
            slot, length = self._prefill
            keys[slot, :, :length].copy_(key_states[0])
            values[slot, :, :length].copy_(value_states[0])
            return keys[slot : slot + 1, :, :length], values[slot : slot + 1, :, :length]
        assert self._step is not None, "say what the pass writes: for_prefill or for_step"
        rows, key_len, positions = self._step
        keys, values = keys[:rows, :, :key_len], values[:rows, :, :key_len]
        heads, dim = key_states.shape[1], key_states.shape[3]
        index = positions.view(rows, 1, 1, 1).expand(rows, heads, 1, dim)
        keys.scatter_(2, index, key_states)
        values.scatter_(2, index, value_states)
        return keys, values


def round_up(n: int, block: int) -> int:
    return block * math.ceil(n / block)
