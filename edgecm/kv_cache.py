"""A caller-owned KV cache, one growable buffer per layer, with the sequence index of each entry.

Each layer stores keys and values as (B, H_kv, capacity, D) and the sequence
index (the token's place in the prompt + generated text) of every stored
entry. Storing the index (instead of assuming entry i is token i) is what lets
the cache be compacted, token pruning removing entries, while the causal mask
stays right. The index is not the rotary position: keys are stored already
rotated, and with multimodal RoPE (Qwen2.5-VL) many image tokens share one
rotary position, so only the sequence index can order them.
"""

from __future__ import annotations

import torch


class LayerKV:
    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None  # (B, H_kv, capacity, D)
        self.values: torch.Tensor | None = None
        self.order: torch.Tensor | None = None  # (capacity,) int64 sequence indices
        self.length = 0

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _grow(self, needed: int, like: torch.Tensor) -> None:
        capacity = max(needed, 2 * self.capacity, 16)
        b, h, _, d = like.shape
        keys = like.new_empty((b, h, capacity, d))
        values = like.new_empty((b, h, capacity, d))
        order = torch.empty(capacity, dtype=torch.int64, device=like.device)
        if self.length:
            keys[:, :, : self.length] = self.keys[:, :, : self.length]
            values[:, :, : self.length] = self.values[:, :, : self.length]
            order[: self.length] = self.order[: self.length]
        self.keys, self.values, self.order = keys, values, order


class KVCache:
    """KV entries for every layer; ``update`` appends and returns the layer's full views."""

    def __init__(self, num_layers: int, reserve_tokens: int = 0):
        self.layers = [LayerKV() for _ in range(num_layers)]
        # Extra room allocated on a layer's first write, so decode does not regrow the buffers.
        self.reserve_tokens = reserve_tokens

    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor, order: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """keys/values: (B, H_kv, T, D); order: (T,) sequence indices. Returns (keys, values, order) of all entries."""
        kv = self.layers[layer]
        t = keys.shape[2]
        if kv.length + t > kv.capacity:
            kv._grow(kv.length + t + (self.reserve_tokens if kv.length == 0 else 0), keys)
        end = kv.length + t
        kv.keys[:, :, kv.length : end] = keys
        kv.values[:, :, kv.length : end] = values
        kv.order[kv.length : end] = order.to(kv.order.device)
        kv.length = end
        return kv.keys[:, :, :end], kv.values[:, :, :end], kv.order[:end]

    def length(self, layer: int) -> int:
        return self.layers[layer].length

    def order(self, layer: int) -> torch.Tensor:
        """Sequence indices of the layer's live entries, (S,)."""
        kv = self.layers[layer]
        return kv.order[: kv.length]

    def prune(self, layer: int, keep: torch.Tensor) -> None:
        """Keep only entries at indices ``keep`` (sorted, into the stored order); the rest are gone, not zeroed."""
        kv = self.layers[layer]
        n = keep.numel()
        keep = keep.to(kv.keys.device)
        kv.keys[:, :, :n] = kv.keys[:, :, keep]
        kv.values[:, :, :n] = kv.values[:, :, keep]
        kv.order[:n] = kv.order[keep]
        kv.length = n

    def nbytes(self) -> int:
        """Bytes held by live entries (keys + values) across all layers."""
        total = 0
        for kv in self.layers:
            if kv.keys is not None:
                per_token = kv.keys[:, :, :1].numel() * kv.keys.element_size()
                total += 2 * per_token * kv.length
        return total
