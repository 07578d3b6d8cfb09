"""Token-pruning calibration: the shared-prefix sweep against the engine run candidate by candidate."""

from __future__ import annotations

import pytest
import torch

from edgecm.checkpoint import open_checkpoint
from edgecm.fidelity import dense_references
from edgecm.prompt import PromptBuilder
from edgecm.sparsity import TokenRule
from edgecm.video import read_video
from edgecm.vision import load_image
from runtime.engine import Engine
from runtime.token_calibration import Candidate, candidates, choose, layer_grid, sweep

# The sweep teacher-forces the answer in one pass where the engine decodes it token by token: the same
# terms, summed in another order (float32 round-off).
SWEEP_LOGITS_ATOL = 1e-4


def test_the_grid_spans_the_depth_with_the_papers_k():
    assert layer_grid(30) == (2, 3, 6, 9, 12, 15, 18, 21, 24, 27)
    assert layer_grid(32) == (2, 3, 6, 10, 13, 16, 19, 22, 26, 29)
    assert layer_grid(3) == (1, 2)


def test_every_ranking_gets_its_adaptive_rule_and_four_ratios_and_random_is_a_reference():
    found = candidates(30, (18,))
    by_rank = {}
    for c in found:
        by_rank.setdefault(c.rank, []).append(str(c.tokens))
    ratios = ["ratio:0.5", "ratio:0.25", "ratio:0.125", "ratio:0.0625"]
    assert by_rank == {"core": ["knee", *ratios], "core-ref": ["knee", *ratios], "fastv": ratios,
                       "sparsevlm": ["knee", *ratios], "random": ratios}
    assert [c.reference for c in found].count(True) == 4


def prompts_for(builder, image_path, wide_image_path, frames_dir=None):
    prompts = [builder.build("Describe the picture in one sentence.", load_image(image_path)),
               builder.build("What colours do you see?", load_image(wide_image_path)),
               builder.build("Count to ten.")]
    if frames_dir is not None:
        prompts.append(builder.build("What happens in this clip?", video=read_video(frames_dir)))
    return prompts


@pytest.fixture(scope="module")
def llava(build_llava, image_path, wide_image_path):
    model_dir, _ = build_llava(gqa=True, tied=False, layout="v5", sharded=False, chat_template=True)
    checkpoint = open_checkpoint(model_dir)
    builder = PromptBuilder(checkpoint)
    engine = Engine(checkpoint, resident=True, dtype="float32")  # exact up to float32 round-off
    refs = dense_references(engine, prompts_for(builder, image_path, wide_image_path), builder.stop_token_ids, 6)
    return engine, refs


def assert_sweep_equals_naive(engine, refs, chosen):
    fast, _ = sweep(engine, refs, only=chosen)
    slow, _ = sweep(engine, refs, only=chosen, naive=True)
    for a, b in zip(fast, slow, strict=True):
        assert a.candidate == b.candidate
        assert a.top1_agreement == b.top1_agreement and a.exact_agreement == b.exact_agreement, a.candidate
        assert abs(a.mean_kl - b.mean_kl) <= 1e-3, a.candidate
        assert a.kept_image_tokens == b.kept_image_tokens, a.candidate
        assert a.prefill_flops == b.prefill_flops and a.kv_bytes == b.kv_bytes, a.candidate


def test_sweep_equals_the_engine_candidate_by_candidate_on_llava(llava):
    engine, refs = llava
    chosen = [Candidate(rank, k, TokenRule.parse(tokens)) for rank, k, tokens in [
        ("core", 1, "knee"), ("core", 2, "ratio:0.25"), ("core-ref", 1, "ratio:0.5"), ("core-ref", 2, "knee"),
        ("fastv", 1, "ratio:0.125"), ("fastv", 2, "ratio:0.5"), ("random", 1, "ratio:0.25"),
        ("sparsevlm", 1, "ratio:0.25"), ("sparsevlm", 2, "knee")]]
    assert_sweep_equals_naive(engine, refs, chosen)


def test_the_logits_of_one_candidate_equal_the_engines(llava):
    from runtime.token_calibration import record_dense, run_candidates, run_naive

    engine, refs = llava
    group = [Candidate(rank, 2, TokenRule.parse(tokens)).settings(engine_base()) for rank, tokens in
             [("fastv", "ratio:0.25"), ("core", "knee"), ("sparsevlm", "ratio:0.5"), ("core-ref", "ratio:0.125")]]
    for ref in refs:
        with torch.inference_mode():
            together = run_candidates(engine, record_dense(engine, ref.prompt, (2,)), group, ref.tokens)
        for settings, fast in zip(group, together, strict=True):
            slow = run_naive(engine, settings, ref)
            err = (fast.logits - slow.logits).abs().max().item()
            assert err <= SWEEP_LOGITS_ATOL, f"{settings.token_rank}: max logit error {err:.3e}"
            assert fast.rows_per_layer == slow.rows_per_layer and fast.kv_entries == slow.kv_entries


def engine_base():
    from edgecm.sparsity import SparsitySettings

    return SparsitySettings()


def test_sweep_equals_the_engine_on_qwen_with_a_video(build_qwen2_5_vl, image_path, wide_image_path, frames_dir):
    model_dir, _ = build_qwen2_5_vl()
    checkpoint = open_checkpoint(model_dir)
    builder = PromptBuilder(checkpoint)
    engine = Engine(checkpoint, resident=True, dtype="float32")  # exact up to float32 round-off
    refs = dense_references(engine, prompts_for(builder, image_path, wide_image_path, frames_dir),
                            builder.stop_token_ids, 5)
    chosen = [Candidate(rank, k, TokenRule.parse(tokens)) for rank, k, tokens in [
        ("core", 1, "knee"), ("core-ref", 2, "ratio:0.25"), ("fastv", 1, "ratio:0.5"), ("sparsevlm", 1, "knee")]]
    assert_sweep_equals_naive(engine, refs, chosen)


def test_the_choice_is_the_cheapest_that_meets_the_target_and_never_random(llava):
    engine, refs = llava
    results, _ = sweep(engine, refs, grid=(1, 2))
    for target in (0.0, 0.5, 1.0):
        chosen = choose(results, target)
        meeting = [r for r in results if r.top1_agreement >= target and not r.candidate.reference]
        if not meeting:
            assert chosen is None
            continue
        assert chosen in meeting and chosen.prefill_flops == min(r.prefill_flops for r in meeting)
    assert all(r.relative_prefill_flops < 1 for r in results if r.kept_image_tokens < 16)
    cheapest_random = min((r for r in results if r.candidate.reference), key=lambda r: r.prefill_flops)
    assert choose(results, 0.0).prefill_flops <= cheapest_random.prefill_flops  # random is never the answer
    assert choose(results, 0.0).candidate.rank != "random"
