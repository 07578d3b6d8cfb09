"""Layer streaming keeps the resident set near one layer, on a checkpoint far larger than that.

The checkpoint: a random LlamaForCausalLM-shaped model of 10 layers x 51 MB
(float32), 513 MB in all, written shard by shard. Generation runs in a fresh
process so the measurement sees only edgecm: RSS is sampled with psutil from
a background thread (runtime.telemetry.PeakRSS) between the engine being
ready (embedding and head loaded) and the end of generation.

Bound: at most 3 layers' worth of growth (154 MB, 30 % of the checkpoint).
One layer is live at a time; while it is read, safetensors' memory map of the
same bytes is also counted in RSS until the file is closed (that makes two),
and activations, the KV cache and allocator slack stay far below one more.
The same run with --resident must grow by about the whole checkpoint, which
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

HIDDEN, FFN, LAYERS = 1024, 2816, 10
LAYER_BYTES = 4 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN + 2 * HIDDEN)
GROWTH_BOUND_LAYERS = 3


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
    from runtime.engine import Engine, GenerationSettings
    checkpoint = open_checkpoint(sys.argv[1])
    prompt = PromptBuilder(checkpoint).build("Count the objects: one, two, three, four, five.")
    engine = Engine(checkpoint, resident=sys.argv[2] == "resident")
    result = engine.generate(prompt, GenerationSettings(max_new_tokens=8, stop_at_eos=False))
    mem = result.memory
    print(json.dumps({"growth": mem["rss_peak_bytes"] - mem["rss_start_bytes"], "read": mem["weights_read_bytes"]}))
    """
)


def _measure(model_dir, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(model_dir), mode], capture_output=True, text=True, check=True, timeout=300
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_streamed_generation_stays_near_one_layer(big_checkpoint):
    checkpoint_bytes = sum(f.stat().st_size for f in big_checkpoint.glob("*.safetensors"))
    assert checkpoint_bytes >= 400e6
    streamed = _measure(big_checkpoint, "stream")
    bound = GROWTH_BOUND_LAYERS * LAYER_BYTES
    print(f"checkpoint {checkpoint_bytes/1e6:.0f} MB, layer {LAYER_BYTES/1e6:.1f} MB, "
          f"streamed growth {streamed['growth']/1e6:.1f} MB (bound {bound/1e6:.0f} MB)")
    # Every layer was read for the prefill and for each of the 7 decode steps.
    assert streamed["read"] >= 8 * LAYERS * LAYER_BYTES * 0.99
    assert streamed["growth"] < bound

    resident = _measure(big_checkpoint, "resident")
    print(f"resident growth {resident['growth']/1e6:.1f} MB")
    assert resident["growth"] > 0.9 * LAYERS * LAYER_BYTES
