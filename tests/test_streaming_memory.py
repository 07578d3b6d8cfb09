"""Layer streaming keeps the resident set near a few layers, on a checkpoint far larger than that.

The checkpoint: a random LlamaForCausalLM-shaped model of 18 layers x 28 MB
(float32), 510 MB in all, written shard by shard. Generation runs in a fresh
process so the measurement sees only edgecm: RSS is sampled with psutil from
a background thread (runtime.telemetry.PeakRSS) between the engine being
ready (embedding and head loaded) and the end of generation.

Streaming is what the planner chooses under the smallest budget it accepts.
Bound: at most 4 layers' worth of growth (113 MB, 22 % of the checkpoint).
The streamer's two slots hold the layer computing and the one prefetched;
while the prefetch reads, safetensors' memory map of the same bytes is also
counted in RSS until the file is closed (that makes three), and activations,
the KV cache and allocator slack stay below one more. Without a budget the
host has room for the whole model, so the plan keeps every layer: that run
must grow by about the whole checkpoint and read each layer once, which also
shows that the measurement sees weights when they do stay.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from tiny import make_tokenizer

HIDDEN, FFN, LAYERS = 768, 2048, 18
LAYER_BYTES = 4 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN + 2 * HIDDEN)
GROWTH_BOUND_LAYERS = 4


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    from transformers import LlamaConfig

    out = tmp_path_factory.mktemp("big")
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(str(out))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(str(out))
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i in range(LAYERS):  # one shard per layer, written one at a time: the test itself stays small
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
            "self_attn.v_proj.weight": (HIDDEN, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            "mlp.gate_proj.weight": (FFN, HIDDEN), "mlp.up_proj.weight": (FFN, HIDDEN),
            "mlp.down_proj.weight": (HIDDEN, FFN),
        }
        tensors = {p + k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
        tensors[p + "input_layernorm.weight"] = torch.ones(HIDDEN)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN)
        name = f"model-{i:05d}.safetensors"
        save_file(tensors, str(out / name))
        weight_map.update({k: name for k in tensors})
    rest = {"model.embed_tokens.weight": torch.randn(len(tokenizer), HIDDEN, generator=gen) * 0.02,
            "model.norm.weight": torch.ones(HIDDEN)}
    save_file(rest, str(out / "model-rest.safetensors"))
    weight_map.update({k: "model-rest.safetensors" for k in rest})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


MEASURE = textwrap.dedent(
    """
    import json, sys
    from edgecm.checkpoint import open_checkpoint
    from edgecm.prompt import PromptBuilder
    from edgecm.sparsity import DENSE
    from runtime.engine import Engine, GenerationSettings
    checkpoint = open_checkpoint(sys.argv[1])
    prompt = PromptBuilder(checkpoint).build("Count the objects: one, two, three, four, five.")
    settings = GenerationSettings(max_new_tokens=8, stop_at_eos=False)
    budget = None
    if sys.argv[2] == "smallest-budget":
        budget = str(Engine(checkpoint, dtype="float32").plan_for(prompt.num_tokens, 0, 8, DENSE).min_budget)
    engine = Engine(checkpoint, budget=budget, dtype="float32")  # the bounds below are in float32 bytes
    result = engine.generate(prompt, settings, sparsity=DENSE)
    mem = result.memory
    print(json.dumps({"growth": mem.rss_peak_bytes - mem.rss_start_bytes, "read": mem.weights_read_bytes,
                      "plan": mem.plan}))
    """
)


def _measure(model_dir, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(model_dir), mode], capture_output=True, text=True, check=True, timeout=300
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_streamed_generation_stays_near_a_few_layers(big_checkpoint):
    checkpoint_bytes = sum(f.stat().st_size for f in big_checkpoint.glob("*.safetensors"))
    assert checkpoint_bytes >= 400e6
    streamed = _measure(big_checkpoint, "smallest-budget")
    bound = GROWTH_BOUND_LAYERS * LAYER_BYTES
    print(f"checkpoint {checkpoint_bytes/1e6:.0f} MB, layer {LAYER_BYTES/1e6:.1f} MB, "
          f"streamed growth {streamed['growth']/1e6:.1f} MB (bound {bound/1e6:.0f} MB)")
    assert streamed["plan"] == "decode set streams"
    # Every layer was read for the prefill and for each of the 7 decode steps.
    assert streamed["read"] >= 8 * LAYERS * LAYER_BYTES * 0.99
    assert streamed["growth"] < bound

    kept = _measure(big_checkpoint, "no-budget")
    print(f"no budget: growth {kept['growth']/1e6:.1f} MB, read {kept['read']/1e6:.1f} MB")
    assert kept["plan"] == "all layers kept"
    assert kept["read"] <= LAYERS * LAYER_BYTES * 1.01  # each layer once, for the prefill; decode reads nothing
    assert kept["growth"] > 0.9 * LAYERS * LAYER_BYTES
