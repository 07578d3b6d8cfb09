"""Decoder layers to the compute device through two reusable slots, the next one prefetched.

A pass over layers (``stream``) yields each layer's weights while a worker
thread already fetches the following layer into the other slot:

- from disk, read through safetensors' memory map (closed after each layer,
  see edgecm.safetensors_source) and converted into the slot;
- on CUDA the slot has two halves: pinned host memory the worker fills, and
  device memory it fills from there with a copy on a side CUDA stream, so the
  transfer overlaps the previous layer's kernels;
- a layer held in (pinned) host memory, such as a compact decode slice that
  did not fit on the GPU, skips the disk and goes straight to the copy;
- on a CPU host, such a slice is a compact file (runtime.spill) read straight
  into the slot, in the compute dtype already.

Slots are flat buffers reused for every layer and grown only if a layer is
larger than any before, so streaming allocates nothing per layer. On CPU the
slot is the compute memory itself and the worker's read-and-convert overlaps
the previous layer's matmuls.

Overlap is measured: ``fetch_s`` is the time spent fetching (read, convert,
copy; CUDA events time the copy), ``exposed_s`` the time the compute side
waited for it; the difference was hidden behind compute.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from edgecm.checkpoint import Checkpoint
from edgecm.model import LayerWeights
from runtime.spill import SpilledLayer

_ALIGN = 64  # elements; keeps every tensor view in a slot aligned for vectorised kernels


@dataclass
class StreamStats:
    """Where streaming time went, accumulated until ``reset``."""

    layers: int = 0
    bytes_read: int = 0  # from disk
    bytes_copied: int = 0  # host to device (CUDA only)
    fetch_s: float = 0.0
    exposed_s: float = 0.0

    @property
    def hidden_s(self) -> float:
        return max(self.fetch_s - self.exposed_s, 0.0)

    def to_json(self) -> dict:
        return {
            "layers": self.layers,
            "bytes_read": self.bytes_read,
            "bytes_copied": self.bytes_copied,
            "fetch_s": self.fetch_s,
            "exposed_s": self.exposed_s,
            "hidden_s": self.hidden_s,
        }


class _Slot:
    """One reusable buffer (device side, plus pinned host side on CUDA) and the events guarding it."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.buffer: torch.Tensor | None = None  # device (or CPU compute) memory
        self.pinned: torch.Tensor | None = None  # CUDA only: where the worker writes
        self.copied: torch.cuda.Event | None = None  # H2D copy out of ``pinned`` finished
        self.released: torch.cuda.Event | None = None  # compute has finished reading ``buffer``

    def reserve(self, elements: int) -> None:
        if self.buffer is not None and self.buffer.numel() >= elements:
            return
        self.buffer = None  # free the old one before allocating the larger
        self.buffer = torch.empty(elements, dtype=self.dtype, device=self.device)
        if self.device.type == "cuda":
            self.pinned = None
            self.pinned = torch.empty(elements, dtype=self.dtype, pin_memory=True)


def _layout(shapes: dict[str, torch.Size]) -> tuple[dict[str, tuple[int, torch.Size]], int]:
    """Offsets of each tensor in a flat slot, and the elements needed."""
    offsets, cursor = {}, 0
    for name, shape in shapes.items():
        offsets[name] = (cursor, shape)
        cursor += math.ceil(math.prod(shape) / _ALIGN) * _ALIGN
    return offsets, cursor


def _views(flat: torch.Tensor, offsets: dict[str, tuple[int, torch.Size]]) -> dict[str, torch.Tensor]:
    return {name: flat[start:start + math.prod(shape)].view(shape) for name, (start, shape) in offsets.items()}


class LayerStreamer:
    """Streams layers for one engine. ``kept`` holds layers kept resident after their first use."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, prefetch: bool = True):
        self.checkpoint = checkpoint
        self.device = device
        self.dtype = dtype
        self.prefetch = prefetch
        # When set (the plan says the model fits), every streamed layer is kept through it after its first use.
        self.keep_as: Callable[[LayerWeights], LayerWeights] | None = None
        self.kept: dict[int, LayerWeights] = {}
        self.stats = StreamStats()
        self._slots = [_Slot(device, dtype), _Slot(device, dtype)]
        self._next_slot = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgecm-prefetch")
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    # -- one fetch, run on the worker thread ---------------------------------------------------

    def _fetch(self, index: int, slot: _Slot, held: LayerWeights | None) -> tuple[dict, dict]:
        started = time.perf_counter()
        record = {}
        if isinstance(held, SpilledLayer):  # a CPU host's slice on disk: read straight into the slot
            offsets, elements = _layout(held.shapes)
            slot.reserve(elements)
            views = _views(slot.buffer, offsets)
            held.read_into(views)
            record["bytes_read"] = held.nbytes
            record["host_s"] = time.perf_counter() - started
            return views, record
        if held is not None:
            state = held.state()
        else:
            state = self.checkpoint.read_layer(index)
            record["bytes_read"] = self.checkpoint.layer_nbytes(index)
        offsets, elements = _layout({name: t.shape for name, t in state.items()})
        if self._copy_stream is None:
            slot.reserve(elements)
            views = _views(slot.buffer, offsets)
            for name, tensor in state.items():
                views[name].copy_(tensor)  # from the memory map, converting to the compute dtype
        else:
            if slot.copied is not None:
                # The previous copy out of this slot's pinned buffer must be done before the buffer is
                # written again, or given back by a reserve that grows it.
                slot.copied.synchronize()
            slot.reserve(elements)
            if held is not None and all(t.is_pinned() and t.dtype == self.dtype for t in state.values()):
                host = state  # a held slice is pinned already: copied from where it is held, not staged again
            else:
                host = _views(slot.pinned, offsets)
                for name, tensor in state.items():
                    host[name].copy_(tensor)
            views = _views(slot.buffer, offsets)
            with torch.cuda.stream(self._copy_stream):
                if slot.released is not None:
                    self._copy_stream.wait_event(slot.released)  # compute is done with the slot's last layer
                begin = torch.cuda.Event(enable_timing=True)
                begin.record()
                for name in state:
                    views[name].copy_(host[name], non_blocking=True)
                slot.copied = torch.cuda.Event(enable_timing=True)
                slot.copied.record()
            record["copy_event"] = (begin, slot.copied)
            record["bytes_copied"] = sum(t.numel() * t.element_size() for t in views.values())
        record["host_s"] = time.perf_counter() - started
        return views, record

    def _submit(self, index: int, held: LayerWeights | None) -> Future:
        slot = self._slots[self._next_slot]
        self._next_slot ^= 1
        if self.device.type == "cuda":
            slot.released = torch.cuda.Event()
            slot.released.record()  # everything queued so far, including the layer that last used this slot
        if self.prefetch:
            return self._worker.submit(self._fetch, index, slot, held)
        done: Future = Future()
        done.set_result(self._fetch(index, slot, held))
        return done

    def _receive(self, future: Future, copies: list) -> LayerWeights:
        waited = time.perf_counter()
        views, record = future.result()
        exposed = time.perf_counter() - waited
        if self._copy_stream is not None:
            begin, end = record["copy_event"]
            torch.cuda.current_stream(self.device).wait_event(end)  # the GPU waits, not the host
            copies.append((begin, end))
        self.stats.layers += 1
        self.stats.bytes_read += record.get("bytes_read", 0)
        self.stats.bytes_copied += record.get("bytes_copied", 0)
        self.stats.fetch_s += record["host_s"]
        self.stats.exposed_s += exposed
        return LayerWeights.from_state(views, self.device, self.dtype)

    # -- passes ----------------------------------------------------------------------------------

    def stream(
        self,
        indices: Iterable[int],
        resident: dict[int, LayerWeights] | None = None,
        held: dict[int, LayerWeights] | None = None,
    ) -> Iterator[tuple[int, LayerWeights]]:
        """Yield (index, weights) for ``indices`` in order.

        A layer in ``resident`` (on the device) or ``self.kept`` is yielded as is;
        one in ``held`` (host memory) is copied over; any other is read from disk.
        The caller must be done with a layer's weights when it asks for the next:
        streamed weights live in a slot that the prefetch reuses.
        """
        resident = {**self.kept, **(resident or {})}
        held = held or {}
        order = list(indices)
        streamed = [i for i in order if i not in resident]
        if self.device.type == "cpu":
            # On CPU, host memory is the compute memory: layers held in memory are used where they are
            # (slices written to disk still stream).
            in_memory = {i for i in streamed if isinstance(held.get(i), LayerWeights)}
            resident.update({i: held[i] for i in in_memory})
            streamed = [i for i in streamed if i not in in_memory]
        copies: list = []  # CUDA events around each copy, read once the pass is over
        futures: dict[int, Future] = {}
        cursor = 0

        def submit_next() -> None:
            nonlocal cursor
            if cursor < len(streamed):
                futures[streamed[cursor]] = self._submit(streamed[cursor], held.get(streamed[cursor]))
                cursor += 1

        submit_next()
        try:
            for index in order:
                if index in resident:
                    yield index, resident[index]
                    continue
                weights = self._receive(futures.pop(index), copies)
                submit_next()  # into the other slot, while this layer computes
                if self.keep_as is not None:
                    self.kept[index] = self.keep_as(weights)
                yield index, weights  # this pass computes on the slot; later passes on the kept copy
                del weights
        finally:
            for future in futures.values():  # a pass abandoned midway (an error): let the worker finish
                future.result()
            if copies:  # fold the copy times into the stats once the copies are done
                torch.cuda.synchronize(self.device)
                self.stats.fetch_s += sum(begin.elapsed_time(end) for begin, end in copies) / 1000

    def load(self, index: int) -> LayerWeights:
        """One layer on its own, in memory of its own (for inspection; passes use ``stream``)."""
        for _, weights in self.stream([index]):
            return weights.copied_to(self.device) if index not in self.kept else weights
        raise AssertionError("unreachable")

    def reset_counters(self) -> None:
        self.stats = StreamStats()

    def release_slots(self) -> None:
        """Give the slot memory back (after prefill, when decode streams nothing)."""
        for slot in self._slots:
            slot.buffer = slot.pinned = None
            slot.copied = slot.released = None

    @property
    def slot_bytes(self) -> int:
        return sum(s.buffer.numel() * s.buffer.element_size() for s in self._slots if s.buffer is not None)
