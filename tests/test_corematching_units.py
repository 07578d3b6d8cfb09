"""CoreMatching's selection functions on hand-made inputs, against the specification's wording."""

from __future__ import annotations

import pytest
import torch

import spec

from edgecm.corematching import (
    LayerActivationStats,
    core_neurons,
    decode_neurons,
    knee_index,
    knee_keep,
    mass_budget_neurons,
    match_scores,
    select_image_tokens,
    token_core_frequency,
)
from edgecm.errors import EdgecmError
from edgecm.model import LayerWeights, activation, feed_forward
from edgecm.sparsity import NeuronBudget, SparsitySettings, TokenRule


def test_frequency_by_hand():
    h = torch.tensor([[3.0, -1, 2, 0, 1], [0, 0, 0, 0, 0], [-1, 5, 5, 1, -2]])
    # token 0: G = {0, 2, 4}, k = 2 -> {0, 2}; token 1: no positive entry, nothing;
    # token 2: G = {1, 2, 3}, k = 2 -> {1, 2} (1 and 2 tie at 5, both fit).
    assert token_core_frequency(h, 0.5).tolist() == [1, 1, 2, 0, 0]


def test_frequency_tie_goes_to_lower_index():
    h = torch.tensor([[1.0, 4, 4, 4]])  # G has 4 members, rho 0.5 -> k = 2 among three tied 4s
    assert token_core_frequency(h, 0.5).tolist() == [0, 1, 1, 0]


def test_frequency_matches_naive_reference_on_tie_heavy_inputs():
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        t, f = int(torch.randint(1, 12, (1,), generator=gen)), int(torch.randint(1, 30, (1,), generator=gen))
        h = torch.randint(-3, 4, (t, f), generator=gen).float()
        rho = (0.1, 0.2, 0.5, 1.0)[trial % 4]
        assert token_core_frequency(h, rho).tolist() == spec.frequency(h, rho), (h, rho)


def test_token_without_positive_activation_contributes_nothing():
    assert token_core_frequency(torch.zeros(3, 4) - 1, 0.2).tolist() == [0, 0, 0, 0]


def test_core_neurons_top_beta_with_ties():
    f = torch.tensor([1, 1, 2, 0, 0])
    assert core_neurons(f, 0.4).tolist() == [0, 2]  # ceil(0.4 * 5) = 2: the 2, then the lower-index 1
    assert core_neurons(torch.zeros(5, dtype=torch.long), 0.4).tolist() == [0, 1]  # all equal: lowest indices
    assert core_neurons(f, 1.0).tolist() == [0, 1, 2, 3, 4]


def test_knee_by_hand():
    # chord from (0, 10) to (6, 0); the point (3, 2) is farthest from it.
    assert knee_index(torch.tensor([10, 9, 8, 2, 1, 1, 0])) == 3
    assert knee_keep(torch.tensor([2, 10, 0, 9, 1, 8, 1])).tolist() == [0, 1, 3, 5]  # scores >= tau = 2


def test_knee_keeps_scores_at_the_threshold_not_only_above():
    """The released code keeps scores strictly above tau; the specification keeps score >= tau. They differ
    whenever the knee point has ties, and at a plateau of tied top scores ">" would keep nothing at all."""
    scores = torch.tensor([5, 0, 5, 1, 5, 0])  # sorted [5, 5, 5, 1, 0, 0]: j* = 2, tau = 5
    assert knee_keep(scores).tolist() == [0, 2, 4]
    assert (scores > 5).sum() == 0  # what keeping strictly above would leave
    scores = torch.tensor([9, 7, 4, 4, 1, 0])  # chord (0, 9)-(5, 0): |5 (y - 9) + 9 j| is largest at j = 2, tau = 4
    assert knee_index(torch.sort(scores, descending=True).values) == 2
    assert knee_keep(scores).tolist() == [0, 1, 2, 3]  # both 4s; strictly above would keep [0, 1]


def test_knee_edge_cases():
    assert knee_keep(torch.tensor([4, 4, 4, 4])).tolist() == [0, 1, 2, 3]  # all equal: keep every token
    assert knee_keep(torch.tensor([7])).tolist() == [0]  # a single image token is kept
    assert knee_keep(torch.tensor([], dtype=torch.long)).tolist() == []
    assert knee_keep(torch.tensor([0, 0, 0])).tolist() == [0, 1, 2]


def test_match_scores_count_core_intersection():
    positive = torch.tensor([[True, False, True, True], [False, False, False, False], [True, True, True, True]])
    assert match_scores(positive.float() * 2 - 1, torch.tensor([0, 2])).tolist() == [2, 0, 2]


def test_mass_budget():
    mass = torch.tensor([1.0, 5, 3, 1])
    assert mass_budget_neurons(mass, 0.8).tolist() == [1, 2]  # 5 + 3 = 8 of 10
    assert mass_budget_neurons(mass, 0.81).tolist() == [0, 1, 2]
    assert mass_budget_neurons(mass, 1.0).tolist() == [0, 1, 2, 3]
    assert mass_budget_neurons(torch.zeros(4), 0.9).tolist() == [0]


def _stats(h: torch.Tensor, image_rows=None) -> LayerActivationStats:
    stats = LayerActivationStats(0.5, image_rows)
    stats(h[None])
    return stats


def test_decode_neurons_rules():
    h = torch.tensor([[3.0, -1, 2, 0.5, 1, 0.1], [1, 2, 3, 0.2, -1, 0.1]])
    stats = _stats(h)
    beta = SparsitySettings(neurons=NeuronBudget("beta", 0.5))
    assert decode_neurons(stats, beta, 0, 6).tolist() == core_neurons(stats.frequency, 0.5).tolist()
    assert decode_neurons(stats, SparsitySettings(dense_layers=(0,), neurons=NeuronBudget("beta", 0.5)), 0, 6) is None
    # mass: |h| summed = [4, 3, 5, .7, 2, .2]; 0.8 of 14.9 = 11.92 needs 5 + 4 + 3 (3 of 6 neurons)
    assert decode_neurons(stats, SparsitySettings(neurons=NeuronBudget("mass", 0.8)), 0, 6).tolist() == [0, 1, 2]
    # 0.85 needs a fourth (the 2 of neuron 4): 4 of 6
    assert decode_neurons(stats, SparsitySettings(neurons=NeuronBudget("mass", 0.85)), 0, 6).tolist() == [0, 1, 2, 4]
    # the same budget with dense_above 0.4: 3 of 6 is more than that, so the layer stays dense
    assert decode_neurons(stats, SparsitySettings(neurons=NeuronBudget("mass", 0.8), dense_above=0.4), 0, 6) is None
    assert decode_neurons(stats, SparsitySettings(mode="dense"), 0, 6) is None


def test_token_selection_modes():
    # 6 image tokens (rows 1..6) and two text rows; F = 4.
    h = torch.tensor(
        [[1.0, 1, 1, 1], [2, 2, 2, -1], [1, 1, -1, -1], [3, -1, -1, -1], [-1, -1, -1, -1], [2, 2, 2, 2], [1, 1, 1, -1], [1, 2, 3, 4]]
    )
    image_rows = torch.arange(1, 7)
    stats = _stats(h, image_rows)
    knee = select_image_tokens(SparsitySettings(beta=1.0), stats)
    assert knee.core_scores.tolist() == [3, 2, 1, 0, 4, 3]
    # sorted [4, 3, 3, 2, 1, 0], chord (0, 4)-(5, 0): the farthest point is j* = 2, tau = 3
    assert knee.keep.tolist() == [0, 4, 5]
    assert knee.knee_threshold == 3
    assert select_image_tokens(SparsitySettings(beta=1.0, tokens=TokenRule("count", 2)), stats).keep.tolist() == [0, 4]
    assert select_image_tokens(SparsitySettings(beta=1.0, tokens=TokenRule("ratio", 0.5)), stats).keep.tolist() == [0, 4, 5]
    assert select_image_tokens(SparsitySettings(tokens=TokenRule("all")), stats).keep.tolist() == list(range(6))
    fastv = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.0, 0.05])
    chosen = select_image_tokens(SparsitySettings(beta=1.0, token_rank="fastv"), stats, fastv)
    assert chosen.keep.tolist() == sorted(torch.topk(fastv, knee.keep.numel()).indices.tolist())


def test_random_baseline_is_seeded_and_uniform():
    h = torch.tensor([[1.0, 1, 1, 1], [2, 2, 2, -1], [1, 1, -1, -1], [3, -1, -1, -1], [-1, -1, -1, -1], [2, 2, 2, 2],
                      [1, 1, 1, -1], [1, 2, 3, 4]])
    stats = _stats(h, torch.arange(1, 7))

    def pick(seed):
        rule = SparsitySettings(token_rank="random", tokens=TokenRule("count", 3), seed=seed)
        return select_image_tokens(rule, stats).keep.tolist()

    assert pick(1) == pick(1) and len(pick(1)) == 3
    picks = [pick(seed) for seed in range(600)]
    assert len({tuple(p) for p in picks}) > 15  # 20 subsets of 3 of 6 exist; seeds reach nearly all
    # Each token is in half the subsets (binomial, 600 draws: sd 12); the core scores play no part.
    counts = [sum(i in p for p in picks) for i in range(6)]
    assert all(240 <= c <= 360 for c in counts), counts


def test_sliced_ffn_equals_dense_ffn_with_other_neurons_zeroed():
    gen = torch.Generator().manual_seed(0)
    d, f = 8, 24
    w = LayerWeights(
        input_norm=torch.ones(d), q=torch.eye(d), k=torch.eye(d), v=torch.eye(d), o=torch.eye(d),
        post_norm=torch.ones(d), gate=torch.randn(f, d, generator=gen), up=torch.randn(f, d, generator=gen),
        down=torch.randn(d, f, generator=gen),
    )
    x = torch.randn(1, 5, d, generator=gen)
    neurons = torch.tensor([1, 4, 5, 9, 17, 23])
    mask = torch.zeros(f)
    mask[neurons] = 1
    act = activation("silu")
    masked = torch.nn.functional.linear(act(x @ w.gate.T) * (x @ w.up.T) * mask, w.down)
    torch.testing.assert_close(feed_forward(x, w.with_ffn_neurons(neurons), act), masked, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(feed_forward(x, w.with_ffn_neurons(torch.arange(f)), act), feed_forward(x, w, act), rtol=0, atol=0)


@pytest.mark.parametrize(
    "text, rule", [("knee", TokenRule("knee")), ("all", TokenRule("all")), ("count:64", TokenRule("count", 64)), ("ratio:0.25", TokenRule("ratio", 0.25))]
)
def test_token_rule_spellings(text, rule):
    assert TokenRule.parse(text) == rule and str(rule) == text


@pytest.mark.parametrize("bad", ["kne", "count:0", "count:x", "ratio:1.5", "all:3"])
def test_bad_token_rules_are_refused(bad):
    with pytest.raises(EdgecmError, match="--tokens"):
        TokenRule.parse(bad)


def test_neuron_budget_spellings():
    assert NeuronBudget.parse("mass:0.95") == NeuronBudget("mass", 0.95)
    assert NeuronBudget.parse("beta:0.4") == NeuronBudget("beta", 0.4) and str(NeuronBudget("beta", 0.4)) == "beta:0.4"
    assert str(NeuronBudget.parse("dense")) == "dense"
    for bad in ("mass:2", "beta", "dense:1", "mass:x"):
        with pytest.raises(EdgecmError, match="--neurons"):
            NeuronBudget.parse(bad)
