"""Choosing the next token: greedy by default, temperature / top-p when asked."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_p: float = 1.0
    seed: int = 0


def seeded_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The random stream sampling draws from, on ``device``: the device of the logits it will sample.

    torch.multinomial takes a generator only of its input's device (a CPU
    generator with CUDA probabilities raises), so each loop makes its
    generator where its logits are.
    """
    return torch.Generator(device=device).manual_seed(seed)


def next_token(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None) -> int:
    """logits: (V,) for the last position; ``generator`` lives on the logits' device (``seeded_generator``)."""
    if settings.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= settings.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
