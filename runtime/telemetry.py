"""Measuring what a run cost: spans, per-layer compute, peak memory, the device's own view.

Peak host memory is sampled from a background thread with psutil (RSS every
few milliseconds) because a Python process has no peak-since-mark counter;
peak device memory comes from torch.cuda's allocator statistics. Per-layer
compute on CUDA is timed with CUDA events, which measure the GPU's work
without making the host wait after every layer. NVML gives the device's name,
memory (all processes), utilisation and power; where there is no GPU or no
NVML the readout says so and carries on.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from statistics import median

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


class LayerTimer:
    """Compute time per (phase, layer): perf_counter on CPU, CUDA events on GPU (read once, at ``totals``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._records: list[tuple[str, int, object, object]] = []

    @contextmanager
    def layer(self, phase: str, index: int):
        if self.device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            yield
            end.record()
        else:
            begin = time.perf_counter()
            yield
            end = time.perf_counter()
        self._records.append((phase, index, begin, end))

    def per_layer(self, phase: str) -> list[float]:
        """Seconds per layer of ``phase``, summed over passes (decode runs every layer once a token)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        out: dict[int, float] = {}
        for p, index, begin, end in self._records:
            if p == phase:
                seconds = begin.elapsed_time(end) / 1000 if self.device.type == "cuda" else end - begin
                out[index] = out.get(index, 0.0) + seconds
        return [out[i] for i in sorted(out)]

    def total(self, phase: str) -> float:
        return sum(self.per_layer(phase))


def latency_summary(seconds: list[float]) -> dict[str, float]:
    """Per-token decode latency: median, 90th percentile and worst, in milliseconds."""
    if not seconds:
        return {"p50_ms": 0.0, "p90_ms": 0.0, "max_ms": 0.0}
    ordered = sorted(seconds)
    return {
        "p50_ms": median(ordered) * 1000,
        "p90_ms": ordered[min(int(0.9 * len(ordered)), len(ordered) - 1)] * 1000,
        "max_ms": ordered[-1] * 1000,
    }


def nvml_snapshot(device: torch.device) -> dict[str, object]:
    """NVML's view of the device: name, memory used/total, utilisation, power. Never raises.

    ``available`` is False, with the reason, on CPU, without pynvml, or without a driver.
    """
    if device.type != "cuda":
        return {"available": False, "reason": "no GPU: compute runs on the CPU"}
    try:
        import pynvml
    except ImportError:
        return {"available": False, "reason": "pynvml is not installed (pip install nvidia-ml-py)"}
    try:
        pynvml.nvmlInit()
        handle = _nvml_handle(pynvml, device)
        name = pynvml.nvmlDeviceGetName(handle)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        snapshot: dict[str, object] = {
            "available": True,
            "name": _text(name),
            "memory_used_bytes": int(memory.used),
            "memory_total_bytes": int(memory.total),
        }
    except pynvml.NVMLError as exc:
        return {"available": False, "reason": f"NVML: {exc}"}
    for key, read in (
        ("gpu_utilization_percent", lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
        ("power_watts", lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000),
        ("driver_version", lambda: _text(pynvml.nvmlSystemGetDriverVersion())),
    ):
        try:  # some boards (and MIG slices) do not report these; the rest of the snapshot still stands
            snapshot[key] = read()
        except pynvml.NVMLError:
            snapshot[key] = None
    return snapshot


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)  # older pynvml returns bytes


def _nvml_handle(pynvml, device: torch.device):
    """NVML's handle for torch's ``device``, found by UUID: NVML numbers every GPU of the machine while torch
    numbers only those CUDA_VISIBLE_DEVICES shows, so the two indices can name different cards."""
    index = torch.cuda.current_device() if device.index is None else device.index
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except pynvml.NVMLError:
            pass  # a MIG slice or an older driver spells its UUID otherwise; fall back to the index
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def device_memory(device: torch.device) -> dict[str, int | None]:
    """Peak allocated bytes on a CUDA device since the last reset, None elsewhere."""
    if device.type != "cuda":
        return {"device_peak_allocated_bytes": None, "device_peak_reserved_bytes": None}
    return {
        "device_peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
        "device_peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
    }


def memory_readout(device: torch.device) -> dict[str, object]:
    """What the memory gauge shows: used and total bytes and where they come from. Never raises.

    On CUDA: NVML's device view (all processes), else torch's free/total. On CPU:
    this process's RSS against the host's physical memory.
    """
    if device.type == "cuda":
        nvml = nvml_snapshot(device)
        if nvml["available"]:
            return {"used": nvml["memory_used_bytes"], "total": nvml["memory_total_bytes"], "source": f"NVML {nvml['name']}"}
        free, total = torch.cuda.mem_get_info(device)
        return {"used": total - free, "total": total, "source": "torch.cuda (no NVML)"}
    return {
        "used": psutil.Process().memory_info().rss,
        "total": psutil.virtual_memory().total,
        "source": "RSS / host memory (no GPU)",
    }
