"""A caller-owned KV cache, one growable buffer per layer, with the sequence index of each entry.

Each layer stores keys and values as (B, H_kv, capacity, D) and the sequence
index (the token's place in the prompt + generated text) of every stored
entry. Storing the index (instead of assuming entry i is token i) is what lets
the cache be compacted, token pruning removing entries, while the causal mask
stays right. The index is not the rotary position: keys are stored already
rotated, and with multimodal RoPE (Qwen2.5-VL) many image tokens share one
rotary position, so only the sequence index can order them.

A batch of sequences shares the buffers, one row each. Rows hold different
numbers of live entries (each sequence keeps its own tokens after pruning);
the unused slots of a shorter row carry the index ``PAD_ORDER``, which sorts
after every real token, so the causal mask alone keeps every real query off
them.
"""

from __future__ import annotations

import torch

# Sequence index of an empty slot (and of a padded query): after every real token.
PAD_ORDER = torch.iinfo(torch.int64).max


class LayerKV:
    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None  # (B, H_kv, capacity, D)
        self.values: torch.Tensor | None = None
        self.order: torch.Tensor | None = None  # (B, capacity) int64 sequence indices, PAD_ORDER where empty
        self.length = 0

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _grow(self, needed: int, like: torch.Tensor) -> None:
        capacity = max(needed, 2 * self.capacity, 16)
        b, h, _, d = like.shape
        keys = like.new_empty((b, h, capacity, d))
        values = like.new_empty((b, h, capacity, d))
        order = torch.full((b, capacity), PAD_ORDER, dtype=torch.int64, device=like.device)
        if self.length:
            keys[:, :, : self.length] = self.keys[:, :, : self.length]
            values[:, :, : self.length] = self.values[:, :, : self.length]
            order[:, : self.length] = self.order[:, : self.length]
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
        """keys/values: (B, H_kv, T, D); order: (T,) or (B, T) sequence indices.

        Returns (keys, values, order (B, S)) of all entries."""
        kv = self.layers[layer]
        t = keys.shape[2]
        if kv.length + t > kv.capacity:
            kv._grow(kv.length + t + (self.reserve_tokens if kv.length == 0 else 0), keys)
        end = kv.length + t
        kv.keys[:, :, kv.length : end] = keys
        kv.values[:, :, kv.length : end] = values
        kv.order[:, kv.length : end] = order.to(kv.order.device)
        kv.length = end
        return kv.keys[:, :, :end], kv.values[:, :, :end], kv.order[:, :end]

    def length(self, layer: int) -> int:
        return self.layers[layer].length

    def order(self, layer: int) -> torch.Tensor:
        """Sequence indices of the layer's entries, (B, S); PAD_ORDER marks an empty slot."""
        kv = self.layers[layer]
        return kv.order[:, : kv.length]

    def live(self, layer: int) -> list[int]:
        """Live entries of every row of the layer (a batch's rows differ after pruning)."""
        kv = self.layers[layer]
        if kv.order is None:
            return []
        return (kv.order[:, : kv.length] != PAD_ORDER).sum(dim=1).tolist()

    def prune(self, layer: int, keep: torch.Tensor) -> None:
        """Keep only entries at indices ``keep`` (sorted, into the stored order); the rest are gone, not zeroed."""
        self.prune_rows(layer, [keep] * self.layers[layer].keys.shape[0])

    def prune_rows(self, layer: int, keeps: list[torch.Tensor]) -> None:
        """Row b keeps its entries at ``keeps[b]`` (sorted), moved to the front; the rest of the row is emptied."""
        kv = self.layers[layer]
        length = max(k.numel() for k in keeps)
        for row, keep in enumerate(keeps):
            n = keep.numel()
            keep = keep.to(kv.keys.device)
            kv.keys[row, :, :n] = kv.keys[row, :, keep]
            kv.values[row, :, :n] = kv.values[row, :, keep]
            kv.order[row, :n] = kv.order[row, keep]
            kv.order[row, n:] = PAD_ORDER
        kv.length = length

    def keep_orders(self, layer: int, orders: list[torch.Tensor]) -> None:
        """Row b keeps the entries whose sequence index is in ``orders[b]``; the rest are gone.

        Pruning by sequence index, not by slot, because after a stage that
        recycles tokens the layers run so far hold different sets of entries.
        """
        kv = self.layers[layer]
        if kv.keys is None:
            return
        stored = kv.order[:, : kv.length]
        self.prune_rows(layer, [torch.isin(stored[b], orders[b].to(stored.device)).nonzero().flatten()
                                for b in range(stored.shape[0])])

    def copy_layers(self, source: "KVCache", layers: range, copies: int = 1) -> None:
        """Own copies of ``source``'s entries in ``layers``, its one row repeated ``copies`` times: a cache
        that starts where another one stood (the layers token-pruning candidates share with the dense pass)."""
        for layer in layers:
            kv, theirs = self.layers[layer], source.layers[layer]
            if theirs.keys is None:
                continue
            end, capacity = theirs.length, theirs.length + self.reserve_tokens
            b, h, _, d = theirs.keys.shape
            kv.keys = theirs.keys.new_empty((b * copies, h, capacity, d))
            kv.values = torch.empty_like(kv.keys)
            kv.order = torch.full((b * copies, capacity), PAD_ORDER, dtype=torch.int64, device=theirs.order.device)
            kv.keys[:, :, :end] = theirs.keys[:, :, :end].repeat(copies, 1, 1, 1)
            kv.values[:, :, :end] = theirs.values[:, :, :end].repeat(copies, 1, 1, 1)
            kv.order[:, :end] = theirs.order[:, :end].repeat(copies, 1)
            kv.length = end

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (sequences that finished leave the batch)."""
        for kv in self.layers:
            if kv.keys is not None:
                rows = rows.to(kv.keys.device)
                kv.keys, kv.values, kv.order = kv.keys[rows], kv.values[rows], kv.order[rows]

    def nbytes(self) -> int:
        """Bytes held by live entries (keys + values) across all layers and rows."""
        total = 0
        for layer, kv in enumerate(self.layers):
            if kv.keys is not None:
                per_token = kv.keys[:1, :, :1].numel() * kv.keys.element_size()
                total += 2 * per_token * sum(self.live(layer))
        return total
