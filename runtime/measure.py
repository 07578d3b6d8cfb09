"""Measuring a machine for a device profile: disk, memory, transfers, matmul.

Each function returns a rate and takes its sizes as arguments, so a quick
run (tests) and a full run measure the same way. The disk figure reads a
freshly written file after asking the kernel to drop its cached pages
(posix_fadvise DONTNEED), so it is the disk, not the page cache.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

CHUNK = 16 * 2**20


def disk_read_gbs(directory: Path, size_bytes: int) -> float:
    fd, name = tempfile.mkstemp(prefix="edgecm-profile-", dir=directory)
    try:
        block = os.urandom(CHUNK)
        with os.fdopen(fd, "wb") as fh:
            for _ in range(max(1, size_bytes // CHUNK)):
                fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
        with open(name, "rb") as fh:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            buffer = bytearray(CHUNK)
            total = 0
            start = time.perf_counter()
            while (n := fh.readinto(buffer)) > 0:
                total += n
            return total / (time.perf_counter() - start) / 1e9
    finally:
        os.unlink(name)


def _timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocation, kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def memory_bandwidth_gbs(device: torch.device, size_bytes: int, repeats: int = 5) -> float:
    """Copy bandwidth (read + write counted) of one large buffer on ``device``."""
    src = torch.empty(size_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = _timed(lambda: dst.copy_(src), device, repeats)
    return 2 * size_bytes / seconds / 1e9


def host_to_device_gbs(device: torch.device, size_bytes: int, pinned: bool, repeats: int = 5) -> float:
    host = torch.empty(size_bytes, dtype=torch.uint8, pin_memory=pinned)
    target = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    seconds = _timed(lambda: target.copy_(host, non_blocking=pinned), device, repeats)
    return size_bytes / seconds / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = _timed(lambda: a @ b, device, repeats)
    return 2 * n**3 / seconds / 1e12
