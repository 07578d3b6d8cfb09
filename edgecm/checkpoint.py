"""Open a checkpoint on disk and read its tensors lazily, under one canonical naming.

Each family (edgecm.families) maps the names of its key layouts onto these.
Canonical names (what the rest of edgecm uses, whatever the file says):
    embed_tokens.weight, norm.weight, lm_head.weight
    layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias}
    layers.{i}.mlp.{gate,up,down}_proj.{weight,bias}
    layers.{i}.{input_layernorm,post_attention_layernorm}.weight
    vision_tower.<CLIPVisionModel state-dict name, without a ``vision_model.`` wrapper>
    multi_modal_projector.linear_{1,2}.{weight,bias}
    visual.<Qwen2_5_VisionTransformerPretrainedModel state-dict name>

Accepted layouts: llava-hf as saved by transformers 4.x
(``language_model.model.layers.N``), by transformers 5.x
(``model.language_model.layers.N``, ``model.vision_tower``, ``lm_head``),
Qwen2.5-VL as published (``model.layers.N``, ``visual.*``) and as the 5.x
module tree (``model.language_model.*``, ``model.visual.*``), plain
``LlamaForCausalLM`` (``model.layers.N``), and GGUF files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from edgecm.config import ModelConfig, load_model_config
from edgecm.errors import EdgecmError
from edgecm.families import Family, family_named
from edgecm.safetensors_source import TensorInfo, read_tensors, scan_directory

class _SafetensorsSource:
    def __init__(self, model_dir: Path, family: Family):
        self._infos: dict[str, TensorInfo] = {
            family.canonical_name(k): v for k, v in scan_directory(model_dir).items()
        }

    def names(self) -> list[str]:
        return list(self._infos)

    def nbytes(self, name: str) -> int:
        return self._infos[name].nbytes

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._infos[name].shape)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        infos = [self._infos[n] for n in names]
        by_key = read_tensors(infos)
        return {n: by_key[info.key] for n, info in zip(names, infos)}


@dataclass(frozen=True)
class TokenizerSource:
    """Where the tokenizer/processor files are: a directory, plus a GGUF file name for GGUF models."""

    directory: Path
    gguf_file: str | None = None


class Checkpoint:
    """A model on disk: its config, and per-layer lazy tensor reads."""

    def __init__(self, path: Path, config: ModelConfig, source, tokenizer: TokenizerSource):
        self.path = path
        self.config = config
        self._source = source
        self.tokenizer_source = tokenizer
        self.family = family_named(config.family)
        self._names = set(source.names())
        self._check_complete()
        self._check_shapes()

    def _check_shapes(self) -> None:
        """Every tensor whose shape config.json implies has that shape (a mismatched download fails here)."""
        for name, expected in self.family.expected_shapes(self.config).items():
            if name not in self._names:
                continue
            found = tuple(self._source.shape(name))
            if found != tuple(expected):
                raise EdgecmError(
                    f"{self.path}: tensor {name} has shape {list(found)} but config.json implies {list(expected)}; "
                    f"the weights and config.json come from different models or a truncated download; re-download it"
                )

    def _check_complete(self) -> None:
        required = self.family.required_tensors(self.config)
        missing = [n for n in required if n not in self._names]
        if missing:
            raise EdgecmError(
                f"{self.path}: {len(missing)} weights missing (first: {missing[0]}); the checkpoint is incomplete "
                f"or its shards do not match config.json; re-download it"
            )

    def nbytes(self, name: str) -> int:
        return self._source.nbytes(name)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return self._source.read(names)

    def layer_names(self, index: int) -> list[str]:
        prefix = f"layers.{index}."
        return sorted(n for n in self._names if n.startswith(prefix))

    def read_layer(self, index: int) -> dict[str, torch.Tensor]:
        """One decoder layer's tensors, keyed without the ``layers.{index}.`` prefix."""
        prefix = f"layers.{index}."
        return {n[len(prefix):]: t for n, t in self.read(self.layer_names(index)).items()}

    def read_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor under ``prefix`` (e.g. ``vision_tower.``), keyed without it."""
        names = sorted(n for n in self._names if n.startswith(prefix))
        return {n[len(prefix):]: t for n, t in self.read(names).items()}

    def layer_nbytes(self, index: int) -> int:
        return sum(self.nbytes(n) for n in self.layer_names(index))


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint directory (safetensors) or a ``.gguf`` file; validate before any tensor is read."""
    path = Path(path).expanduser()
    if not path.exists():
        raise EdgecmError(f"{path}: no such file or directory; pass --model a checkpoint directory or a .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise EdgecmError(f"{path}: not a checkpoint; pass --model a checkpoint directory or a .gguf file")
        return _open_gguf(path)
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _open_gguf(ggufs[0])
    config = load_model_config(path)
    source = _SafetensorsSource(path, family_named(config.family))
    return Checkpoint(path, config, source, TokenizerSource(path))


def _open_gguf(path: Path) -> Checkpoint:
    from edgecm.gguf_source import GGUFSource

    source = GGUFSource(path)
    return Checkpoint(path, source.config, source, TokenizerSource(path.parent, gguf_file=path.name))
