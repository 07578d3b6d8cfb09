"""Measuring what a run cost: wall-clock spans and peak memory.

Peak host memory is sampled from a background thread with psutil (RSS every
few milliseconds) because a Python process has no peak-since-mark counter;
peak device memory comes from torch.cuda's allocator statistics.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import psutil
import torch


class PeakRSS:
    """Context manager: ``start_bytes`` and ``peak_bytes`` of this process's RSS while inside."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self._process = psutil.Process()
        self.start_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self.start_bytes = self.peak_bytes = self._process.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    @property
    def growth_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes


class Spans:
    """Named wall-clock durations, accumulated; synchronises CUDA so GPU work is counted."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def span(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def device_memory(device: torch.device) -> dict[str, int | None]:
    """Peak allocated bytes on a CUDA device since the last reset, None elsewhere."""
    if device.type != "cuda":
        return {"device_peak_allocated_bytes": None}
    return {"device_peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device))}


def _nvml_memory(device: torch.device) -> tuple[int, int, str] | None:
    """(used, total, device name) from NVML, or None where there is no NVML or no driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        return int(info.used), int(info.total), name.decode() if isinstance(name, bytes) else str(name)
    except pynvml.NVMLError:
        return None


def memory_readout(device: torch.device) -> dict[str, object]:
    """What the memory gauge shows: used and total bytes and where they come from. Never raises.

    On CUDA: NVML's device view (all processes), else torch's free/total. On CPU:
    this process's RSS against the host's physical memory.
    """
    if device.type == "cuda":
        nvml = _nvml_memory(device)
        if nvml is not None:
            used, total, name = nvml
            return {"used": used, "total": total, "source": f"NVML {name}"}
        free, total = torch.cuda.mem_get_info(device)
        return {"used": total - free, "total": total, "source": "torch.cuda (no NVML)"}
    return {
        "used": psutil.Process().memory_info().rss,
        "total": psutil.virtual_memory().total,
        "source": "RSS / host memory (no GPU)",
    }
