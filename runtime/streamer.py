"""Decoder layers from disk to the compute device, one at a time.

Each ``load`` reads one layer's tensors from the checkpoint (memory-mapped and
closed again, see edgecm.safetensors_source), converts them to the compute
dtype and device, and hands them over; the caller drops them when the layer
has run. With ``resident=True`` a loaded layer is kept, so later passes (the
decode loop) read nothing from disk: the choice for a model that fits.
"""

from __future__ import annotations

import time

import torch

from edgecm.checkpoint import Checkpoint
from edgecm.model import LayerWeights


class LayerStreamer:
    def __init__(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, resident: bool = False):
        self.checkpoint = checkpoint
        self.device = device
        self.dtype = dtype
        self.resident = resident
        self._kept: dict[int, LayerWeights] = {}
        self.bytes_read = 0
        self.load_seconds = 0.0

    def load(self, index: int) -> LayerWeights:
        kept = self._kept.get(index)
        if kept is not None:
            return kept
        start = time.perf_counter()
        weights = LayerWeights.from_state(self.checkpoint.read_layer(index), self.device, self.dtype)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so the time below is the transfer, not its launch
        self.load_seconds += time.perf_counter() - start
        self.bytes_read += self.checkpoint.layer_nbytes(index)
        if self.resident:
            self._kept[index] = weights
        return weights

    def reset_counters(self) -> None:
        self.bytes_read = 0
        self.load_seconds = 0.0
