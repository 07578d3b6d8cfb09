"""Choosing the cheapest neuron budget that keeps a model faithful to its dense self.

Two families are swept, each from its cheapest setting upwards: the adaptive
mass budget (share S of the prompt's activation mass, layers needing more than
``dense_above`` of their neurons kept dense) and fixed beta. Within a family
cost grows with the parameter, so each sweep stops at its first setting that
meets the target; the cheaper of the two winners (fewest FFN neurons used)
is chosen. If nothing meets the target, the budget is ``dense``.

The budgets are measured on top of ``base``'s token setting: the one token
calibration chose (runtime.token_calibration), or every image token kept.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from edgecm.fidelity import Fidelity, Reference, measure
from edgecm.sparsity import NeuronBudget, SparsitySettings

MASS_SHARES = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
BETAS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_TARGET = 0.95


def candidates(base: SparsitySettings) -> dict[str, list[SparsitySettings]]:
    base = replace(base, mode="corematching")
    return {
        "mass": [replace(base, neurons=NeuronBudget("mass", s)) for s in MASS_SHARES],
        "beta": [replace(base, neurons=NeuronBudget("beta", b)) for b in BETAS],
    }


def search(
    engine,
    refs: list[Reference],
    target: float,
    base: SparsitySettings,
    on_result: Callable[[Fidelity], None] | None = None,
) -> tuple[SparsitySettings, Fidelity | None, list[Fidelity]]:
    """(chosen settings, its measurement or None for dense, every measurement made)."""
    measured: list[Fidelity] = []
    winners: list[tuple[SparsitySettings, Fidelity]] = []
    for family in candidates(base).values():
        for settings in family:
            result = measure(engine, refs, settings, str(settings.neurons))
            measured.append(result)
            if on_result is not None:
                on_result(result)
            if result.top1_agreement >= target:
                winners.append((settings, result))
                break
    if not winners:
        return replace(base, neurons=NeuronBudget("dense")), None, measured
    settings, result = min(winners, key=lambda pair: pair[1].neuron_fraction)
    return settings, result, measured
