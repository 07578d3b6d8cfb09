"""SparseVLM as a ranking in the pipeline: its rules on hand-made inputs, then inside the engine."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edgecm import sparsevlm
from edgecm.checkpoint import open_checkpoint
from edgecm.corematching import head_mean_attention
from edgecm.kv_cache import KVCache
from edgecm.model import rms_norm
from edgecm.prompt import PromptBuilder
from edgecm.rope import apply_rotary
from edgecm.sparsity import NeuronBudget, SparsitySettings, TokenRule
from edgecm.vision import load_image
from reference import masked_reference
from runtime.batch import generate_batch
from runtime.engine import Engine, GenerationSettings

MASKED_REFERENCE_ATOL = 1e-4  # float32 round-off of masked against compacted attention
NEW_TOKENS = 8
# Shares of the published budgets (192, 128 and 64 of LLaVA's 576 tokens) on the tiny model's 16.
BUDGET_SHARES = {192: 192 / 576, 128: 128 / 576, 64: 64 / 576}


# -- the rules, by hand ------------------------------------------------------------------------------


def test_stage_layers_scale_the_published_layers_by_depth():
    assert sparsevlm.stage_layers(32) == (2, 6, 15)  # LLaVA-1.5-7B: the released code's layers
    assert sparsevlm.stage_layers(30) == (2, 6, 14)  # SmolLM2 (the demo): 1.875, 5.625, 14.06 rounded
    assert sparsevlm.stage_layers(28) == (2, 5, 13)  # Qwen2.5-VL-7B
    assert sparsevlm.stage_layers(3) == (0, 1)  # 0.19, 0.56 and 1.41: two of them coincide


def test_stage_layers_from_a_given_k_keep_their_distances():
    assert sparsevlm.stage_layers(32, first_k=3) == (2, 6, 15)  # K = 3 is where the published stages start
    assert sparsevlm.stage_layers(30, first_k=18) == (17, 21, 29)  # 2, 6, 14 moved by 15, the last one capped
    assert sparsevlm.stage_layers(30, first_k=28) == (27, 29)


def test_raters_are_the_text_tokens_above_the_mean_relevance():
    visual = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 2.0], [1.5, 0.0]])
    # V T^T = [2, 0, 0, 1.5] for both visual tokens; softmax: e^2, 1, 1, e^1.5 over 13.87 = .53, .07, .07, .32
    assert sparsevlm.select_raters(visual, text).tolist() == [0, 3]
    assert sparsevlm.select_raters(visual, torch.zeros(3, 2)).tolist() == [0, 1, 2]  # all equal: every one


def test_rater_attention_is_causal_and_averaged_over_heads():
    keys = torch.tensor([[[0.0], [1.0], [2.0]]])  # one KV head, D = 1
    queries = torch.tensor([[[0.0], [math.log(2)]]])  # rater 0 sees keys 0..1, rater 1 sees 0..2
    visible = torch.tensor([[True, True, False], [True, True, True]])
    got = head_mean_attention(queries, keys, 1, visible)
    torch.testing.assert_close(got, torch.tensor([[0.5, 0.5, 0.0], [1 / 7, 2 / 7, 4 / 7]]))
    two_heads = head_mean_attention(torch.cat([queries, queries * 0]), keys, 2, visible)
    torch.testing.assert_close(two_heads[1], torch.tensor([(1 / 7 + 1 / 3) / 2, (2 / 7 + 1 / 3) / 2, (4 / 7 + 1 / 3) / 2]))


def test_rank_rule():
    relation = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 1], [1, 1, 0, 2]])  # row 3 = row 1 + row 2: rank 2
    assert sparsevlm.rank_target(relation, 576) == 27  # 2 x 13.5
    assert sparsevlm.rank_target(relation, 196) == 9  # 2 x 13.5 x 196 / 576 = 9.19
    assert sparsevlm.rank_target(relation, 576, scale=0.8) == 1


def test_recycling_counts():
    assert sparsevlm.recycled_count(0) == 0
    assert sparsevlm.recycled_count(5) == 1  # 30 % + 1 = 2 recycled, one cluster
    assert sparsevlm.recycled_count(100) == 4  # 31 recycled, 3 + 1 clusters
    assert sparsevlm.recycle_candidates(100) == 31
    # 64 of 196: keep 59; the 137 dropped give 42 recycled in 5 clusters; 59 + 5 = 64
    assert sparsevlm.split_budget(64, 196, recycle=True) == (59, 5)
    assert sparsevlm.split_budget(64, 196, recycle=False) == (64, 0)
    assert sparsevlm.split_budget(200, 196, recycle=True) == (196, 0)
    assert sparsevlm.split_budget(1, 196, recycle=True) == (1, 0)  # no room for an aggregate


def test_cluster_and_merge_finds_the_groups_and_averages_them():
    square = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1]])
    x = torch.cat([square, square + torch.tensor([5.0, 5.0]), square + torch.tensor([10.0, 0.0])])
    merged, centres, assignment = sparsevlm.cluster_and_merge(x, 3)
    # Equal densities: the lower index is the denser, so each group's first point is its centre.
    assert sorted(centres.tolist()) == [0, 4, 8]
    groups = [assignment[i * 4 : (i + 1) * 4].unique().tolist() for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len({g[0] for g in groups}) == 3
    means = {tuple(round(v, 4) for v in row) for row in merged.tolist()}
    assert means == {(0.05, 0.05), (5.05, 5.05), (10.05, 0.05)}


# -- inside the engine ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(build_llava, image_path):
    model_dir, _ = build_llava(gqa=True, tied=False, layout="v5", sharded=False, chat_template=True)
    checkpoint = open_checkpoint(model_dir)
    prompt = PromptBuilder(checkpoint).build("Describe the picture in one sentence.", load_image(image_path))
    return Engine(checkpoint, dtype="float32", resident=True), prompt


def run(engine, prompt, sparsity):
    return engine.generate(prompt, GenerationSettings(max_new_tokens=NEW_TOKENS, stop_at_eos=False), sparsity=sparsity,
                           collect_logits=True)


def sparse(**kwargs) -> SparsitySettings:
    kwargs.setdefault("neurons", NeuronBudget("dense"))
    return SparsitySettings(token_rank="sparsevlm", **kwargs)


@pytest.mark.parametrize("published", list(BUDGET_SHARES))
@pytest.mark.parametrize("recycle", [True, False])
def test_kept_tokens_equal_the_budget(setup, published, recycle):
    engine, prompt = setup
    n_image = prompt.image_positions.numel()
    budget = math.ceil(BUDGET_SHARES[published] * n_image)  # 6, 4 and 2 of 16
    result = run(engine, prompt, sparse(tokens=TokenRule("ratio", BUDGET_SHARES[published]), recycle=recycle))
    assert result.kept_image_tokens == budget
    assert result.selection.stage_tokens[-1] == budget
    text_tokens = prompt.num_tokens - n_image
    # Core-token-only cache: every layer holds the final tokens alone, but an aggregate token exists only in
    # the layers after the stage that made it.
    final = text_tokens + budget + NEW_TOKENS - 1
    assert result.kv_cache_tokens[-1] == final
    assert all(final - result.selection.recycled <= n <= final for n in result.kv_cache_tokens)
    count = run(engine, prompt, sparse(tokens=TokenRule("count", budget), recycle=recycle))
    assert count.token_ids == result.token_ids and count.kept_image_tokens == budget
    if not recycle:
        assert result.selection.recycled == 0 and set(result.kv_cache_tokens) == {final}


def first_stage_relation(engine, prompt) -> torch.Tensor:
    """P of the first stage recomputed from the weights: raters from the embeddings, attention of layer 0."""
    text = engine.text
    image = prompt.image_positions
    with torch.inference_mode():
        hidden = engine.embed(prompt)[0]
        after = torch.arange(int(image.max()) + 1, prompt.num_tokens)
        relevance = (hidden[image] @ hidden[after].T).softmax(-1).mean(0)
        raters = after[relevance > relevance.mean()]
        w = engine.streamer.load(0)
        positions = engine.family.positions(engine.config, prompt, engine.device)
        cos, sin = engine.rotary.cos_sin(positions, engine.dtype)
        x = rms_norm(hidden[None], w.input_norm, text.rms_norm_eps)
        q = F.linear(x, w.q).view(1, -1, text.num_heads, text.head_dim).transpose(1, 2)
        keys = F.linear(x, w.k).view(1, -1, text.num_kv_heads, text.head_dim).transpose(1, 2)
        q, keys = apply_rotary(q, cos, sin), apply_rotary(keys, cos, sin)
        keys = keys.repeat_interleave(text.num_heads // text.num_kv_heads, dim=1)[0]
        logits = q[0][:, raters] @ keys.transpose(1, 2) / text.head_dim ** 0.5  # (H, R, T)
        causal = torch.arange(prompt.num_tokens)[None, :] <= raters[:, None]
        attention = logits.masked_fill(~causal, float("-inf")).softmax(-1).mean(0)  # (R, T)
    return attention[:, image]


def test_stage_one_keeps_the_raters_most_attended_tokens(setup):
    engine, prompt = setup
    budget = 5
    result = run(engine, prompt, sparse(tokens=TokenRule("count", budget), recycle=False))
    scores = first_stage_relation(engine, prompt).mean(0)
    first = set(torch.sort(scores, descending=True, stable=True).indices[:budget].tolist())
    assert result.selection.stage_layers[0] == 0
    assert set(range(prompt.image_positions.numel())) - set(result.selection.stage_dropped[0].tolist()) == first


def test_adaptive_count_is_the_rank_rule(setup):
    engine, prompt = setup
    scale = 300.0
    result = run(engine, prompt, sparse(tokens=TokenRule("knee"), recycle=False, rank_scale=scale))
    rank = int(torch.linalg.matrix_rank(first_stage_relation(engine, prompt)))
    n_image = prompt.image_positions.numel()
    assert 1 < rank < n_image
    assert result.selection.stage_tokens[0] == max(1, min(int(rank * scale * n_image / 576), n_image - 1))


@pytest.mark.parametrize("keep_early_kv", [False, True])
def test_pruned_forward_without_recycling_equals_masked_dense(setup, keep_early_kv):
    engine, prompt = setup
    # A large rank scale makes the first stage keep more than the last: two real stages on 16 tokens.
    settings = sparse(tokens=TokenRule("knee"), recycle=False, rank_scale=300.0, keep_early_kv=keep_early_kv)
    result = run(engine, prompt, settings)
    tokens = result.selection.stage_tokens
    assert len(tokens) == 2 and prompt.image_positions.numel() > tokens[0] > tokens[1] > 0, tokens
    stages = [(layer + 1, prompt.image_positions[dropped])
              for layer, dropped in zip(result.selection.stage_layers, result.selection.stage_dropped)]
    with torch.inference_mode():
        masked = masked_reference(engine, prompt, result.token_ids, None, 0, keep_early_kv, stages=stages)
    err = (result.logits - masked).abs()
    assert err.max().item() <= MASKED_REFERENCE_ATOL, f"max {err.max().item():.3e} mean {err.mean().item():.3e}"
    dense = run(engine, prompt, SparsitySettings(mode="dense"))
    assert (dense.logits - masked).abs().max().item() > 100 * MASKED_REFERENCE_ATOL
    full, after_first = prompt.num_tokens, prompt.num_tokens - prompt.image_positions.numel() + tokens[0]
    final = prompt.num_tokens - prompt.image_positions.numel() + tokens[1]
    expected = [full, after_first, final] if keep_early_kv else [final] * 3
    assert result.kv_cache_tokens == [n + NEW_TOKENS - 1 for n in expected]


def test_recycled_tokens_take_their_centres_place(setup):
    """An aggregate token has a dropped token's rotary position and sequence index; no survivor moves."""
    engine, prompt = setup
    settings = sparse(tokens=TokenRule("count", 6))
    cache = KVCache(engine.text.num_layers)
    engine.last_plan = engine.plan_for(prompt.num_tokens, 16, 1, settings)
    with torch.inference_mode():
        outcome = engine.prefill(engine.embed(prompt), prompt, settings, cache)
    selection = outcome.selection
    assert selection.recycled >= 1 and outcome.kept_image_tokens == 6
    original = engine.family.positions(engine.config, prompt, engine.device)
    order = outcome.kept_order
    assert torch.equal(order, order.sort().values)  # rows in sequence order
    assert torch.equal(outcome.kept_positions, original[order])  # every row's rotary id is its index's
    survivors = set(prompt.image_positions[selection.keep].tolist())
    image = set(prompt.image_positions.tolist())
    centres = [i for i in order.tolist() if i in image and i not in survivors]
    assert len(centres) == selection.recycled  # the aggregates sit at dropped tokens' indices
    last = cache.order(engine.text.num_layers - 1)[0].tolist()
    assert last == order.tolist()
    first = set(cache.order(0)[0].tolist())  # layer 0 ran before any aggregate existed
    assert not first & set(centres) and survivors <= first


def test_sparsevlm_k_moves_the_first_stage(setup):
    engine, prompt = setup
    result = run(engine, prompt, sparse(tokens=TokenRule("count", 4), sparsevlm_k=2))
    assert result.selection.stage_layers == (1, 2)  # (0, 1) on three layers, moved by one, capped at the last
    assert result.kept_image_tokens == 4


def test_sparsevlm_with_sparse_decode(setup):
    engine, prompt = setup
    result = run(engine, prompt, sparse(tokens=TokenRule("count", 4), neurons=NeuronBudget("beta", 0.4)))
    assert result.kept_image_tokens == 4
    assert result.core_neurons == [64] * engine.text.num_layers


def test_batched_sparsevlm_equals_single_runs(setup, build_llava, image_path):
    engine, prompt = setup
    builder = PromptBuilder(engine.checkpoint)
    prompts = [prompt, builder.build("How many shapes?", load_image(image_path)), builder.build("Say hello.")]
    settings = sparse(tokens=TokenRule("count", 6))
    generation = GenerationSettings(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    together = generate_batch(engine, prompts, generation, sparsity=settings, collect_logits=True)
    for p, batched in zip(prompts, together):
        alone = engine.generate(p, generation, sparsity=settings, collect_logits=True)
        assert batched.token_ids == alone.token_ids
        assert batched.kept_image_tokens == alone.kept_image_tokens
        assert (batched.logits - alone.logits).abs().max().item() <= MASKED_REFERENCE_ATOL


def test_qwen2_5_vl_image_at_a_budget(build_qwen2_5_vl, image_path):
    model_dir, _ = build_qwen2_5_vl()
    checkpoint = open_checkpoint(model_dir)
    prompt = PromptBuilder(checkpoint).build("What is in the picture?", load_image(image_path))
    engine = Engine(checkpoint, dtype="float32", resident=True)
    n_image = prompt.image_positions.numel()
    result = run(engine, prompt, sparse(tokens=TokenRule("count", n_image // 3)))
    assert result.kept_image_tokens == n_image // 3
    text_tokens = prompt.num_tokens - n_image
    assert result.kv_cache_tokens[-1] == text_tokens + n_image // 3 + NEW_TOKENS - 1
    # Without recycling the pruned forward (3-D rotary ids kept) equals the masked dense one.
    plain = run(engine, prompt, sparse(tokens=TokenRule("knee"), recycle=False, rank_scale=300.0))
    stages = [(layer + 1, prompt.image_positions[dropped])
              for layer, dropped in zip(plain.selection.stage_layers, plain.selection.stage_dropped)]
    assert sum(d.numel() for _, d in stages) > 0
    with torch.inference_mode():
        masked = masked_reference(engine, prompt, plain.token_ids, None, 0, stages=stages)
    assert (plain.logits - masked).abs().max().item() <= MASKED_REFERENCE_ATOL
