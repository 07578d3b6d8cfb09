"""The memory-aware runtime: streamer slots and prefetch, plan-driven residency, budgets, quantisation, telemetry."""

from __future__ import annotations

import gc

import pytest
import torch

from edgecm.checkpoint import open_checkpoint
from edgecm.errors import EdgecmError
from edgecm.model import LayerWeights
from edgecm.prompt import PromptBuilder
from edgecm.sparsity import DENSE, NeuronBudget, SparsitySettings, TokenRule
from edgecm.vision import load_image
from runtime.engine import Engine, GenerationSettings
from runtime.streamer import LayerStreamer
from runtime.telemetry import LayerTimer, latency_summary, nvml_snapshot

LLAVA = dict(gqa=True, tied=False, layout="v5", sharded=True, chat_template=True)
QUESTION = "What is in the picture? Answer in detail."
SETTINGS = GenerationSettings(max_new_tokens=6, stop_at_eos=False)
CORE = SparsitySettings(tokens=TokenRule("count", 4), neurons=NeuronBudget("beta", 0.4))


@pytest.fixture(scope="module")
def llava(build_llava, image_path):
    model_dir, _ = build_llava(**LLAVA)
    checkpoint = open_checkpoint(model_dir)
    return checkpoint, PromptBuilder(checkpoint).build(QUESTION, load_image(image_path))


def smallest_budget(checkpoint, prompt, sparsity=DENSE) -> int:
    plan = Engine(checkpoint).plan_for(prompt.num_tokens, int(prompt.image_positions.numel()), 6, sparsity)
    return plan.min_budget


# -- streamer --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefetch", [True, False])
def test_streamed_layers_equal_the_checkpoint_and_reuse_two_slots(llava, prefetch):
    checkpoint, _ = llava
    layers = checkpoint.config.text.num_layers
    streamer = LayerStreamer(checkpoint, torch.device("cpu"), torch.float32, prefetch=prefetch)
    slot_sizes = set()
    for index, weights in streamer.stream(range(layers)):
        expected = LayerWeights.from_state(checkpoint.read_layer(index), torch.device("cpu"), torch.float32)
        for got, want in zip(weights.tensors(), expected.tensors()):
            assert torch.equal(got, want)
        if index > 0:  # by then both slots have been filled once
            slot_sizes.add(streamer.slot_bytes)
    assert len(slot_sizes) == 1, "slots are allocated once and reused, not per layer"
    largest = max(checkpoint.layer_nbytes(i) for i in range(layers)) * 2  # float16 on disk, float32 in the slot
    assert streamer.slot_bytes <= 2 * largest * 1.05
    stats = streamer.stats
    assert stats.layers == layers
    assert stats.bytes_read == sum(checkpoint.layer_nbytes(i) for i in range(layers))
    assert stats.fetch_s > 0 and 0 <= stats.hidden_s <= stats.fetch_s


def test_prefetch_changes_nothing_in_the_results(llava):
    checkpoint, prompt = llava
    with_prefetch = Engine(checkpoint, prefetch=True).generate(prompt, SETTINGS, collect_logits=True, sparsity=CORE)
    without = Engine(checkpoint, prefetch=False).generate(prompt, SETTINGS, collect_logits=True, sparsity=CORE)
    assert with_prefetch.token_ids == without.token_ids
    assert torch.equal(with_prefetch.logits, without.logits)


# -- plan-driven residency -------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [DENSE, CORE], ids=["dense", "corematching"])
def test_residency_follows_the_budget_and_never_the_answer(llava, sparsity, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECM_HOME", str(tmp_path))  # where slices that do not fit are written
    checkpoint, prompt = llava
    roomy = Engine(checkpoint).generate(prompt, SETTINGS, collect_logits=True, sparsity=sparsity)
    tight = Engine(checkpoint, budget=str(smallest_budget(checkpoint, prompt, sparsity))).generate(
        prompt, SETTINGS, collect_logits=True, sparsity=sparsity
    )
    assert roomy.memory.plan == "all layers kept"
    assert roomy.memory.decode_weights_read_bytes == 0  # decode moved no weights
    assert tight.memory.plan == "decode set streams"
    if sparsity is DENSE:
        assert tight.memory.decode_weights_read_bytes > 0  # dense layers came from disk again for each token
    else:
        # On a CPU host the slices that did not fit went to a file, not to memory beside the budget, and
        # every decode step read them back (with any dense layer streamed from the checkpoint).
        spilled = tight.memory.decode_set_host_bytes
        assert spilled > 0
        assert tight.memory.decode_weights_read_bytes >= (SETTINGS.max_new_tokens - 1) * spilled
    assert tight.token_ids == roomy.token_ids
    assert torch.equal(tight.logits, roomy.logits)  # the same bytes, wherever they waited
    gc.collect()
    assert not any((tmp_path / "spill").glob("*")), "the slice files go with the request that wrote them"


def test_later_prompts_read_nothing_when_the_model_is_kept(llava):
    checkpoint, prompt = llava
    engine = Engine(checkpoint)
    first = engine.generate(prompt, SETTINGS, sparsity=DENSE)
    second = engine.generate(prompt, SETTINGS, sparsity=DENSE)
    assert first.memory.weights_read_bytes > 0
    assert second.memory.weights_read_bytes == 0
    assert second.token_ids == first.token_ids


def test_a_budget_below_the_smallest_plan_names_the_smallest(llava):
    checkpoint, prompt = llava
    smallest = smallest_budget(checkpoint, prompt)
    engine = Engine(checkpoint, budget=str(smallest - 1))
    with pytest.raises(EdgecmError, match=r"needs at least [0-9.]+ GiB.*raise --budget"):
        engine.generate(prompt, SETTINGS, sparsity=DENSE)


def test_a_budget_above_the_device_means_all_of_it_and_nonsense_is_refused(llava):
    checkpoint, prompt = llava
    import psutil

    engine = Engine(checkpoint, budget="1PiB")
    assert engine.budget == psutil.virtual_memory().total
    assert engine.generate(prompt, SETTINGS, sparsity=DENSE).memory.plan == "all layers kept"
    for nonsense in ("0", "0GiB", "-3GiB", "twelve", "12XB"):
        with pytest.raises(EdgecmError, match="--budget"):
            Engine(checkpoint, budget=nonsense)


# -- quantisation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantised_linear_is_the_dequantised_matrix(kind):
    from edgecm.quant import linear, quantize

    torch.manual_seed(0)
    weight = torch.randn(96, 128) * 0.05
    x = torch.randn(3, 128)
    q = quantize(weight, kind)
    reference = torch.nn.functional.linear(x, q.dequantize())
    tolerance = 1e-5 if kind == "nf4" else 2e-2  # int8 also quantises the activations, per row
    assert torch.allclose(linear(x, q), reference, atol=tolerance, rtol=tolerance)
    assert (q.dequantize() - weight).abs().max() < weight.abs().max() * (0.2 if kind == "nf4" else 0.02)
    ratio = q.nbytes / (weight.numel() * 2)  # against float16
    assert ratio < (0.3 if kind == "nf4" else 0.55)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantised_decode_set_is_smaller_and_close(llava, kind):
    checkpoint, prompt = llava
    dense = Engine(checkpoint).generate(prompt, SETTINGS, collect_logits=True, sparsity=CORE)
    quant = Engine(checkpoint, quant=kind).generate(
        prompt, SETTINGS, collect_logits=True, sparsity=CORE, forced_tokens=dense.token_ids
    )
    assert quant.memory.decode_set_bytes < 0.6 * dense.memory.decode_set_bytes
    cosine = torch.nn.functional.cosine_similarity(quant.logits, dense.logits, dim=-1)
    assert cosine.min() > 0.95, cosine


def test_int8_is_refused_on_a_card_older_than_turing(monkeypatch):
    from edgecm import quant

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA TITAN Xp")
    with pytest.raises(EdgecmError, match=r"TITAN Xp has compute capability 6\.1.*7\.5.*--quant nf4"):
        quant.check_supported("int8", torch.device("cuda"))
    quant.check_supported("nf4", torch.device("cuda"))  # NF4 runs on Pascal


# -- telemetry -------------------------------------------------------------------------------------


def test_telemetry_reports_what_it_can_without_a_gpu(llava):
    checkpoint, prompt = llava
    snapshot = nvml_snapshot(torch.device("cpu"))
    assert snapshot["available"] is False and "CPU" in snapshot["reason"]
    tight = Engine(checkpoint, budget=str(smallest_budget(checkpoint, prompt)))
    result = tight.generate(prompt, SETTINGS, sparsity=DENSE)
    t = result.timings
    layers = checkpoint.config.text.num_layers
    assert len(t.prefill_layer_compute_s) == layers and all(s > 0 for s in t.prefill_layer_compute_s)
    assert t.prefill_compute_s <= t.prefill_s
    assert t.prefill_transfer_hidden_s + t.prefill_transfer_exposed_s == pytest.approx(t.prefill_transfer_s)
    latency = t.decode_token_latency
    assert 0 < latency["p50_ms"] <= latency["p90_ms"] <= latency["max_ms"]
    assert result.telemetry.stream_decode.layers == layers * (SETTINGS.max_new_tokens - 1)


def test_latency_summary_and_layer_timer():
    assert latency_summary([0.01, 0.02, 0.03, 0.04, 0.10]) == {"p50_ms": 30.0, "p90_ms": 100.0, "max_ms": 100.0}
    timer = LayerTimer(torch.device("cpu"))
    for _ in range(2):
        for index in range(3):
            with timer.layer("decode", index):
                torch.ones(64, 64) @ torch.ones(64, 64)
    assert len(timer.per_layer("decode")) == 3 and timer.per_layer("prefill") == []


# -- on a GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streaming_with_prefetch_matches_cpu(llava):
    checkpoint, prompt = llava
    cpu = Engine(checkpoint).generate(prompt, SETTINGS, collect_logits=True, sparsity=CORE)
    budget = smallest_budget(checkpoint, prompt, CORE)
    cuda = Engine(checkpoint, device="cuda", dtype="float32", budget=str(budget + 600 * 1024**2)).generate(
        prompt, SETTINGS, collect_logits=True, sparsity=CORE, forced_tokens=cpu.token_ids
    )
    assert torch.allclose(cuda.logits, cpu.logits, atol=1e-3)
    assert cuda.telemetry.nvml["available"] and cuda.memory.device_peak_allocated_bytes > 0
    assert cuda.telemetry.stream_prefill.bytes_copied > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_budget_is_enforced_with_the_numbers(llava):
    checkpoint, prompt = llava
    engine = Engine(checkpoint, device="cuda", budget="64MiB")
    with pytest.raises(EdgecmError, match=r"budget|at least"):
        engine.generate(prompt, SETTINGS, sparsity=DENSE)
    try:
        Engine(checkpoint, device="cuda", budget="1GiB")
        with pytest.raises(torch.OutOfMemoryError):  # the allocator itself now stops at the budget
            torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
