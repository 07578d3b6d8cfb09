"""The device memory one engine may use: where the figure comes from, how it is kept to, and its ledger.

``--budget`` caps the compute device's memory. On CUDA the cap is enforced by
torch's allocator (``set_per_process_memory_fraction``), so a 12 GB card can
be emulated on a larger one, and running out becomes an error that names the
numbers. On CPU the budget is what the planner divides between resident
weights, KV cache and activations; the host's own accounting is RSS, which
includes the Python process, so the profile's reserved bytes cover that.

Without ``--budget`` the device's free memory is the budget (on CPU: the
host's available memory), and the same planning decides what stays resident.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import psutil
import torch

from runtime.planner import GiB, DeviceProfile, list_profiles, load_profile, parse_bytes

GENERIC_CUDA_RESERVED = 600 * 1024**2  # CUDA context and allocator slack on a card without a profile


def detect_profile(device: torch.device) -> DeviceProfile:
    """The profile of this machine's device: a shipped one matching its name, else one built from what it reports."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = re.sub(r"[^a-z0-9]", "", name.lower().replace("nvidia", "").replace("geforce", ""))
        for candidate in list_profiles():
            profile = load_profile(candidate)
            short = re.sub(r"[^a-z0-9]", "", profile.name.lower().replace("nvidia", "").replace("geforce", ""))
            if profile.kind == "cuda" and key and short.startswith(key):
                return replace(profile, memory_bytes=torch.cuda.get_device_properties(device).total_memory)
        major, minor = torch.cuda.get_device_capability(device)
        return DeviceProfile(
            name=name,
            kind="cuda",
            memory_bytes=torch.cuda.get_device_properties(device).total_memory,
            memory_bandwidth_gbs=0.0,
            reserved_bytes=GENERIC_CUDA_RESERVED,
            supports_bf16=torch.cuda.is_bf16_supported(),
            supports_int8=(major, minor) >= (7, 5),
            source="reported by the device (no shipped profile matches its name); bandwidths unknown",
        )
    total = psutil.virtual_memory().total
    return replace(load_profile("generic-cpu"), name=f"this CPU host ({total / GiB:.0f} GiB)", memory_bytes=total)


def resolve_budget(text: str | None, device: torch.device) -> int:
    """Bytes this run may use on ``device``: --budget, or what the device has free."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        available = free + torch.cuda.memory_reserved(device)  # what this process already holds counts as ours
    else:
        total = psutil.virtual_memory().total
        available = psutil.virtual_memory().available + psutil.Process().memory_info().rss
    if text is None:
        return available
    # A budget beyond the device means "use all of it": the plan then keeps whatever the device holds.
    return min(parse_bytes(text), total)


def enforce(device: torch.device, budget: int) -> None:
    """Make the allocator refuse to go past ``budget`` bytes (CUDA); nothing to do on CPU.

    The cap is torch's per-process memory fraction, so the engine made last sets it for the whole process."""
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(budget / total, 1.0), device)


def out_of_memory_message(device: torch.device, budget: int, what: str) -> str:
    """One line with the numbers, for an allocation the budget refused."""
    allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return (
        f"out of device memory during {what}: budget {budget / GiB:.2f} GiB, {allocated / GiB:.2f} GiB allocated, "
        f"peak {peak / GiB:.2f} GiB; raise --budget, use --quant nf4, or shorten the prompt / --max-new-tokens"
    )


@dataclass
class Ledger:
    """Bytes the engine has committed on the device against what the budget leaves usable.

    Estimates from the planner's formulas, kept as the engine places weights;
    ``fits`` asks whether ``size`` more still leaves ``reserve`` for what must
    come later (KV cache, activations, streaming slots).
    """

    usable: int
    committed: int = 0

    def fits(self, size: int, reserve: int) -> bool:
        return self.committed + size + reserve <= self.usable

    def commit(self, size: int) -> None:
        self.committed += size
