"""Quantised resident weights through bitsandbytes: NF4 (4-bit) and int8 (LLM.int8).

Only weights that stay on the device are quantised (the decode set, and whole
layers when the model is kept resident): they are what decode reads every
token, so their size is what limits a 12 GB card and what decode bandwidth
pays for. Streamed prefill weights stay in the checkpoint's dtype.

A quantised matrix is a ``QuantizedWeight``; ``linear`` takes either kind, so
the decoder layer code does not care which it was given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from edgecm.errors import EdgecmError

QUANT_KINDS = ("nf4", "int8")
NF4_BLOCK = 64
INT8_OUTLIER_THRESHOLD = 6.0  # LLM.int8's default: feature columns above it run in 16-bit


def _bnb():
    # bitsandbytes' CPU backend logs a warning about an optional kernel package at import; it is not the user's concern.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError as exc:
        raise EdgecmError(f"--quant needs bitsandbytes ({exc}); install it with `pip install bitsandbytes`") from None
    return bitsandbytes


def check_supported(kind: str, device: torch.device) -> None:
    """Refuse a quantisation this device cannot run, before any weight is loaded."""
    if kind not in QUANT_KINDS:
        raise EdgecmError(f"--quant {kind}: unknown; use one of {', '.join(QUANT_KINDS)}")
    _bnb()
    if kind == "int8" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (7, 5):
            name = torch.cuda.get_device_name(device)
            raise EdgecmError(
                f"--quant int8: {name} has compute capability {major}.{minor}, and bitsandbytes' int8 matmul needs "
                f"7.5 (Turing) or newer; use --quant nf4, which runs on this card"
            )


@dataclass
class QuantizedWeight:
    """An (out_features, in_features) matrix held quantised; ``shape`` is the original one."""

    kind: str
    data: torch.Tensor  # nf4: packed uint8; int8: (out, in) int8
    state: Any  # nf4: bitsandbytes QuantState; int8: per-row scales (out,) float32
    shape: tuple[int, int]
    dtype: torch.dtype  # the compute dtype outputs come back in

    @property
    def nbytes(self) -> int:
        extra = self.state.absmax.numel() * self.state.absmax.element_size() if self.kind == "nf4" else (
            self.state.numel() * self.state.element_size()
        )
        return self.data.numel() * self.data.element_size() + extra

    def dequantize(self) -> torch.Tensor:
        """The matrix back in the compute dtype (to slice core-neuron rows out of a kept quantised layer)."""
        functional = _bnb().functional
        if self.kind == "nf4":
            full = functional.dequantize_4bit(self.data, self.state)
        else:
            full = functional.int8_vectorwise_dequant(self.data, self.state)
        return full.to(self.dtype).view(self.shape)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        bnb = _bnb()
        if self.kind == "nf4":
            return bnb.matmul_4bit(x, self.data.t(), quant_state=self.state, bias=bias)
        state = bnb.MatmulLtState()
        state.CB, state.SCB = self.data, self.state
        state.has_fp16_weights, state.is_training, state.threshold = False, False, INT8_OUTLIER_THRESHOLD
        out = bnb.matmul(x.to(torch.float16), self.data, state=state)
        out = out.to(x.dtype)
        return out if bias is None else out + bias


def quantize(weight: torch.Tensor, kind: str) -> QuantizedWeight:
    """Quantise one matrix on its own device; the original can be dropped afterwards."""
    bnb = _bnb()
    functional = bnb.functional
    if kind == "nf4":
        data, state = functional.quantize_4bit(
            weight.contiguous(), blocksize=NF4_BLOCK, quant_type="nf4", compress_statistics=False
        )
    else:
        data, state, _ = functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
    return QuantizedWeight(kind=kind, data=data, state=state, shape=tuple(weight.shape), dtype=weight.dtype)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a plain or a quantised weight."""
    if isinstance(weight, QuantizedWeight):
        return weight.linear(x, bias)
    return F.linear(x, weight, bias)


def weight_nbytes(weight) -> int:
    if isinstance(weight, QuantizedWeight):
        return weight.nbytes
    return weight.numel() * weight.element_size()
