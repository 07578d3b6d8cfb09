"""Neuron sparsity on real weights (SmolLM2-135M-Instruct) keeps its measured fidelity.

Floors come from bench/results/fidelity-smollm2-cpu.md and from this subset
(the 4th-9th short prompts and two long ones, 24-token answers), measured at
0.944 for the default budget (mass:0.98) and 0.118 for beta:0.4 on the
machine that produced the table. Margins allow for float32 round-off on other
CPUs, which can flip near-tied argmaxes, not for a change in the method.
"""

from __future__ import annotations

import pytest

from edgecm.checkpoint import open_checkpoint
from edgecm.demo import smollm2_gguf_path
from edgecm.fidelity import dense_references, load_prompts, measure, neuron_only
from edgecm.prompt import PromptBuilder
from edgecm.sparsity import NeuronBudget, SparsitySettings
from runtime.engine import Engine

DEFAULT_FLOOR = 0.90
BETA_04_CEILING = 0.30


@pytest.fixture(scope="module")
def measured():
    checkpoint = open_checkpoint(smollm2_gguf_path())
    builder = PromptBuilder(checkpoint)
    engine = Engine(checkpoint, resident=True)
    texts = load_prompts()
    prompts = [builder.build(t) for t in texts[3:9] + texts[26:28]]
    refs = dense_references(engine, prompts, builder.stop_token_ids, 24)
    default = measure(engine, refs, neuron_only(SparsitySettings()), "default")
    beta = measure(engine, refs, neuron_only(SparsitySettings(neurons=NeuronBudget("beta", 0.4))), "beta:0.4")
    print(f"default {default.top1_agreement:.3f} ({default.neuron_fraction:.3f} neurons), beta:0.4 {beta.top1_agreement:.3f}")
    return default, beta


def test_default_budget_stays_above_its_floor(measured):
    default, _ = measured
    assert default.top1_agreement >= DEFAULT_FLOOR
    assert default.neuron_fraction < 1.0  # it does prune something


def test_paper_beta_is_not_safe_on_a_small_model(measured):
    default, beta = measured
    assert beta.top1_agreement <= BETA_04_CEILING
    assert beta.top1_agreement < default.top1_agreement
