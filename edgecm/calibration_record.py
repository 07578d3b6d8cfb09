"""The calibration stored beside a checkpoint: what ``edgecm calibrate`` chose, for which weights, how well.

One JSON file, ``edgecm-calibration.json`` inside a checkpoint directory (or
``<name>.edgecm-calibration.json`` beside a .gguf file), written whole or not
at all (a temporary file renamed over the old one), so an interrupted or
failed calibration leaves the previous file as it was.

A record names the weights it was measured on by a fingerprint: a hash of
config.json (less the version of the library that wrote it), of every weight
file's name, size and header (the index of its tensors) and of the first bytes
of its data. A record whose fingerprint is not
the checkpoint's, or that has none, is never applied: it is reported and
ignored, since another model's measured setting is a guess for this one.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from edgecm.errors import EdgecmError
from edgecm.sparsity import NeuronBudget, SparsitySettings, TokenRule

CALIBRATION_FILE = "edgecm-calibration.json"
_DATA_SAMPLE = 64 * 1024  # bytes of each file's data in the fingerprint: tells random or tuned weights apart
_GGUF_HEAD = 1024 * 1024  # a GGUF file's metadata and tensor index come first


def calibration_path(checkpoint_path: Path) -> Path:
    """Where calibration results live: inside a checkpoint directory, or beside a .gguf file."""
    if checkpoint_path.is_dir():
        return checkpoint_path / CALIBRATION_FILE
    return checkpoint_path.with_name(checkpoint_path.stem + "." + CALIBRATION_FILE)


# Written by whatever transformers saved the checkpoint; they say nothing about the weights.
_CONFIG_BOOKKEEPING = ("transformers_version", "_name_or_path")


def _canonical_config(path: Path) -> bytes:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return path.read_bytes()
    if isinstance(config, dict):
        for key in _CONFIG_BOOKKEEPING:
            config.pop(key, None)
    return json.dumps(config, sort_keys=True).encode()


def fingerprint(checkpoint_path: Path) -> str:
    """A hash naming these weights: config, each weight file's name, size, header and first data bytes."""
    digest = hashlib.sha256()
    if checkpoint_path.is_dir():
        config = checkpoint_path / "config.json"
        digest.update(_canonical_config(config) if config.is_file() else b"")
        for shard in sorted(checkpoint_path.glob("*.safetensors")):
            with open(shard, "rb") as fh:
                raw = fh.read(8)
                header = fh.read(struct.unpack("<Q", raw)[0]) if len(raw) == 8 else b""
                data = fh.read(_DATA_SAMPLE)
            digest.update(f"{shard.name}:{shard.stat().st_size}:".encode() + header + data)
    else:
        with open(checkpoint_path, "rb") as fh:
            digest.update(f"{checkpoint_path.stat().st_size}:".encode() + fh.read(_GGUF_HEAD))
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class Calibration:
    """A calibration record that belongs to the checkpoint it was loaded for."""

    record: dict
    path: Path

    @property
    def tokens(self) -> dict | None:
        """The token setting chosen (ranking, budget, K), ``{"tokens": "all"}`` if no candidate met the
        target, or None where tokens were not calibrated (a text-only calibration set)."""
        return self.record.get("tokens")

    def apply(self, settings: SparsitySettings) -> SparsitySettings:
        """The calibrated token setting and neuron budget on top of ``settings``."""
        settings = replace(settings, neurons=NeuronBudget.parse(self.record["neurons"]),
                           dense_above=float(self.record["dense_above"]))
        tokens = self.tokens
        if tokens is None:
            return settings
        if tokens["tokens"] == "all":
            return replace(settings, tokens=TokenRule("all"))
        return replace(settings, token_rank=tokens["token_rank"], tokens=TokenRule.parse(tokens["tokens"]),
                       prune_layer=int(tokens["prune_layer"]), sparsevlm_k=tokens.get("sparsevlm_k"))

    def describe(self) -> str:
        """One line: the setting and its measured agreement with the dense model."""
        parts = []
        tokens = self.tokens
        if tokens is not None:
            if tokens["tokens"] == "all":
                parts.append("every image token kept (no pruning met the target)")
            else:
                k = tokens.get("sparsevlm_k") if tokens["token_rank"] == "sparsevlm" else tokens["prune_layer"]
                choice = self.record.get("token_choice") or {}
                parts.append(f"{tokens['token_rank']} {tokens['tokens']} from layer K={k}"
                             + (f" (top-1 agreement {choice['top1_agreement']:.3f}, prefill "
                                f"{choice['relative_prefill_flops']:.0%} of dense)" if choice else ""))
        achieved = self.record.get("achieved")
        parts.append(f"neurons {self.record['neurons']}"
                     + (f" (agreement {achieved['top1_agreement']:.3f} with both)" if achieved else ""))
        made = self.record.get("calibration_set", {})
        where = f" on {made['prompts']} {made.get('source', 'prompts')}" if made.get("prompts") else ""
        return "calibrated" + where + ": " + ", ".join(parts)


def write_record(checkpoint_path: Path, record: dict) -> Path:
    """Write ``record`` for the checkpoint, atomically, with the checkpoint's fingerprint."""
    path = calibration_path(checkpoint_path)
    record = {**record, "fingerprint": fingerprint(checkpoint_path)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(path)  # atomic: a reader sees the old file or the new one, never half of one
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise EdgecmError(
            f"{path}: cannot write the calibration ({exc.strerror}); make the checkpoint directory writable "
            f"or copy the checkpoint somewhere writable"
        ) from None
    return path


def load_record(checkpoint_path: Path, shipped: Path | None = None) -> tuple[Calibration | None, str | None]:
    """The checkpoint's calibration and a notice for the user (None where there is nothing to say).

    A file beside the checkpoint wins; ``shipped`` is a calibration that came with the package (the demo's).
    A record for other weights, or an unreadable one, is not applied, and the notice says why.
    """
    candidates = [calibration_path(checkpoint_path)] + ([shipped] if shipped is not None else [])
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return None, None
    try:
        record = json.loads(path.read_text())
        NeuronBudget.parse(record["neurons"])
        float(record["dense_above"])
        tokens = record.get("tokens")
        if tokens is not None and tokens["tokens"] != "all":
            TokenRule.parse(tokens["tokens"])
            SparsitySettings(token_rank=tokens["token_rank"], prune_layer=int(tokens["prune_layer"]),
                             sparsevlm_k=tokens.get("sparsevlm_k"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, EdgecmError):
        return None, f"{path}: unreadable calibration file, not applied; run `edgecm calibrate` again"
    if record.get("fingerprint") != fingerprint(checkpoint_path):
        return None, (f"{path}: made for other weights than {checkpoint_path} (fingerprint differs), not applied; "
                      f"run `edgecm calibrate` for this checkpoint")
    return Calibration(record, path), None
