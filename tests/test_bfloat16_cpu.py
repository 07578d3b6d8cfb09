"""The bfloat16 path on the CPU against transformers run in bfloat16 on the same checkpoints.

float32 stays the exactness reference (test_exactness.py); in bfloat16 both
sides round every matmul's inputs to 8 mantissa bits, and differ in where
they round (transformers keeps some elementwise steps in float32, accumulates
in another order). BF16_LOGIT_ATOL bounds that: 0.05 on logits of order 1-5,
where one bfloat16 step at 4 is 0.03; a wrong mask, position or weight moves
logits by their whole size. Greedy decoding is compared token by token:
bfloat16 near-ties may break differently on another CPU's kernels, so the
first GREEDY_AGREEMENT of the tokens must be transformers' own, after which
one difference may change the rest.
"""

from __future__ import annotations

import copy

import pytest
import torch

from edgecm.checkpoint import open_checkpoint
from edgecm.prompt import PromptBuilder
from edgecm.sparsity import DENSE
from edgecm.vision import load_image
from runtime.engine import Engine, GenerationSettings

BF16_LOGIT_ATOL = 0.05
GREEDY_TOKENS = 16
GREEDY_AGREEMENT = 0.75
QUESTION = "Describe the picture in one sentence and count the objects."


def _leading_agreement(ours: list[int], theirs: list[int]) -> float:
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(theirs))
    return same / len(theirs)


def _compare(model_dir, reference, prompt, inputs: dict) -> tuple[float, float]:
    engine = Engine(open_checkpoint(model_dir), dtype="bfloat16")
    assert engine.dtype == torch.bfloat16
    theirs_model = copy.deepcopy(reference).to(torch.bfloat16)
    if "pixel_values" in inputs:
        inputs = {**inputs, "pixel_values": inputs["pixel_values"].to(torch.bfloat16)}
    with torch.no_grad():
        theirs = theirs_model(**inputs).logits.float()
    ours = engine.forward(prompt)
    error = (ours - theirs).abs().max().item()
    result = engine.generate(prompt, GenerationSettings(max_new_tokens=GREEDY_TOKENS, stop_at_eos=False),
                             sparsity=DENSE)
    with torch.no_grad():
        expected = theirs_model.generate(**inputs, max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS,
                                         do_sample=False)[0, prompt.num_tokens:].tolist()
    assert theirs.abs().max().item() > 20 * BF16_LOGIT_ATOL, "logits too small for the tolerance to mean anything"
    return error, _leading_agreement(result.token_ids, expected)


@pytest.mark.parametrize("gqa,tied", [(True, False), (False, True)])
def test_llava_in_bfloat16_matches_transformers_in_bfloat16(build_llava, image_path, gqa, tied):
    model_dir, reference = build_llava(gqa=gqa, tied=tied, layout="v5", sharded=False, chat_template=True)
    prompt = PromptBuilder(open_checkpoint(model_dir)).build(QUESTION, load_image(image_path))
    error, agreement = _compare(model_dir, reference, prompt,
                                {"input_ids": prompt.input_ids, "pixel_values": prompt.pixel_values})
    print(f"max abs logit error {error:.3f}, greedy agreement {agreement:.2f}")
    assert error <= BF16_LOGIT_ATOL
    assert agreement >= GREEDY_AGREEMENT


def test_llama_in_bfloat16_matches_transformers_in_bfloat16(build_llama):
    model_dir, reference = build_llama(gqa=True, tied=True)
    prompt = PromptBuilder(open_checkpoint(model_dir)).build("The quick brown fox jumps over the lazy dog.")
    error, agreement = _compare(model_dir, reference, prompt, {"input_ids": prompt.input_ids})
    print(f"max abs logit error {error:.3f}, greedy agreement {agreement:.2f}")
    assert error <= BF16_LOGIT_ATOL
    assert agreement >= GREEDY_AGREEMENT


def test_qwen2_5_vl_in_bfloat16_matches_transformers_in_bfloat16(build_qwen2_5_vl, wide_image_path):
    model_dir, reference = build_qwen2_5_vl(layout="v5", tied=True)
    checkpoint = open_checkpoint(model_dir)
    prompt = PromptBuilder(checkpoint).build(QUESTION, load_image(wide_image_path))
    inputs = {"input_ids": prompt.input_ids, "pixel_values": prompt.pixel_values,
              "image_grid_thw": prompt.image_grid_thw,
              "mm_token_type_ids": (prompt.input_ids == checkpoint.config.image_token_id).int()}
    error, agreement = _compare(model_dir, reference, prompt, inputs)
    print(f"max abs logit error {error:.3f}, greedy agreement {agreement:.2f}")
    assert error <= BF16_LOGIT_ATOL
    assert agreement >= GREEDY_AGREEMENT
