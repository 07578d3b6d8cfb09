"""The specification's selection rules, read literally in plain Python: independent references for the tests.

Nothing here calls edgecm.corematching; every rule is written from
shared/docs/corematching.md's wording, token by token and neuron by neuron.
"""

from __future__ import annotations

import math

import torch


def frequency(h: torch.Tensor, rho: float) -> list[int]:
    """f(n): how many tokens (rows of h) have n among the ceil(rho |G(t)|) largest of their positive entries."""
    f = [0] * h.shape[1]
    for row in h.tolist():
        activated = [n for n, v in enumerate(row) if v > 0]
        k = math.ceil(rho * len(activated))
        for n in sorted(activated, key=lambda n: (-row[n], n))[:k]:  # largest first; ties: lower index
            f[n] += 1
    return f


def core(f: list[int], beta: float) -> list[int]:
    """The ceil(beta F) neurons of largest f, ties to the lower index, ascending."""
    count = math.ceil(beta * len(f))
    return sorted(sorted(range(len(f)), key=lambda n: (-f[n], n))[:count])


def match_scores(h_image: torch.Tensor, core_set: list[int]) -> list[int]:
    """score(i) = |G(i) intersect Core|."""
    chosen = set(core_set)
    return [sum(1 for n, v in enumerate(row) if v > 0 and n in chosen) for row in h_image.tolist()]


def reference_scores(h_image: torch.Tensor, h_reference: torch.Tensor) -> list[int]:
    """core-ref: score(i) = |G(i) intersect G(r)|, G the positive entries."""
    reference = {n for n, v in enumerate(h_reference.tolist()) if v > 0}
    return [sum(1 for n, v in enumerate(row) if v > 0 and n in reference) for row in h_image.tolist()]


def knee_keep(scores: list[int]) -> list[int]:
    """Tokens with score >= tau, tau the score at the first point farthest from the chord of the sorted scores."""
    s = sorted(scores, reverse=True)
    m = len(s)
    if m < 3:
        j = 0
    else:
        x0, y0, x1, y1 = 0.0, float(s[0]), float(m - 1), float(s[-1])
        norm = math.hypot(x1 - x0, y1 - y0)
        distances = [abs((x1 - x0) * (y0 - s[j]) - (x0 - j) * (y1 - y0)) / norm for j in range(m)]
        j = distances.index(max(distances))
    tau = s[j] if s else 0
    return [i for i, v in enumerate(scores) if v >= tau]


def core_tokens(h: torch.Tensor, image_rows: torch.Tensor, rho: float, beta: float) -> tuple[list[int], list[int]]:
    """(kept image tokens at the knee, their match scores) from one layer's activations h (T, F) of the prompt."""
    scores = match_scores(h[image_rows], core(frequency(h, rho), beta))
    return knee_keep(scores), scores
