"""The dtype a CPU computes in, chosen by measuring this CPU: bfloat16 where it is faster, float32 otherwise.

A CPU with AMX-BF16 or AVX512-BF16 multiplies bfloat16 several times faster
than float32, and a decode step reads half the bytes; a CPU without them
emulates bfloat16 and can be many times slower. Neither is assumed: where
the flags are present, a short timed GEMM (a prefill-shaped product) and
GEMV (a decode step through one weight) run in both dtypes, and bfloat16 is
chosen only if its GEMM is clearly faster and its GEMV is no slower.

The result is cached in the edgecm home folder, keyed by the CPU, its
flags, torch's version and thread count, so the timing runs once per machine
and setting; ``edgecm profile`` measures afresh and writes it into the profile.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
GEMM_SPEEDUP_NEEDED = 1.2  # below this, bfloat16's rounding is not worth it
GEMM_SHAPE = (256, 2048, 2048)  # rows x inner x outer: a slice of a prefill projection
GEMV_SHAPE = (4096, 4096)  # one token through a weight larger than any cache
REPEATS = 3
CACHE_FILE = "cpu-dtype.json"


@dataclass(frozen=True)
class DtypeChoice:
    """What was measured on this CPU and the dtype chosen from it."""

    chosen: str  # "bfloat16" or "float32"
    reason: str
    cpu: str
    flags: list[str]  # the bfloat16 flags this CPU reports
    threads: int
    torch_version: str
    gemm_ms: dict | None = None  # dtype -> best time of the GEMM
    gemv_ms: dict | None = None  # dtype -> best time of the GEMV

    @property
    def key(self) -> str:
        return cache_key(self.cpu, self.flags, self.threads, self.torch_version)

    def to_json(self) -> dict:
        return asdict(self)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """Every instruction flag this CPU reports (Linux's /proc/cpuinfo; none known elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_flags() -> list[str]:
    """The bfloat16 instruction flags among them."""
    flags = cpu_flags()
    return [f for f in BF16_FLAGS if f in flags]


def cache_key(cpu: str, flags: list[str], threads: int, torch_version: str) -> str:
    return f"{cpu} | {','.join(flags) or 'no bf16 flags'} | {threads} threads | torch {torch_version}"


def _best_ms(fn) -> float:
    fn()  # warm-up: kernel selection, first-touch of the operands
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def measure() -> DtypeChoice:
    """Time the two products in both dtypes (well under a second) and choose."""
    cpu, flags, threads = cpu_name(), bf16_flags(), torch.get_num_threads()
    base = dict(cpu=cpu, flags=flags, threads=threads, torch_version=torch.__version__)
    if not flags:
        return DtypeChoice("float32", "no AMX-BF16 or AVX512-BF16 on this CPU: bfloat16 would be emulated", **base)
    generator = torch.Generator().manual_seed(0)
    rows, inner, outer = GEMM_SHAPE
    gemm, gemv = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        a = torch.randn(rows, inner, generator=generator).to(dtype)
        b = torch.randn(inner, outer, generator=generator).to(dtype)
        x = torch.randn(1, GEMV_SHAPE[1], generator=generator).to(dtype)
        w = torch.randn(*GEMV_SHAPE, generator=generator).to(dtype)
        gemm[name] = round(_best_ms(lambda: a @ b), 3)
        gemv[name] = round(_best_ms(lambda: F.linear(x, w)), 3)
        del a, b, x, w
    speedup = gemm["float32"] / gemm["bfloat16"]
    decode = gemv["float32"] / gemv["bfloat16"]
    figures = f"bfloat16 GEMM {speedup:.2f}x, GEMV {decode:.2f}x float32's speed"
    if speedup >= GEMM_SPEEDUP_NEEDED and decode >= 1.0:
        chosen, reason = "bfloat16", f"{'+'.join(flags)}; {figures}"
    else:
        chosen, reason = "float32", f"{'+'.join(flags)} present, but {figures}"
    return DtypeChoice(chosen, reason, gemm_ms=gemm, gemv_ms=gemv, **base)


def cache_path() -> Path:
    from edgecm.demo import cache_root

    return cache_root() / CACHE_FILE


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # absent or damaged: measured again and rewritten


def cpu_dtype(on_measured: Callable[[DtypeChoice], None] | None = None) -> DtypeChoice:
    """This CPU's choice: from the cache when this CPU, torch and thread count were measured before;
    ``on_measured`` hears of a choice measured now (the CLI says so, once)."""
    path = cache_path()
    cached = _read_cache(path)
    key = cache_key(cpu_name(), bf16_flags(), torch.get_num_threads(), torch.__version__)
    entry = cached.get(key)
    if isinstance(entry, dict):
        try:
            return DtypeChoice(**entry)
        except TypeError:
            pass
    choice = measure()
    remember(choice, path)
    if on_measured is not None:
        on_measured(choice)
    return choice


def remember(choice: DtypeChoice, path: Path | None = None) -> None:
    """Write ``choice`` into the cache, atomically; a cache that cannot be written only costs a re-measure."""
    path = path or cache_path()
    cached = _read_cache(path)
    cached[choice.key] = choice.to_json()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cached, indent=2) + "\n")
        os.replace(temporary, path)
    except OSError:
        pass
