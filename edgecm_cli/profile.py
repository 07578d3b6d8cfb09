"""``edgecm profile``: measure this machine and write a device profile the planner can use."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from edgecm.errors import EdgecmError
from edgecm_cli.streams import StdoutError

FULL = dict(disk=1024 * 2**20, memory=512 * 2**20, transfer=512 * 2**20, matmul=4096)
QUICK = dict(disk=64 * 2**20, memory=64 * 2**20, transfer=64 * 2**20, matmul=512)
# Written into every measured profile, so the file says what its flags mean (JSON has no comments).
NOTES = {
    "supports_bf16": "the device can compute in bfloat16 (on CPU: a bfloat16 matmul ran here; on CUDA: torch "
                     "reports bfloat16 support). It says nothing of speed: see bfloat16_matmul_speedup",
    "bfloat16_matmul_speedup": "measured bfloat16 matmul TFLOP/s over float32's (CPU) or float16's (CUDA) "
                               "(matmul_tflops); above 1, bfloat16 matmuls are faster here",
    "default_dtype": "what edgecm computes in on this device unless told otherwise (--dtype); on CPU chosen by "
                     "dtype_choice",
    "dtype_choice": "CPU only: the bfloat16 flags found, a timed GEMM and GEMV in float32 and bfloat16, and the "
                    "dtype chosen from them (bfloat16 only if its GEMM is 1.2x faster and its GEMV no slower)",
}


def cmd_profile(args: argparse.Namespace) -> int:
    from runtime.engine import resolve_device

    device = resolve_device(args.device)
    sizes = QUICK if args.quick else FULL
    scratch = Path(args.scratch)
    if not scratch.is_dir():
        raise EdgecmError(f"--scratch {scratch}: no such directory; give a directory on the disk that holds your models")
    if shutil.disk_usage(scratch).free < sizes["disk"]:
        raise EdgecmError(f"--scratch {scratch}: the disk test writes {sizes['disk'] // 2**20} MiB and the disk "
                          f"holding it has {shutil.disk_usage(scratch).free // 2**20} MiB free; pass --scratch a "
                          f"folder on a disk with room")
    pending = ProfileOut(Path(args.out)) if args.out else None  # checked before a minute of measuring
    try:
        return _measure_and_write(args, device, sizes, scratch, pending)
    finally:
        if pending is not None:
            pending.discard()


def _measure_and_write(args: argparse.Namespace, device, sizes: dict, scratch: Path, pending) -> int:
    import psutil
    import torch
    from rich.console import Console
    from rich.progress import Progress

    from runtime import measure
    from runtime.telemetry import nvml_snapshot

    cuda = device.type == "cuda"
    dtypes = [torch.float16, torch.bfloat16] if cuda else [torch.float32, torch.bfloat16]
    if cuda and not torch.cuda.is_bf16_supported():
        dtypes = [torch.float16]
    steps = ["disk read", "memory copy", *(["host->device pinned", "host->device pageable"] if cuda else []),
             *[f"matmul {str(d).replace('torch.', '')}" for d in dtypes]]
    results: dict = {}
    console = Console(stderr=True)
    with Progress(console=console) as progress:
        task = progress.add_task("profiling", total=len(steps))
        for step in steps:
            progress.update(task, description=step)
            if step == "disk read":
                try:
                    results["disk_read_gbs"] = measure.disk_read_gbs(scratch, sizes["disk"])
                except OSError as exc:  # the disk filled while writing its test file
                    raise EdgecmError(f"--scratch {scratch}: cannot write the disk test file ({exc.strerror}); pass "
                                      f"--scratch a folder on a disk with room") from None
            elif step == "memory copy":
                results["memory_bandwidth_gbs"] = measure.memory_bandwidth_gbs(device, sizes["memory"])
            elif step.startswith("host->device"):
                key = "h2d_pinned_gbs" if step.endswith("pinned") else "h2d_pageable_gbs"
                results[key] = measure.host_to_device_gbs(device, sizes["transfer"], pinned=key == "h2d_pinned_gbs")
            else:
                name = step.split()[1]
                rate = _matmul_or_none(measure, device, getattr(torch, name), sizes["matmul"])
                if rate is not None:  # a dtype the device cannot multiply in is left out, not guessed
                    results.setdefault("matmul_tflops", {})[name] = rate
            progress.advance(task)
    rates = results.get("matmul_tflops", {})
    if cuda:
        nvml = nvml_snapshot(device)
        name = nvml["name"] if nvml["available"] else torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.empty_cache()  # the measurements' buffers go back, so they do not count as reserved
        # What is gone before any tensor of ours: the CUDA context and other processes.
        reserved = total - torch.cuda.mem_get_info(device)[0] - torch.cuda.memory_reserved(device)
        bf16 = torch.cuda.is_bf16_supported()
        int8 = torch.cuda.get_device_capability(device) >= (7, 5)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {psutil.cpu_count(logical=False) or psutil.cpu_count()} cores"
        total = psutil.virtual_memory().total
        reserved = psutil.Process().memory_info().rss
        bf16 = "bfloat16" in rates  # it computes in bfloat16 if a bfloat16 matmul ran; faster or not
        int8 = False
    choice = None
    if cuda:
        default_dtype = "float16"
    else:  # the same measurement the engine's default comes from, made afresh and cached for it
        from runtime import cpu_dtype

        choice = cpu_dtype.measure()
        cpu_dtype.remember(choice)
        default_dtype = choice.chosen
    reference = "float16" if cuda else "float32"
    speedup = rates["bfloat16"] / rates[reference] if "bfloat16" in rates and rates.get(reference) else None
    profile = {
        "name": name,
        "kind": device.type,
        "memory_bytes": int(total),
        "reserved_bytes": int(reserved),
        "supports_bf16": bf16,
        "bfloat16_matmul_speedup": None if speedup is None else round(speedup, 2),
        "supports_int8": int8,
        "default_dtype": default_dtype,
        **({} if choice is None else {"dtype_choice": choice.to_json()}),
        "source": f"measured by edgecm profile{' --quick' if args.quick else ''} on "
        f"{datetime.date.today().isoformat()}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads",
        **{k: round(v, 3) if isinstance(v, float) else {d: round(x, 3) for d, x in v.items()} for k, v in results.items()},
        "notes": NOTES,
    }
    text = json.dumps(profile, indent=2)
    unprinted = None
    try:
        print(text, flush=True)  # first: a file that cannot be written then loses nothing
    except StdoutError as exc:
        if pending is None:
            raise
        unprinted = exc  # the file may still take it: written first, then the stdout failure is said
    if pending is not None:
        try:
            pending.commit(text + "\n")
        except OSError as exc:
            where = "it is printed above, on stdout: save it from there" if unprinted is None else "nor on stdout"
            print(f"edgecm: error: --out {pending.out}: cannot write the profile ({exc.strerror}); {where}, or run "
                  f"again with --out on a disk with room", file=sys.stderr)
            return 1
        console.print(f"wrote {pending.out}")
    if unprinted is not None:
        raise unprinted
    return 0


class ProfileOut:
    """Where --out goes, made ready before measuring: its folder exists (at most that last folder is made),
    and a temporary file beside it is open, so writability is known at once. The profile then replaces
    the target in one rename (through a symlink, the file it names), never half-written."""

    def __init__(self, out: Path):
        self.out = out
        target = Path(os.path.realpath(out))
        if target.exists() and not target.is_file():
            # A rename onto a device or a folder would replace it (as root, /dev/null itself).
            raise EdgecmError(f"--out {out}: not a regular file; pass a path for the profile (.json)")
        folder = target.parent
        if not folder.exists():
            if not folder.parent.is_dir():
                raise EdgecmError(f"--out {out}: neither {folder} nor {folder.parent} exists; profile makes at most "
                                  f"the last folder, so create the ones above it first")
            try:
                folder.mkdir()
            except OSError as exc:
                raise EdgecmError(f"--out {out}: cannot make {folder} ({exc.strerror}); pass a writable path") from None
            print(f"edgecm: made the folder {folder}", file=sys.stderr)
        elif not folder.is_dir():
            raise EdgecmError(f"--out {out}: {folder} is not a folder; pass a writable path")
        try:
            self.fd, self.temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        except OSError as exc:
            raise EdgecmError(f"--out {out}: cannot write in {folder} ({exc.strerror}); pass a writable path") from None
        self.target = target

    def commit(self, text: str) -> None:
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(self.fd, 0o666 & ~mask)  # mkstemp's 0600 would hide the profile from other users
        data = memoryview(text.encode())
        while data:
            data = data[os.write(self.fd, data):]
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.temporary, self.target)
        self.temporary = None

    def discard(self) -> None:
        """Remove the temporary file, if the profile was not written (an error, Ctrl-C)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.temporary is not None:
            try:
                os.unlink(self.temporary)
            except OSError:
                pass
            self.temporary = None


def _matmul_or_none(measure, device, dtype, n: int) -> float | None:
    """The matmul rate in ``dtype``, or None where the device has no kernel for it (torch raises then)."""
    try:
        return measure.matmul_tflops(device, dtype, n)
    except (RuntimeError, NotImplementedError):
        return None
