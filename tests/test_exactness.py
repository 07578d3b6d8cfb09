"""Dense edgecm against transformers: logits within a named tolerance, identical greedy tokens."""

from __future__ import annotations

import pytest
import torch

from edgecm.checkpoint import open_checkpoint
from edgecm.prompt import PromptBuilder
from edgecm.sparsity import DENSE
from edgecm.vision import load_image
from runtime.engine import Engine, GenerationSettings

# float32 on CPU: both sides run the same math in the same order up to kernel
# choice, so differences are round-off; 1e-4 absolute leaves room for that
# while catching any real divergence (logits here are of order 1-10).
FP32_LOGIT_ATOL = 1e-4
GREEDY_TOKENS = 32
GREEDY = GenerationSettings(max_new_tokens=GREEDY_TOKENS, stop_at_eos=False)

QUESTION = "Describe the picture in one sentence and count the objects."

LLAVA_VARIANTS = {
    "mha-untied-v5-single-template": dict(gqa=False, tied=False, layout="v5", sharded=False, chat_template=True),
    "gqa-untied-v4-sharded-fallback": dict(gqa=True, tied=False, layout="v4", sharded=True, chat_template=False),
    "gqa-tied-v5-sharded-template": dict(gqa=True, tied=True, layout="v5", sharded=True, chat_template=True),
    "mha-tied-v4-single-template": dict(gqa=False, tied=True, layout="v4", sharded=False, chat_template=True),
}


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor, atol: float) -> float:
    err = (ours - theirs).abs()
    assert err.max().item() <= atol, f"max abs error {err.max().item():.3e} (mean {err.mean().item():.3e}) > {atol}"
    assert theirs.abs().max().item() > 100 * atol, "reference logits too small for the tolerance to mean anything"
    return err.max().item()


@pytest.mark.parametrize("variant", list(LLAVA_VARIANTS))
def test_llava_matches_transformers(variant, build_llava, image_path):
    model_dir, reference = build_llava(**LLAVA_VARIANTS[variant])
    checkpoint = open_checkpoint(model_dir)
    builder = PromptBuilder(checkpoint)
    prompt = builder.build(QUESTION, load_image(image_path))
    assert prompt.image_positions.numel() == checkpoint.config.vision.tokens_per_image
    engine = Engine(checkpoint, dtype="float32")

    ours = engine.forward(prompt)
    with torch.no_grad():
        theirs = reference(input_ids=prompt.input_ids, pixel_values=prompt.pixel_values).logits
    assert_logits_close(ours, theirs, FP32_LOGIT_ATOL)

    result = engine.generate(prompt, GREEDY, sparsity=DENSE)
    with torch.no_grad():
        expected = reference.generate(
            input_ids=prompt.input_ids,
            pixel_values=prompt.pixel_values,
            max_new_tokens=GREEDY_TOKENS,
            min_new_tokens=GREEDY_TOKENS,
            do_sample=False,
        )[0, prompt.num_tokens :].tolist()
    assert result.token_ids == expected


def test_llava_text_only_prompt_matches_transformers(build_llava):
    model_dir, reference = build_llava(**LLAVA_VARIANTS["gqa-tied-v5-sharded-template"])
    checkpoint = open_checkpoint(model_dir)
    prompt = PromptBuilder(checkpoint).build(QUESTION)
    assert prompt.pixel_values is None and prompt.image_positions.numel() == 0
    with torch.no_grad():
        theirs = reference(input_ids=prompt.input_ids).logits
    assert_logits_close(Engine(checkpoint, dtype="float32").forward(prompt), theirs, FP32_LOGIT_ATOL)


def test_fallback_template_is_llava_15(build_llava, image_path):
    model_dir, _ = build_llava(**LLAVA_VARIANTS["gqa-untied-v4-sharded-fallback"])
    builder = PromptBuilder(open_checkpoint(model_dir))
    assert builder.chat_template is None
    assert builder.render("Hi?", with_image=True) == "USER: <image>\nHi? ASSISTANT:"


LLAMA_VARIANTS = {
    "gqa-tied": dict(gqa=True, tied=True),
    "mha-untied": dict(gqa=False, tied=False),
    "rope-linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    # max_position_embeddings=48 so that prompt + 32 new tokens cross it and the NTK base changes mid-run.
    "rope-dynamic": dict(
        max_position_embeddings=48, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    ),
    "rope-yarn": dict(
        rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0
        }
    ),
    # original length 32 < prompt + new tokens: the long factors take over during generation.
    "rope-longrope": dict(
        max_position_embeddings=128,
        rope_parameters={
            "rope_type": "longrope",
            "original_max_position_embeddings": 32,
            "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [1.0 + 0.5 * i for i in range(8)],
            "rope_theta": 10000.0,
        },
    ),
    "rope-llama3": dict(
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 10000.0,
        }
    ),
}


@pytest.mark.parametrize("variant", list(LLAMA_VARIANTS))
def test_llama_matches_transformers(variant, build_llama):
    model_dir, reference = build_llama(**LLAMA_VARIANTS[variant])
    checkpoint = open_checkpoint(model_dir)
    assert checkpoint.config.family == "llama"
    assert checkpoint.config.text.rope.rope_type == reference.config.rope_parameters["rope_type"]
    builder = PromptBuilder(checkpoint)
    prompt = builder.build("The quick brown fox jumps over the lazy dog and counts one, two, three.")
    engine = Engine(checkpoint, dtype="float32")
    with torch.no_grad():
        theirs = reference(input_ids=prompt.input_ids).logits
    assert_logits_close(engine.forward(prompt), theirs, FP32_LOGIT_ATOL)

    result = engine.generate(prompt, GREEDY, sparsity=DENSE)
    with torch.no_grad():
        expected = reference.generate(
            input_ids=prompt.input_ids, max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS, do_sample=False
        )[0, prompt.num_tokens :].tolist()
    assert result.token_ids == expected


# cuDNN may run the CLIP patch convolution in TF32 on recent GPUs, which
# rounds inputs to 10 mantissa bits: a looser bound than CPU float32.
CUDA_FP32_LOGIT_ATOL = 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_the_same_path(build_llava, image_path):
    model_dir, reference = build_llava(**LLAVA_VARIANTS["gqa-tied-v5-sharded-template"])
    checkpoint = open_checkpoint(model_dir)
    prompt = PromptBuilder(checkpoint).build(QUESTION, load_image(image_path))
    engine = Engine(checkpoint, device="cuda", dtype="float32")
    with torch.no_grad():
        theirs = reference(input_ids=prompt.input_ids, pixel_values=prompt.pixel_values).logits
    assert_logits_close(engine.forward(prompt).cpu(), theirs, CUDA_FP32_LOGIT_ATOL)
    result = engine.generate(prompt, GenerationSettings(max_new_tokens=8, stop_at_eos=False), sparsity=DENSE)
    assert len(result.token_ids) == 8 and result.memory.device_peak_allocated_bytes > 0
