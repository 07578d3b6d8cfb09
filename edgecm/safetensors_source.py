"""Lazy, validated access to a directory of safetensors files.

Every shard is checked when the checkpoint is opened (present, header
readable, file long enough for the tensors its header lists), so a truncated
download fails at once with the shard's name instead of mid-generation.

Tensors are read through safetensors' memory-mapped ``safe_open``, one group
at a time, and the file is closed right after: a mapping kept open leaves
every page it ever touched counted in the process's resident set, which would
make a streamed model look (to psutil and to the OOM killer's accounting) as
large as the whole checkpoint.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from edgecm.errors import EdgecmError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and how big it is, read from a shard's header."""

    file: Path
    key: str  # the name inside the file
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: "F16", "BF16", "F32", ...

    @property
    def nbytes(self) -> int:
        n = _DTYPE_BYTES.get(self.dtype, 4)
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> dict:
    """Parse and validate one safetensors header; raise EdgecmError naming the file."""
    if not path.is_file():
        raise EdgecmError(f"{path}: shard is missing; re-download or re-copy the checkpoint so every shard is present")
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise EdgecmError(f"{path}: truncated ({size} bytes, no header); re-download or re-copy this shard")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise EdgecmError(
                f"{path}: truncated (header needs {header_len + 8} bytes, file has {size}); "
                f"re-download or re-copy this shard"
            )
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EdgecmError(f"{path}: not a safetensors file (unreadable header); re-download or re-copy it") from None
    header.pop("__metadata__", None)
    data_end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise EdgecmError(
            f"{path}: truncated ({size} of {8 + header_len + data_end} bytes); re-download or re-copy this shard"
        )
    return header


def scan_directory(model_dir: Path) -> dict[str, TensorInfo]:
    """Map every tensor name in the checkpoint to its TensorInfo, validating all shards."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            raise EdgecmError(f"{index_path}: unreadable index (no weight_map); re-copy it from the checkpoint") from None
        files = sorted({model_dir / f for f in weight_map.values()})
    elif (model_dir / SINGLE_FILE).is_file():
        files = [model_dir / SINGLE_FILE]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        hint = " (only PyTorch .bin weights found; save the model with safe_serialization=True)" if any(
            model_dir.glob("*.bin")
        ) else ""
        raise EdgecmError(f"{model_dir}: no safetensors weights{hint}; point --model at a safetensors checkpoint")

    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for key, meta in read_header(file).items():
            tensors[key] = TensorInfo(file=file, key=key, shape=tuple(meta["shape"]), dtype=meta["dtype"])
    if index_path.is_file():
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise EdgecmError(
                f"{index_path}: {len(missing)} tensors listed but absent from their shards (first: {missing[0]}); "
                f"re-download the checkpoint"
            )
    return tensors


def read_tensors(infos: list[TensorInfo]) -> dict[str, torch.Tensor]:
    """Read tensors (keyed by their in-file name), opening each shard once and closing it after."""
    by_file: dict[Path, list[str]] = defaultdict(list)
    for info in infos:
        by_file[info.file].append(info.key)
    out: dict[str, torch.Tensor] = {}
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt") as handle:
            for key in keys:
                out[key] = handle.get_tensor(key)
    return out
