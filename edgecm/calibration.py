"""Choosing the cheapest neuron budget that keeps a model faithful to its dense self.

Two families are swept, each from its cheapest setting upwards: the adaptive
mass budget (share S of the prompt's activation mass, layers needing more than
``dense_above`` of their neurons kept dense) and fixed beta. Within a family
cost grows with the parameter, so each sweep stops at its first setting that
meets the target; the cheaper of the two winners (fewest FFN neurons used)
is chosen. If nothing meets the target, the budget is ``dense``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

from edgecm import __version__
from edgecm.errors import EdgecmError
from edgecm.fidelity import Fidelity, Reference, measure, neuron_only
from edgecm.sparsity import NeuronBudget, SparsitySettings, calibration_path

MASS_SHARES = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
BETAS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_TARGET = 0.95


def candidates(base: SparsitySettings) -> dict[str, list[SparsitySettings]]:
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
            result = measure(engine, refs, neuron_only(settings), str(settings.neurons))
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


def write_calibration(
    checkpoint_path: Path, settings: SparsitySettings, result: Fidelity | None, target: float, measured: list[Fidelity], meta: dict
) -> Path:
    path = calibration_path(checkpoint_path)
    record = {
        "neurons": str(settings.neurons),
        "dense_above": settings.dense_above,
        "target_top1_agreement": target,
        "achieved": None if result is None else result.to_json(),
        "measured": [m.to_json() for m in measured],
        "edgecm_version": __version__,
        **meta,
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(path)  # atomic: run never reads a half-written file
    except OSError as exc:
        raise EdgecmError(
            f"{path}: cannot write the calibration ({exc.strerror}); make the checkpoint directory writable "
            f"or copy the checkpoint somewhere writable"
        ) from None
    return path
