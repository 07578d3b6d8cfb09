"""Decode slices a CPU host's budget has no room for, written once to disk and read back each step.

On a CPU host, host memory is the compute memory: a core-neuron slice held
"in host memory" beside the budget would be memory the budget never saw.
So a slice that does not fit is written, as prefill makes it, to a compact
file of its own (the gathered core rows and columns, attention and norms, in
the compute dtype) and each decode step reads it straight into a streaming
slot with ``readinto``. Nothing is mapped and nothing converted: the bytes
land where the matmul reads them, and the only memory they take is the slot
the plan already counts. The kernel's page cache may keep the file's pages,
but those are not the process's (RSS counts anonymous pages and mapped file
pages, and these are never mapped), and the kernel gives them back first.

Reading the slice again from the checkpoint instead would read whole FFN
matrices in the checkpoint's dtype to gather a share of their rows and
columns (down_proj's columns are strided across every row), and convert
them each step.

The files live in a folder of their own under the edgecm home (not /tmp,
which is often memory-backed) and are removed when the placement that wrote
them is gone, or at exit.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from edgecm.model import LayerWeights


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous tensor, shared with it (no copy): numpy has no bfloat16, uint8 has."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


@dataclass(frozen=True)
class SpilledLayer:
    """One layer's decode weights in a file: each tensor's name, shape and place, in ``dtype``."""

    path: Path
    dtype: torch.dtype
    layout: dict[str, tuple[int, torch.Size]]  # name -> (byte offset, shape)
    nbytes: int

    @property
    def shapes(self) -> dict[str, torch.Size]:
        return {name: shape for name, (_, shape) in self.layout.items()}

    def read_into(self, views: dict[str, torch.Tensor]) -> None:
        """Fill ``views`` (one contiguous tensor per name, in ``dtype``) from the file."""
        with open(self.path, "rb", buffering=0) as fh:
            for name, (offset, _) in self.layout.items():
                target = _bytes_of(views[name])
                fh.seek(offset)
                filled = 0
                while filled < len(target):
                    n = fh.readinto(target[filled:])
                    if not n:
                        raise OSError(f"{self.path}: ended after {offset + filled} bytes (written by this run)")
                    filled += n


class SpillFolder:
    """Where one placement writes the slices it cannot keep; removed with it."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix="decode-slices-", dir=root))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    def write(self, index: int, weights: LayerWeights) -> SpilledLayer:
        path = self.path / f"layer-{index:03d}.bin"
        layout, offset, dtype = {}, 0, None
        with open(path, "wb") as fh:
            for name, tensor in weights.state().items():
                tensor = tensor.contiguous()
                dtype = tensor.dtype
                layout[name] = (offset, tensor.shape)
                fh.write(_bytes_of(tensor))
                offset += tensor.numel() * tensor.element_size()
        return SpilledLayer(path, dtype, layout, offset)

    def remove(self) -> None:
        self._cleanup()


def spill_root() -> Path:
    from edgecm.demo import cache_root

    return cache_root() / "spill"
