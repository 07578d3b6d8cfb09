"""Rotary position embeddings with every scaling variant transformers supports for Llama.

Variants: default, linear, dynamic (NTK), yarn, longrope, llama3. Frequencies
are computed in float32 and cos/sin are produced per call from the absolute
position ids, so a token keeps its original position however the cache is
compacted later. ``dynamic`` and ``longrope`` depend on the longest position
seen in the call (as in transformers, where the frequency update happens at
every forward).

Multimodal RoPE (Qwen2.5-VL) gives each token three position ids (temporal,
height, width); ``mrope_section`` splits the head_dim/2 frequencies into three
runs and each run rotates by its own id, as transformers'
``Qwen2_5_VLRotaryEmbedding`` does. Text tokens carry three equal ids, so for
them it is plain 1-D RoPE.
"""

from __future__ import annotations

import math

import torch

from edgecm.config import RopeConfig, TextConfig
from edgecm.errors import EdgecmError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


def _base_exponents(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim


def _plain(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** _base_exponents(dim))


def _yarn(rope: RopeConfig, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    original = rope.original_max_position_embeddings or max_pos
    factor = rope.factor if rope.factor is not None else max_pos / original

    def mscale_of(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.attention_factor
    if attention is None:
        if rope.mscale and rope.mscale_all_dim:
            attention = mscale_of(factor, rope.mscale) / mscale_of(factor, rope.mscale_all_dim)
        else:
            attention = mscale_of(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength makes `rotations` turns over the original context.
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    inv = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
    return inv, float(attention)


def _llama3(rope: RopeConfig, dim: int) -> torch.Tensor:
    inv = _plain(rope.theta, dim)
    factor, low_f, high_f = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_ctx = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old_ctx / low_f, old_ctx / high_f
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low_f) / (high_f - low_f)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def inverse_frequencies(text: TextConfig, seq_len: int) -> tuple[torch.Tensor, float]:
    """(inv_freq of shape (head_dim/2,), attention scaling of cos/sin) for a call reaching ``seq_len``."""
    rope, max_pos = text.rope, text.max_position_embeddings
    if rope.rope_type not in SUPPORTED_ROPE_TYPES:
        raise EdgecmError(
            f"config.json: rope type '{rope.rope_type}' is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope.partial_rotary_factor != 1.0:
        raise EdgecmError("config.json: partial_rotary_factor != 1 is not a LLaMA configuration; edgecm rotates full heads")
    dim = text.head_dim
    if rope.rope_type == "default":
        return _plain(rope.theta, dim), 1.0
    if rope.rope_type == "linear":
        return _plain(rope.theta, dim) / rope.factor, 1.0
    if rope.rope_type == "dynamic":
        effective = max(seq_len, max_pos)
        theta = rope.theta * ((rope.factor * effective / max_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
        return _plain(theta, dim), 1.0
    if rope.rope_type == "yarn":
        return _yarn(rope, dim, max_pos)
    if rope.rope_type == "longrope":
        original = rope.original_max_position_embeddings
        factor = rope.factor if rope.factor is not None else max_pos / original
        attention = rope.attention_factor
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        ext = rope.long_factor if seq_len > original else rope.short_factor
        return 1.0 / (torch.tensor(ext, dtype=torch.float32) * rope.theta ** _base_exponents(dim)), float(attention)
    return _llama3(rope, dim), 1.0


class Rotary:
    """cos/sin tables for absolute positions; the static variants are computed once."""

    def __init__(self, text: TextConfig, device: torch.device):
        self.text = text
        self.device = device
        self._static = text.rope.rope_type not in ("dynamic", "longrope")
        self._cached = inverse_frequencies(text, 0) if self._static else None
        section = text.rope.mrope_section
        if section is not None and sum(section) != text.head_dim // 2:
            raise EdgecmError(
                f"config.json: mrope_section {list(section)} sums to {sum(section)}, not head_dim/2 = "
                f"{text.head_dim // 2}; fix rope_scaling.mrope_section"
            )

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) absolute ids, or (3, T) for multimodal RoPE -> cos, sin of shape (T, head_dim)."""
        if self._static:
            inv, scale = self._cached
        else:
            inv, scale = inverse_frequencies(self.text, int(positions.max()) + 1)
        section = self.text.rope.mrope_section
        if section is None and positions.dim() != 1:
            raise EdgecmError(f"position ids of shape {tuple(positions.shape)} need a multimodal RoPE config")
        if section is None:
            freqs = positions.to(self.device, torch.float32)[:, None] * inv.to(self.device)[None, :]  # (T, D/2)
        else:
            ids = positions.to(self.device, torch.float32)
            if ids.dim() == 1:  # a text-only stretch: the same id on all three axes
                ids = ids.expand(3, -1)
            per_axis = ids[:, :, None] * inv.to(self.device)  # (3, T, D/2)
            # Run i of the frequencies takes the ids of axis i % 3 (temporal, height, width).
            runs = per_axis.split(list(section), dim=-1)
            freqs = torch.cat([run[i % 3] for i, run in enumerate(runs)], dim=-1)  # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (T, D)."""
    return x * cos + rotate_half(x) * sin
