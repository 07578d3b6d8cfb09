"""Batched generation against the single-sequence path, which stays the reference.

Every case runs the same prompts alone and together, on prompts of different
lengths, with and without images (and a video), and compares token for token
and logit for logit. The tolerance is float32 round-off of padded against
unpadded matrix shapes.
"""

from __future__ import annotations

import pytest
import torch

from edgecm.checkpoint import open_checkpoint
from edgecm.errors import EdgecmError
from edgecm.prompt import PromptBuilder
from edgecm.sampling import SamplingSettings
from edgecm.sparsity import DENSE, NeuronBudget, SparsitySettings, TokenRule
from edgecm.video import read_video
from edgecm.vision import load_image
from runtime.batch import generate_batch
from runtime.engine import Engine, GenerationSettings

# Padding changes the shapes the matmuls see, hence their summation order: float32 round-off.
BATCH_LOGITS_ATOL = 1e-4
NEW_TOKENS = 12
FORCED_LENGTH = GenerationSettings(max_new_tokens=NEW_TOKENS, stop_at_eos=False)

PRUNED = SparsitySettings(tokens=TokenRule.parse("count:3"), prune_layer=1, neurons=NeuronBudget("dense"))
SETTINGS = {
    "dense": DENSE,
    "core tokens count:3": PRUNED,
    "core tokens knee": SparsitySettings(prune_layer=1, neurons=NeuronBudget("dense")),
    "core-ref count:3": SparsitySettings(token_rank="core-ref", tokens=TokenRule.parse("count:3"), prune_layer=1,
                                         neurons=NeuronBudget("dense")),
    "core-ref knee": SparsitySettings(token_rank="core-ref", prune_layer=1, neurons=NeuronBudget("dense")),
    "fastv count:3": SparsitySettings(token_rank="fastv", tokens=TokenRule.parse("count:3"), prune_layer=1,
                                      neurons=NeuronBudget("dense")),
    "random count:3, early kv kept": SparsitySettings(token_rank="random", tokens=TokenRule.parse("count:3"),
                                                      prune_layer=1, neurons=NeuronBudget("dense"), keep_early_kv=True),
}


def assert_same(singles, batched) -> None:
    for alone, together in zip(singles, batched, strict=True):
        assert together.token_ids == alone.token_ids
        err = (together.logits - alone.logits).abs().max().item()
        assert err <= BATCH_LOGITS_ATOL, f"max logit error {err:.3e}"
        assert together.kept_image_tokens == alone.kept_image_tokens
        assert together.kv_cache_tokens == alone.kv_cache_tokens
        if alone.selection is not None:
            assert torch.equal(together.selection.keep, alone.selection.keep)


@pytest.fixture(scope="module")
def llava(build_llava, image_path, wide_image_path):
    model_dir, _ = build_llava()
    checkpoint = open_checkpoint(model_dir)
    builder = PromptBuilder(checkpoint)
    prompts = [
        builder.build("What is shown?", load_image(image_path)),
        builder.build("Describe the picture in one long sentence, naming every colour you see.",
                      load_image(wide_image_path)),
        builder.build("Count to ten."),  # text only, in the same batch
    ]
    return Engine(checkpoint, dtype="float32", resident=True), builder, prompts


@pytest.mark.parametrize("name", list(SETTINGS))
def test_batched_llava_equals_each_prompt_alone(llava, name):
    engine, _, prompts = llava
    sparsity = SETTINGS[name]
    singles = [engine.generate(p, FORCED_LENGTH, sparsity=sparsity, collect_logits=True) for p in prompts]
    batched = generate_batch(engine, prompts, FORCED_LENGTH, sparsity=sparsity, collect_logits=True)
    assert len({p.num_tokens for p in prompts}) == 3  # the rows really are padded
    assert_same(singles, batched)
    if sparsity.prunes_tokens:
        assert 0 < batched[0].kept_image_tokens < batched[0].image_tokens


def test_a_shared_neuron_set_equals_single_runs_given_that_set(llava):
    """Core neurons are counted over the whole batch; each sequence alone, decoding with that same set,
    gives the same tokens and logits."""
    engine, _, prompts = llava
    sparsity = SparsitySettings(tokens=TokenRule.parse("count:3"), prune_layer=1, neurons=NeuronBudget("beta", 0.4))
    batched = generate_batch(engine, prompts, FORCED_LENGTH, sparsity=sparsity, collect_logits=True)
    shared = batched[0].decode_neurons
    assert all(n is not None and 0 < n.numel() < engine.text.intermediate_size for n in shared)
    singles = [engine.generate(p, FORCED_LENGTH, sparsity=sparsity, collect_logits=True, fixed_neurons=shared)
               for p in prompts]
    assert_same(singles, batched)
    # and the set is the batch's own: a sequence alone picks different neurons
    alone = engine.generate(prompts[2], FORCED_LENGTH, sparsity=sparsity)
    assert any(not torch.equal(a, b) for a, b in zip(alone.decode_neurons, shared))


def test_forced_tokens_act_per_sequence(llava):
    engine, _, prompts = llava
    forced = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    settings = [GenerationSettings(max_new_tokens=len(f), stop_at_eos=False) for f in forced]
    batched = generate_batch(engine, prompts, settings, sparsity=PRUNED, collect_logits=True, forced_tokens=forced)
    singles = [engine.generate(p, s, sparsity=PRUNED, collect_logits=True, forced_tokens=f)
               for p, s, f in zip(prompts, settings, forced)]
    assert [b.token_ids for b in batched] == forced
    assert_same(singles, batched)


def test_sampling_seeds_and_lengths_act_per_sequence(llava):
    engine, builder, prompts = llava
    settings = [GenerationSettings(max_new_tokens=n, sampling=SamplingSettings(temperature=0.9, top_p=0.95, seed=s))
                for n, s in ((5, 1), (12, 2), (3, 3))]
    batched = generate_batch(engine, prompts, settings, builder.stop_token_ids, sparsity=DENSE)
    singles = [engine.generate(p, s, builder.stop_token_ids, sparsity=DENSE) for p, s in zip(prompts, settings)]
    assert [b.token_ids for b in batched] == [s.token_ids for s in singles]
    assert [b.stop_reason for b in batched] == [s.stop_reason for s in singles]
    assert all(len(b.token_ids) <= s.max_new_tokens for b, s in zip(batched, settings))
    again = generate_batch(engine, prompts, settings, builder.stop_token_ids, sparsity=DENSE)
    assert [b.token_ids for b in again] == [b.token_ids for b in batched]  # reproducible


def test_a_sequence_that_stops_leaves_the_batch(llava):
    """Greedy tokens of the tiny model are known from a single run; make one of them the stop token, so
    one sequence ends early while the others run on."""
    engine, _, prompts = llava
    probe = engine.generate(prompts[0], FORCED_LENGTH, sparsity=DENSE)
    stop = probe.token_ids[2]
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS)
    singles = [engine.generate(p, settings, (stop,), collect_logits=True, sparsity=DENSE) for p in prompts]
    batched = generate_batch(engine, prompts, settings, (stop,), collect_logits=True, sparsity=DENSE)
    assert singles[0].stop_reason == "eos" and len(singles[0].token_ids) <= 3
    assert any(s.stop_reason == "length" for s in singles)
    assert_same(singles, batched)


@pytest.mark.parametrize("name", ["dense", "core tokens count:3", "fastv count:3"])
def test_batched_qwen2_5_vl_with_images_and_a_video_equals_each_alone(build_qwen2_5_vl, image_path,
                                                                     wide_image_path, frames_dir, name):
    model_dir, _ = build_qwen2_5_vl()
    checkpoint = open_checkpoint(model_dir)
    builder = PromptBuilder(checkpoint)
    prompts = [
        builder.build("What is shown?", load_image(wide_image_path)),
        builder.build("What happens in this clip, from start to end?", video=read_video(frames_dir)),
        builder.build("Say hello.", load_image(image_path)),
    ]
    engine = Engine(checkpoint, dtype="float32", resident=True)
    sparsity = SETTINGS[name]
    singles = [engine.generate(p, FORCED_LENGTH, sparsity=sparsity, collect_logits=True) for p in prompts]
    batched = generate_batch(engine, prompts, FORCED_LENGTH, sparsity=sparsity, collect_logits=True)
    assert_same(singles, batched)


def test_batched_llama_streamed_equals_alone(build_llama):
    """Text only, every layer streamed from disk: one fetch per layer per step serves the whole batch."""
    model_dir, _ = build_llama()
    checkpoint = open_checkpoint(model_dir)
    builder = PromptBuilder(checkpoint)
    prompts = [builder.build(q) for q in ("Hi.", "Count the objects: one, two, three.", "Edge devices run models.")]
    engine = Engine(checkpoint, dtype="float32")
    plan = engine.plan_for(max(p.num_tokens for p in prompts), 0, NEW_TOKENS, DENSE, batch=3)
    streamed = Engine(checkpoint, dtype="float32", budget=str(plan.min_budget))
    singles = [streamed.generate(p, FORCED_LENGTH, collect_logits=True, sparsity=DENSE) for p in prompts]
    single_reads = singles[0].memory.decode_weights_read_bytes
    batched = generate_batch(streamed, prompts, FORCED_LENGTH, collect_logits=True, sparsity=DENSE)
    assert streamed.last_plan.name == "decode set streams"
    assert_same(singles, batched)
    # the batch reads the weights once per step for all three, as one sequence alone does
    assert batched[0].memory.decode_weights_read_bytes == single_reads


def test_a_batch_the_budget_cannot_hold_is_refused_with_the_numbers(build_llama):
    model_dir, _ = build_llama()
    checkpoint = open_checkpoint(model_dir)
    builder = PromptBuilder(checkpoint)
    engine = Engine(checkpoint, dtype="float32")
    prompt = builder.build("Hi.")
    floor = engine.plan_for(prompt.num_tokens, 0, NEW_TOKENS, DENSE).min_budget
    tight = Engine(checkpoint, dtype="float32", budget=str(floor))
    with pytest.raises(EdgecmError, match=r"a batch of 64 does not fit in .* needs at least .* GiB") as err:
        generate_batch(tight, [prompt] * 64, FORCED_LENGTH, sparsity=DENSE)
    assert "--batch-size" in str(err.value) and "\n" not in str(err.value)
