"""CoreMatching inside the engine, against exact dense references."""

from __future__ import annotations

import pytest
import torch

from edgecm.checkpoint import open_checkpoint
from edgecm.prompt import PromptBuilder
from edgecm.sparsity import NeuronBudget, SparsitySettings, TokenRule
from edgecm.vision import load_image
from reference import masked_reference
from runtime.engine import Engine, GenerationSettings

TINY = dict(gqa=True, tied=False, layout="v5", sharded=False, chat_template=True)
NEW_TOKENS = 12
# Masked full attention and compacted attention sum the same terms in a
# different order (masked keys add exact zeros); float32 round-off only.
MASKED_REFERENCE_ATOL = 1e-4


@pytest.fixture(scope="module")
def setup(build_llava, image_path):
    model_dir, _ = build_llava(**TINY)
    checkpoint = open_checkpoint(model_dir)
    prompt = PromptBuilder(checkpoint).build("Describe the picture in one sentence.", load_image(image_path))
    return Engine(checkpoint, resident=True), prompt


def run(engine, prompt, sparsity, **kwargs):
    return engine.generate(
        prompt, GenerationSettings(max_new_tokens=NEW_TOKENS, stop_at_eos=False), sparsity=sparsity, collect_logits=True, **kwargs
    )


def test_no_token_pruning_and_beta_one_equals_dense(setup):
    engine, prompt = setup
    dense = run(engine, prompt, SparsitySettings(mode="dense"))
    identity = run(engine, prompt, SparsitySettings(tokens=TokenRule("all"), neurons=NeuronBudget("beta", 1.0)))
    assert identity.token_ids == dense.token_ids
    assert torch.equal(identity.logits, dense.logits)
    assert identity.core_neurons == [engine.text.intermediate_size] * engine.text.num_layers


def test_neuron_sparsity_leaves_prefill_dense_and_slices_decode(setup):
    engine, prompt = setup
    dense = run(engine, prompt, SparsitySettings(mode="dense"))
    sparse = run(
        engine, prompt, SparsitySettings(tokens=TokenRule("all"), neurons=NeuronBudget("beta", 0.4), dense_layers=(1,))
    )
    assert torch.equal(sparse.logits[0], dense.logits[0])  # prefill runs every neuron
    width = engine.text.intermediate_size
    assert sparse.core_neurons == [64, width, 64]  # ceil(0.4 * 160) = 64; layer 1 kept dense
    assert not torch.equal(sparse.logits[1:], dense.logits[1:])  # decode did use the slices


@pytest.mark.parametrize("keep_early_kv", [False, True])
def test_compacted_engine_equals_masked_dense_forward(setup, keep_early_kv):
    engine, prompt = setup
    k = 1
    settings = SparsitySettings(prune_layer=k, neurons=NeuronBudget("dense"), keep_early_kv=keep_early_kv)
    result = run(engine, prompt, settings)
    n_image = prompt.image_positions.numel()
    assert 0 < result.kept_image_tokens < n_image  # the knee really dropped tokens
    dropped_image = torch.ones(n_image, dtype=torch.bool)
    dropped_image[result.selection.keep] = False
    dropped_rows = prompt.image_positions[dropped_image]
    with torch.inference_mode():
        reference = masked_reference(engine, prompt, result.token_ids, dropped_rows, k, keep_early_kv)
    err = (result.logits - reference).abs()
    assert err.max().item() <= MASKED_REFERENCE_ATOL, f"max {err.max().item():.3e} mean {err.mean().item():.3e}"
    # and the pruning changed the answer's logits: the reference is not trivially the dense model
    dense = run(engine, prompt, SparsitySettings(mode="dense"))
    assert (dense.logits - reference).abs().max().item() > 100 * MASKED_REFERENCE_ATOL

    text_tokens = prompt.num_tokens - n_image
    compact = text_tokens + result.kept_image_tokens + NEW_TOKENS - 1  # the last token is never fed back
    full = prompt.num_tokens + NEW_TOKENS - 1
    expected = [full if keep_early_kv and layer <= k else compact for layer in range(engine.text.num_layers)]
    assert result.kv_cache_tokens == expected


@pytest.mark.parametrize(
    "tokens, rank",
    [("knee", "core"), ("count:5", "core"), ("ratio:0.5", "core"), ("all", "core"),
     ("knee", "fastv"), ("ratio:0.25", "fastv"), ("knee", "random"), ("count:3", "random")],
)
def test_every_token_mode_completes(setup, tokens, rank):
    engine, prompt = setup
    settings = SparsitySettings(tokens=TokenRule.parse(tokens), token_rank=rank)
    result = run(engine, prompt, settings)
    n_image = prompt.image_positions.numel()
    expected_kept = {"count:5": 5, "ratio:0.5": 8, "all": n_image, "ratio:0.25": 4, "count:3": 3}.get(tokens)
    if expected_kept is not None:
        assert result.kept_image_tokens == expected_kept
    if tokens == "knee" and rank != "core":  # baselines keep exactly as many as the knee
        knee = run(engine, prompt, SparsitySettings())
        assert result.kept_image_tokens == knee.kept_image_tokens
    text_tokens = prompt.num_tokens - n_image
    assert set(result.kv_cache_tokens) == {text_tokens + result.kept_image_tokens + NEW_TOKENS - 1}
    assert len(result.token_ids) == NEW_TOKENS


def test_text_only_prompt_prunes_no_tokens(setup):
    engine, _ = setup
    prompt = PromptBuilder(engine.checkpoint).build("Count the objects.")
    result = run(engine, prompt, SparsitySettings())
    assert result.image_tokens == 0 and result.kept_image_tokens == 0
    assert set(result.kv_cache_tokens) == {prompt.num_tokens + NEW_TOKENS - 1}
