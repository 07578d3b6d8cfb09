"""CoreMatching inside the engine, against references that do not use the engine's own choices.

The core set, the kept tokens and the decode slices are recomputed from the
specification's wording (tests/spec.py) over activations read from the
transformers model (or, after pruning, from a masked dense forward), so a
selection at the wrong layer, f(n) counted over the wrong tokens, or slices
cut from the wrong neurons all fail here.
"""

from __future__ import annotations

import pytest
import torch

import spec
import torch.nn.functional as F
from edgecm.kv_cache import KVCache
from edgecm.model import decoder_layer, rms_norm
from edgecm.rope import apply_rotary
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
    model_dir, reference = build_llava(**TINY)
    checkpoint = open_checkpoint(model_dir)
    prompt = PromptBuilder(checkpoint).build("Describe the picture in one sentence.", load_image(image_path))
    return Engine(checkpoint, dtype="float32", resident=True), prompt, reference


def run(engine, prompt, sparsity, **kwargs):
    return engine.generate(
        prompt, GenerationSettings(max_new_tokens=NEW_TOKENS, stop_at_eos=False), sparsity=sparsity, collect_logits=True, **kwargs
    )


def transformers_ffn_activations(reference, prompt) -> list[torch.Tensor]:
    """Every layer's down_proj input (T, F) in the transformers model's own forward over the prompt."""
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for name, module in reference.named_modules():
        parts = name.split(".")
        if parts[-2:] == ["mlp", "down_proj"] and "layers" in parts and "vision" not in name:
            layer = int(parts[parts.index("layers") + 1])
            hooks.append(module.register_forward_pre_hook(
                lambda _m, args, layer=layer: captured.__setitem__(layer, args[0][0].detach().clone())))
    try:
        with torch.no_grad():
            reference(input_ids=prompt.input_ids, pixel_values=prompt.pixel_values)
    finally:
        for hook in hooks:
            hook.remove()
    return [captured[layer] for layer in sorted(captured)]


def assert_close(ours, theirs, atol=MASKED_REFERENCE_ATOL):
    err = (ours - theirs).abs()
    assert err.max().item() <= atol, f"max {err.max().item():.3e} mean {err.mean().item():.3e}"


def test_no_token_pruning_and_beta_one_equals_dense(setup):
    engine, prompt, _ = setup
    dense = run(engine, prompt, SparsitySettings(mode="dense"))
    identity = run(engine, prompt, SparsitySettings(tokens=TokenRule("all"), neurons=NeuronBudget("beta", 1.0)))
    assert identity.token_ids == dense.token_ids
    assert torch.equal(identity.logits, dense.logits)
    assert identity.core_neurons == [engine.text.intermediate_size] * engine.text.num_layers


def test_decode_slices_are_the_spec_core_sets_and_decode_equals_masked_ffn(setup):
    engine, prompt, reference = setup
    settings = SparsitySettings(tokens=TokenRule("all"), neurons=NeuronBudget("beta", 0.4), dense_layers=(1,))
    sparse = run(engine, prompt, settings)
    activations = transformers_ffn_activations(reference, prompt)
    expected = [None if layer == 1 else spec.core(spec.frequency(h, settings.rho), 0.4)
                for layer, h in enumerate(activations)]
    assert [None if n is None else n.tolist() for n in sparse.decode_neurons] == expected
    width = engine.text.intermediate_size
    assert sparse.core_neurons == [64, width, 64]  # ceil(0.4 * 160) = 64; layer 1 kept dense
    with torch.inference_mode():
        masked = masked_reference(engine, prompt, sparse.token_ids, torch.zeros(0, dtype=torch.long), 1,
                                  ffn_neurons=[None if n is None else torch.tensor(n) for n in expected])
    assert_close(sparse.logits, masked)
    dense = run(engine, prompt, SparsitySettings(mode="dense"))
    assert torch.equal(sparse.logits[0], dense.logits[0])  # prefill runs every neuron
    assert (sparse.logits[1:] - dense.logits[1:]).abs().max() > 100 * MASKED_REFERENCE_ATOL  # slices matter here


@pytest.mark.parametrize("k", [1, 2])
def test_core_tokens_are_chosen_from_layer_k_minus_1_by_the_spec(setup, k):
    engine, prompt, reference = setup
    settings = SparsitySettings(prune_layer=k, neurons=NeuronBudget("dense"))
    result = run(engine, prompt, settings)
    activations = transformers_ffn_activations(reference, prompt)
    image = prompt.image_positions
    kept, scores = spec.core_tokens(activations[k - 1], image, settings.rho, settings.beta)
    assert result.selection.core_scores.tolist() == scores
    assert result.selection.keep.tolist() == kept
    # The neighbouring layers choose differently on this prompt, so an off-by-one selection fails above.
    for other in {k - 2, k} - {-1, engine.text.num_layers}:
        assert spec.core_tokens(activations[other], image, settings.rho, settings.beta)[1] != scores


def test_the_reference_token_is_the_first_of_the_assistant_header(setup):
    engine, prompt, _ = setup
    builder = PromptBuilder(engine.checkpoint)
    tail = builder.tokenizer.decode(prompt.input_ids[0, prompt.reference_index:].tolist(), skip_special_tokens=False)
    after = builder.tokenizer.decode(prompt.input_ids[0, prompt.reference_index + 1:].tolist(), skip_special_tokens=False)
    assert tail.strip() == "ASSISTANT:" and "ASSISTANT:" not in after
    assert prompt.reference_index < prompt.num_tokens - 1  # a header of several tokens, not the last one


@pytest.mark.parametrize("k, tokens", [(1, "knee"), (2, "count:5")])
def test_core_ref_ranks_by_overlap_with_the_reference_token(setup, k, tokens):
    """The released code's criterion: |G(i) intersect G(r)| at layer K-1, r the header's first token."""
    engine, prompt, reference = setup
    settings = SparsitySettings(prune_layer=k, token_rank="core-ref", tokens=TokenRule.parse(tokens),
                                neurons=NeuronBudget("dense"))
    result = run(engine, prompt, settings)
    h = transformers_ffn_activations(reference, prompt)[k - 1]
    scores = spec.reference_scores(h[prompt.image_positions], h[prompt.reference_index])
    assert result.selection.core_scores.tolist() == scores
    if tokens == "knee":
        assert result.selection.keep.tolist() == spec.knee_keep(scores)
    else:  # the five largest, ties to the lower index
        assert result.selection.keep.tolist() == sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:5])
    # another reference token (the last one) scores differently: the reference is really read
    assert spec.reference_scores(h[prompt.image_positions], h[-1]) != scores
    # and it is not the sentence-wise core set's ranking
    _, core_scores = spec.core_tokens(h, prompt.image_positions, settings.rho, settings.beta)
    assert core_scores != scores


@pytest.mark.parametrize("keep_early_kv", [False, True])
def test_compacted_engine_equals_masked_dense_forward(setup, keep_early_kv):
    engine, prompt, reference = setup
    k = 1
    settings = SparsitySettings(prune_layer=k, neurons=NeuronBudget("dense"), keep_early_kv=keep_early_kv)
    result = run(engine, prompt, settings)
    n_image = prompt.image_positions.numel()
    kept, _ = spec.core_tokens(transformers_ffn_activations(reference, prompt)[k - 1], prompt.image_positions,
                               settings.rho, settings.beta)
    assert 0 < len(kept) < n_image  # the knee really dropped tokens
    assert result.selection.keep.tolist() == kept
    dropped = torch.ones(n_image, dtype=torch.bool)
    dropped[kept] = False
    with torch.inference_mode():
        masked = masked_reference(engine, prompt, result.token_ids, prompt.image_positions[dropped], k, keep_early_kv)
    assert_close(result.logits, masked)
    # and the pruning changed the answer's logits: the reference is not trivially the dense model
    dense = run(engine, prompt, SparsitySettings(mode="dense"))
    assert (dense.logits - masked).abs().max().item() > 100 * MASKED_REFERENCE_ATOL

    text_tokens = prompt.num_tokens - n_image
    compact = text_tokens + len(kept) + NEW_TOKENS - 1  # the last token is never fed back
    full = prompt.num_tokens + NEW_TOKENS - 1
    # Layers 0..K-1 saw every token; only they can hold the dropped ones' entries.
    expected = [full if keep_early_kv and layer < k else compact for layer in range(engine.text.num_layers)]
    assert result.kv_cache_tokens == expected


def test_pruned_sparse_decode_counts_f_over_the_kept_tokens_only(setup):
    """After layer K, f(n) is counted over text + kept tokens: the dropped ones are no longer there."""
    engine, prompt, reference = setup
    k = 1
    settings = SparsitySettings(prune_layer=k, neurons=NeuronBudget("beta", 0.4))
    result = run(engine, prompt, settings)
    n_image = prompt.image_positions.numel()
    kept, _ = spec.core_tokens(transformers_ffn_activations(reference, prompt)[k - 1], prompt.image_positions,
                               settings.rho, settings.beta)
    dropped = torch.ones(n_image, dtype=torch.bool)
    dropped[kept] = False
    dropped_rows = prompt.image_positions[dropped]
    captured: list[torch.Tensor] = []
    with torch.inference_mode():
        masked_reference(engine, prompt, result.token_ids, dropped_rows, k, capture=captured)
    present = torch.ones(prompt.num_tokens, dtype=torch.bool)
    present[dropped_rows] = False
    expected = []
    for layer, h in enumerate(captured):
        rows = h if layer < k else h[present]
        expected.append(spec.core(spec.frequency(rows, settings.rho), 0.4))
    assert [n.tolist() for n in result.decode_neurons] == expected
    # f(n) over every prompt token would give another set in some layer after K on this prompt
    everything = [spec.core(spec.frequency(h, settings.rho), 0.4) for h in captured]
    assert everything[k:] != expected[k:]
    with torch.inference_mode():
        masked = masked_reference(engine, prompt, result.token_ids, dropped_rows, k,
                                  ffn_neurons=[torch.tensor(n) for n in expected])
    assert_close(result.logits, masked)


@pytest.mark.parametrize(
    "tokens, rank",
    [("knee", "core"), ("count:5", "core"), ("ratio:0.5", "core"), ("all", "core"),
     ("knee", "fastv"), ("ratio:0.25", "fastv"), ("knee", "random"), ("count:3", "random")],
)
def test_every_token_mode_completes(setup, tokens, rank):
    engine, prompt, _ = setup
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


def test_fastv_ranks_by_the_last_tokens_attention_in_layer_k_minus_1(setup):
    """FastV's K: the attention of layer K-1 (FastV's K=2 reads layer 1), recomputed here from the weights."""
    engine, prompt, _ = setup
    k = 2
    result = run(engine, prompt, SparsitySettings(prune_layer=k, token_rank="fastv", tokens=TokenRule("count", 5),
                                                  neurons=NeuronBudget("dense")))
    text = engine.text
    attention = []
    with torch.inference_mode():
        hidden = engine.embed(prompt)
        positions = engine.family.positions(engine.config, prompt, engine.device)
        cos, sin = engine.rotary.cos_sin(positions, engine.dtype)
        for layer in range(k):
            w = engine.streamer.load(layer)
            x = rms_norm(hidden, w.input_norm, text.rms_norm_eps)
            q = F.linear(x, w.q).view(1, -1, text.num_heads, text.head_dim).transpose(1, 2)
            keys = F.linear(x, w.k).view(1, -1, text.num_kv_heads, text.head_dim).transpose(1, 2)
            q, keys = apply_rotary(q, cos, sin), apply_rotary(keys, cos, sin)
            keys = keys.repeat_interleave(text.num_heads // text.num_kv_heads, dim=1)
            attention.append(torch.softmax((q[0, :, -1:] @ keys[0].transpose(1, 2))[:, 0] / text.head_dim ** 0.5,
                                           dim=-1).mean(0))
            hidden = decoder_layer(hidden, w, text, cos, sin, torch.arange(prompt.num_tokens), KVCache(1), 0)

    def top5(scores):
        image = scores[prompt.image_positions]
        return sorted(torch.sort(image, descending=True, stable=True).indices[:5].tolist())

    assert result.selection.keep.tolist() == top5(attention[k - 1])
    assert top5(attention[k - 1]) != top5(attention[k - 2])  # reading the wrong layer would fail


def test_text_only_prompt_prunes_no_tokens(setup):
    engine, _, _ = setup
    prompt = PromptBuilder(engine.checkpoint).build("Count the objects.")
    result = run(engine, prompt, SparsitySettings())
    assert result.image_tokens == 0 and result.kept_image_tokens == 0
    assert set(result.kv_cache_tokens) == {prompt.num_tokens + NEW_TOKENS - 1}
