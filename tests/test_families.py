"""The family registry: architectures and model_type map to a family, which owns its names and shapes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from edgecm.checkpoint import open_checkpoint
from edgecm.errors import EdgecmError
from edgecm.families import FAMILIES, family_for, supported_architectures
from edgecm.prompt import PromptBuilder
from edgecm.vision import load_image
from runtime.engine import Engine

TINY = dict(gqa=True, tied=False, layout="v5", sharded=False, chat_template=True)


def test_every_architecture_has_exactly_one_family():
    archs = supported_architectures()
    assert len(archs) == len(set(archs)) and "LlavaForConditionalGeneration" in archs
    for family in FAMILIES:
        for arch in family.architectures:
            assert family_for({"architectures": [arch]}, None) is family


def test_a_config_without_architectures_is_recognised_by_model_type(build_llava, image_path, tmp_path):
    """transformers loads such a checkpoint by model_type, and so does edgecm, with the same logits."""
    model_dir, reference = build_llava(**TINY)
    copy = tmp_path / "no-architectures"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    del config["architectures"]
    (copy / "config.json").write_text(json.dumps(config))

    checkpoint = open_checkpoint(copy)
    assert checkpoint.family.name == "llava"
    prompt = PromptBuilder(checkpoint).build("What is shown?", load_image(image_path))
    logits = Engine(checkpoint, dtype="float32").forward(prompt)
    with torch.no_grad():
        expected = reference(input_ids=prompt.input_ids, pixel_values=prompt.pixel_values).logits
    torch.testing.assert_close(logits, expected.float(), rtol=0, atol=1e-4)


def test_an_unknown_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"], "model_type": "mamba"}))
    with pytest.raises(EdgecmError) as err:
        open_checkpoint(tmp_path)
    message = str(err.value)
    assert "MambaForCausalLM" in message and "LlavaForConditionalGeneration" in message and "\n" not in message
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(EdgecmError, match="model_type='mamba'"):
        open_checkpoint(tmp_path)
