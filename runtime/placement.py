"""Where the decode set lives: placed layer by layer as prefill finishes each, against the plan.

Greedy against the budget's ledger, keeping back the planner's working set
(KV cache, activations, two streaming slots): a layer's decode weights (its
core slice, or the whole layer if it stays dense) go to the device while they
fit. After that, on CUDA, a slice waits in pinned host memory and streams
each token; on a CPU host, where host memory is the budget's own, it is
written to a compact file instead (runtime.spill) and read back each token.
A dense layer that does not fit is read from the checkpoint again. Layers the streamer keeps
after their first use are already on the device and need nothing more.
Sizes come from the planner's own formula (``decode_layer_bytes``), so the
plan and the placement cannot disagree.
"""

from __future__ import annotations

from typing import Callable

import torch

from edgecm.errors import EdgecmError
from edgecm.model import LayerWeights
from runtime.budget import Ledger
from runtime.planner import ModelSizes, Plan, decode_layer_bytes
from runtime.spill import SpilledLayer, SpillFolder, spill_root
from runtime.streamer import LayerStreamer


class DecodePlacement:
    """The decode weights of one request: ``on_device`` (the decode set) and ``on_host`` (held slices:
    pinned host memory on CUDA, files on a CPU host)."""

    def __init__(
        self,
        plan: Plan,
        sizes: ModelSizes,
        resident_sizes: ModelSizes,
        streamer: LayerStreamer,
        device: torch.device,
        keep: Callable[[LayerWeights], LayerWeights],
    ):
        self.sizes, self.resident_sizes = sizes, resident_sizes
        self.streamer, self.device, self.keep = streamer, device, keep
        self.reserve = plan.reserve
        self.ledger = Ledger(usable=plan.usable)
        self.ledger.commit(sizes.resident_always + len(streamer.kept) * resident_sizes.layer)
        self.keeping_all = streamer.keep_as is not None
        self.on_device: dict[int, LayerWeights] = {}
        self.on_host: dict[int, LayerWeights | SpilledLayer] = {}
        self._spill: SpillFolder | None = None  # made when the first slice does not fit a CPU host
        self.neurons: list[torch.Tensor | None] = []  # per layer placed so far: decode's FFN neurons, None for all

    def place(self, index: int, weights: LayerWeights, neurons: torch.Tensor | None) -> None:
        """Layer ``index`` is done with prefill: keep what decode needs of it (``neurons``: its core slice).

        Layers are placed in order, one call each."""
        self.neurons.append(neurons)
        if neurons is None and index in self.streamer.kept:
            return
        decode = weights if neurons is None else weights.with_ffn_neurons(neurons.to(self.device))
        fraction = 1.0 if neurons is None else int(neurons.numel()) / self.sizes.ffn_width
        size = decode_layer_bytes(self.resident_sizes, fraction)
        if self.keeping_all or self.ledger.fits(size, self.reserve):
            self.on_device[index] = self.keep(decode)
            self.ledger.commit(size)
        elif neurons is not None and self.device.type == "cuda":
            self.on_host[index] = decode.copied_to(torch.device("cpu"), pin=True)
        elif neurons is not None:
            self.on_host[index] = self._spilled(index, decode)

    def _spilled(self, index: int, decode: LayerWeights) -> SpilledLayer:
        try:
            if self._spill is None:
                self._spill = SpillFolder(spill_root())
            return self._spill.write(index, decode)
        except OSError as exc:
            where = self._spill.path if self._spill is not None else spill_root()
            raise EdgecmError(
                f"cannot write the decode slices that do not fit the budget to {where} ({exc.strerror}); free "
                f"space there, set EDGECM_HOME to a folder on a disk with room, or raise --budget"
            ) from None

    def neuron_counts(self) -> list[int]:
        """Per layer: the FFN neurons decode uses (the full width for a dense layer)."""
        width = self.sizes.ffn_width
        return [width if n is None else int(n.numel()) for n in self.neurons]

    def decode_weights(self, on_device_only: bool = False) -> dict[int, LayerWeights]:
        """The weights decode uses for every layer not read from disk, by the streamer's precedence.

        The decode set wins over a kept layer (it may be a slice), which wins over
        a held slice; held slices are never on the device (pinned host memory, or
        a file on a CPU host).
        """
        held = {} if on_device_only else self.on_host
        return {**held, **self.streamer.kept, **self.on_device}

    def moves_no_weights(self) -> bool:
        """Every layer's decode weights are on the device: decode needs no streaming slots."""
        return len(self.decode_weights(on_device_only=True)) == self.sizes.num_layers

    def bytes_per_token(self, head_bytes: int) -> int:
        """Weight bytes one decode step reads: each layer as decode uses it, plus the final norm and LM head."""
        used = self.decode_weights()
        from_disk = (self.sizes.num_layers - len(used)) * self.sizes.layer  # streamed, in the compute dtype
        return head_bytes + from_disk + sum(w.nbytes for w in used.values())
