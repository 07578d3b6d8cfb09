"""The CUDA paths against the CPU path, which is the reference: the same code, the same answers.

Each case runs one request on the CPU and on the GPU in float32 and compares
what the math says must agree: the kept image tokens and neurons exactly (the
selection is a ranking of counts, far from round-off), the logits within
GPU float32 round-off, teacher-forced on the CPU's tokens so one near tie
cannot fork the two runs. Every test here is skipped without a CUDA device;
bench/gpu_check.py runs them on one.
"""

from __future__ import annotations

import pytest
import torch

from edgecm.checkpoint import open_checkpoint
from edgecm.prompt import PromptBuilder
from edgecm.sampling import SamplingSettings
from edgecm.sparsity import DENSE, NeuronBudget, SparsitySettings, TokenRule
from edgecm.video import read_video
from edgecm.vision import load_image
from runtime.batch import generate_batch
from runtime.engine import Engine, GenerationSettings

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# cuBLAS and cuDNN sum in another order than the CPU's kernels, and may use TF32 for the vision tower's
# convolution (10 mantissa bits): float32 logits agree to about this.
CUDA_FP32_LOGIT_ATOL = 2e-3
# NF4 and int8 codes are the same on both devices; the GPU kernels dequantise and accumulate in another
# order (int8: the outlier columns in float16), so quantised logits agree more loosely.
CUDA_QUANT_LOGIT_ATOL = 5e-2
NEW_TOKENS = 8
FORCED = GenerationSettings(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
CORE = SparsitySettings(tokens=TokenRule("count", 4), prune_layer=1, neurons=NeuronBudget("beta", 0.4))
SETTINGS = {
    "dense": DENSE,
    "core count:4 beta 0.4": CORE,
    "core knee, mass 0.98": SparsitySettings(prune_layer=1),
    "fastv count:4": SparsitySettings(token_rank="fastv", tokens=TokenRule("count", 4), prune_layer=1),
    "random count:4": SparsitySettings(token_rank="random", tokens=TokenRule("count", 4), prune_layer=1),
    "sparsevlm count:4": SparsitySettings(token_rank="sparsevlm", tokens=TokenRule("count", 4),
                                          neurons=NeuronBudget("beta", 0.4)),
}


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


def assert_same_request(cpu, cuda, atol: float = CUDA_FP32_LOGIT_ATOL) -> None:
    err = max_error(cuda.logits, cpu.logits)
    assert err <= atol, f"CUDA logits differ from the CPU's by up to {err:.3e} (tolerance {atol:.0e})"
    assert cuda.kept_image_tokens == cpu.kept_image_tokens
    assert cuda.kv_cache_tokens == cpu.kv_cache_tokens
    assert cuda.core_neurons == cpu.core_neurons
    if cpu.selection is not None:
        assert torch.equal(cuda.selection.keep.cpu(), cpu.selection.keep.cpu())


@pytest.fixture(scope="module")
def llava(build_llava, image_path, wide_image_path):
    model_dir, _ = build_llava(gqa=True, tied=False, layout="v5", sharded=True, chat_template=True)
    checkpoint = open_checkpoint(model_dir)
    builder = PromptBuilder(checkpoint)
    prompts = [builder.build("Describe the picture in one sentence.", load_image(image_path)),
               builder.build("What colours do you see?", load_image(wide_image_path)),
               builder.build("Count to ten.")]
    return checkpoint, prompts


def forced_pair(checkpoint, prompt, sparsity, **cuda_options):
    """The request on the CPU, then on the GPU teacher-forced on the CPU's tokens."""
    cpu = Engine(checkpoint, resident=True).generate(prompt, FORCED, sparsity=sparsity, collect_logits=True)
    engine = Engine(checkpoint, device="cuda", dtype="float32", **cuda_options)
    cuda = engine.generate(prompt, FORCED, sparsity=sparsity, collect_logits=True, forced_tokens=cpu.token_ids)
    return cpu, cuda


@pytest.mark.parametrize("name", list(SETTINGS))
def test_llava_on_cuda_equals_the_cpu(llava, name):
    checkpoint, prompts = llava
    cpu, cuda = forced_pair(checkpoint, prompts[0], SETTINGS[name], resident=True)
    assert_same_request(cpu, cuda)
    assert cuda.memory.device_peak_allocated_bytes > 0


@pytest.mark.parametrize("name", ["dense", "core count:4 beta 0.4", "fastv count:4"])
def test_qwen2_5_vl_image_and_video_on_cuda_equal_the_cpu(build_qwen2_5_vl, wide_image_path, frames_dir, name):
    model_dir, _ = build_qwen2_5_vl()
    checkpoint = open_checkpoint(model_dir)
    builder = PromptBuilder(checkpoint)
    for prompt in (builder.build("What is shown?", load_image(wide_image_path)),
                   builder.build("What happens in this clip?", video=read_video(frames_dir))):
        cpu, cuda = forced_pair(checkpoint, prompt, SETTINGS[name], resident=True)
        assert_same_request(cpu, cuda)


def test_every_layer_streamed_on_cuda_equals_resident(llava):
    """The smallest budget the planner accepts: every layer streams through the pinned slots, on the side
    stream, with the next layer prefetched, and decode re-streams what does not fit."""
    checkpoint, prompts = llava
    prompt = prompts[0]
    resident = Engine(checkpoint, device="cuda", dtype="float32", resident=True).generate(
        prompt, FORCED, sparsity=CORE, collect_logits=True)
    engine = Engine(checkpoint, device="cuda", dtype="float32")
    smallest = engine.plan_for(prompt.num_tokens, int(prompt.image_positions.numel()), NEW_TOKENS, CORE).min_budget
    try:
        for prefetch in (True, False):
            streamed = Engine(checkpoint, device="cuda", dtype="float32", budget=str(smallest),
                              prefetch=prefetch).generate(prompt, FORCED, sparsity=CORE, collect_logits=True,
                                                          forced_tokens=resident.token_ids)
            assert streamed.memory.plan != resident.memory.plan
            # The same kernels on the same bytes: streaming moves weights, it does not change them.
            assert max_error(streamed.logits, resident.logits) <= 1e-5
            assert streamed.telemetry.stream_prefill.bytes_copied > 0
            assert streamed.telemetry.stream_decode.bytes_copied > 0, "decode should copy held or streamed weights"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


# A batch shares one decode set counted over all its sequences, so it equals single runs with every neuron kept.
BATCH_SETTINGS = {
    "dense": DENSE,
    "core count:4": SparsitySettings(tokens=TokenRule("count", 4), prune_layer=1, neurons=NeuronBudget("dense")),
    "sparsevlm count:4": SparsitySettings(token_rank="sparsevlm", tokens=TokenRule("count", 4),
                                          neurons=NeuronBudget("dense")),
}


@pytest.mark.parametrize("name", list(BATCH_SETTINGS))
def test_batch_on_cuda_equals_each_prompt_alone_on_cuda(llava, name):
    checkpoint, prompts = llava
    engine = Engine(checkpoint, device="cuda", dtype="float32", resident=True)
    sparsity = BATCH_SETTINGS[name]
    singles = [engine.generate(p, FORCED, sparsity=sparsity, collect_logits=True) for p in prompts]
    batched = generate_batch(engine, prompts, FORCED, sparsity=sparsity, collect_logits=True,
                             forced_tokens=[s.token_ids for s in singles])
    for alone, together in zip(singles, batched, strict=True):
        assert_same_request(alone, together, atol=1e-3)


def test_sampling_on_cuda_is_seeded(llava):
    """Sampling draws from a generator on the logits' device; a seed gives the same tokens every time, alone
    and in a batch."""
    checkpoint, prompts = llava
    engine = Engine(checkpoint, device="cuda", dtype="float32", resident=True)
    sampled = [GenerationSettings(max_new_tokens=16, stop_at_eos=False,
                                  sampling=SamplingSettings(temperature=1.5, top_p=0.95, seed=seed)) for seed in (1, 2)]
    first = engine.generate(prompts[0], sampled[0]).token_ids
    assert engine.generate(prompts[0], sampled[0]).token_ids == first
    assert engine.generate(prompts[0], sampled[1]).token_ids != first, "two seeds drew the same 16 tokens"
    vocab = checkpoint.config.text.vocab_size
    assert all(0 <= t < vocab for t in first)
    together = generate_batch(engine, prompts[:2], [sampled[0], sampled[1]])
    assert together[0].token_ids == generate_batch(engine, prompts[:2], [sampled[0], sampled[1]])[0].token_ids


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantised_weights_on_cuda_agree_with_the_cpu(llava, quant):
    checkpoint, prompts = llava
    cpu, cuda = forced_pair(checkpoint, prompts[0], CORE, resident=True, quant=quant)
    dense = Engine(checkpoint, device="cuda", dtype="float32", resident=True).generate(
        prompts[0], FORCED, sparsity=CORE, collect_logits=True, forced_tokens=cpu.token_ids)
    # On the CPU too the reference here is the CPU's own quantised run.
    cpu_quant = Engine(checkpoint, resident=True, quant=quant).generate(
        prompts[0], FORCED, sparsity=CORE, collect_logits=True, forced_tokens=cpu.token_ids)
    err = max_error(cuda.logits, cpu_quant.logits)
    assert err <= CUDA_QUANT_LOGIT_ATOL, f"{quant} on CUDA differs from {quant} on the CPU by {err:.3e}"
    assert max_error(cuda.logits, dense.logits) > 0, "the quantised run should not be the dense one"
    assert cuda.memory.decode_set_bytes < dense.memory.decode_set_bytes


def test_the_allocator_enforces_the_budget(llava):
    checkpoint, prompts = llava
    try:
        Engine(checkpoint, device="cuda", budget="1GiB")
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_telemetry_reads_this_gpu(llava):
    checkpoint, prompts = llava
    result = Engine(checkpoint, device="cuda", dtype="float32").generate(prompts[0], FORCED, sparsity=CORE)
    nvml = result.telemetry.nvml
    assert nvml["available"], nvml.get("reason")
    assert nvml["name"] == torch.cuda.get_device_name(), "NVML should read the card torch computes on"
    total = torch.cuda.get_device_properties(0).total_memory
    assert abs(nvml["memory_total_bytes"] - total) <= 0.05 * total  # the driver keeps a little back from CUDA
    layers = result.timings.prefill_layer_compute_s
    assert len(layers) == checkpoint.config.text.num_layers and all(s > 0 for s in layers)  # CUDA events
    assert 0 < result.timings.prefill_compute_s <= result.timings.prefill_s
    assert result.memory.device_peak_allocated_bytes > 0
