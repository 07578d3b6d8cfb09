"""Plain LLaMA-architecture language models (``LlamaForCausalLM``): text only.

Stored as ``model.layers.N...``, ``model.embed_tokens``, ``model.norm`` and
``lm_head``; GGUF files of this architecture map onto the same names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgecm.config import ModelConfig, text_config_from_hf
from edgecm.families.base import Family


class LlamaFamily(Family):
    name = "llama"
    architectures = ("LlamaForCausalLM",)
    model_types = ("llama",)

    def parse_config(self, raw: dict[str, Any], hf: Any, generation_eos: Any, path: Path) -> ModelConfig:
        return ModelConfig(family=self.name, text=text_config_from_hf(hf, generation_eos))
