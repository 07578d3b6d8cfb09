"""Frozen configuration parsed from a checkpoint's config.json (or GGUF metadata).

The family (edgecm.families) reads its own parts; this module holds the
shared records and the decoder's config, which every family uses.

transformers does the parsing of config.json itself (``AutoConfig``): it knows
every spelling that has been published (``rope_scaling`` vs ``rope_parameters``,
``image_token_index`` vs ``image_token_id``, partial ``text_config`` blocks
that rely on LlamaConfig defaults). We copy what the engine needs into frozen
dataclasses, so the rest of edgecm never touches a transformers config object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecm.errors import EdgecmError

SUPPORTED_TEXT_MODEL_TYPES = ("llama",)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, in transformers' ``rope_parameters`` vocabulary."""

    rope_type: str = "default"
    theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    # yarn / longrope
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    # Multimodal RoPE (Qwen2.5-VL): how many of the head_dim/2 frequencies follow the temporal,
    # height and width position ids; None for 1-D RoPE.
    mrope_section: tuple[int, ...] | None = None

    @staticmethod
    def from_dict(params: dict[str, Any] | None, default_theta: float = 10000.0) -> "RopeConfig":
        params = dict(params or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "mrope":  # published Qwen2-VL configs; transformers reads it as default + mrope_section
            rope_type = "default"

        def opt_float(key: str) -> float | None:
            return None if params.get(key) is None else float(params[key])

        def opt_tuple(key: str) -> tuple[float, ...] | None:
            return None if params.get(key) is None else tuple(float(v) for v in params[key])

        omp = params.get("original_max_position_embeddings")
        return RopeConfig(
            rope_type=rope_type,
            theta=float(params.get("rope_theta", default_theta)),
            partial_rotary_factor=float(params.get("partial_rotary_factor", 1.0)),
            factor=opt_float("factor"),
            original_max_position_embeddings=None if omp is None else int(omp),
            low_freq_factor=opt_float("low_freq_factor"),
            high_freq_factor=opt_float("high_freq_factor"),
            attention_factor=opt_float("attention_factor"),
            beta_fast=opt_float("beta_fast"),
            beta_slow=opt_float("beta_slow"),
            mscale=opt_float("mscale"),
            mscale_all_dim=opt_float("mscale_all_dim"),
            truncate=bool(params.get("truncate", True)),
            short_factor=opt_tuple("short_factor"),
            long_factor=opt_tuple("long_factor"),
            mrope_section=None if params.get("mrope_section") is None else tuple(int(v) for v in params["mrope_section"]),
        )


@dataclass(frozen=True)
class TextConfig:
    """The LLaMA-family decoder: every shape the engine and the planner need."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig = field(default_factory=RopeConfig)
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise EdgecmError(
                f"config: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}; fix config.json"
            )


@dataclass(frozen=True)
class ModelConfig:
    """A whole checkpoint: its family's name (see edgecm.families), the decoder, and the vision side.

    ``vision`` is the family's own frozen vision config (None for text-only models).
    """

    family: str
    text: TextConfig
    vision: Any = None
    image_token_id: int | None = None

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None


def _eos_ids(*values: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for value in values:
        if value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if int(v) not in ids:
                ids.append(int(v))
    return tuple(ids)


def text_config_from_hf(
    cfg: Any, extra_eos: Any = None, model_types: tuple[str, ...] = SUPPORTED_TEXT_MODEL_TYPES
) -> TextConfig:
    """Copy a transformers LlamaConfig (or a family's LLaMA-shaped text config of ``model_types``) into a TextConfig."""
    model_type = getattr(cfg, "model_type", "llama")
    if model_type not in model_types:
        raise EdgecmError(
            f"config.json: language model type '{model_type}' is not supported; "
            f"edgecm runs LLaMA-family decoders ({', '.join(model_types)})"
        )
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope_params = getattr(cfg, "rope_parameters", None)
    if rope_params is None:  # transformers 4.x attribute names
        rope_params = dict(getattr(cfg, "rope_scaling", None) or {})
        rope_params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return TextConfig(
        vocab_size=int(cfg.vocab_size),
        hidden_size=int(cfg.hidden_size),
        intermediate_size=int(cfg.intermediate_size),
        num_layers=int(cfg.num_hidden_layers),
        num_heads=int(cfg.num_attention_heads),
        num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.rms_norm_eps),
        max_position_embeddings=int(cfg.max_position_embeddings),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        rope=RopeConfig.from_dict(rope_params),
        hidden_act=str(getattr(cfg, "hidden_act", "silu")),
        attention_bias=bool(getattr(cfg, "attention_bias", False)),
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        bos_token_id=getattr(cfg, "bos_token_id", None),
        eos_token_ids=_eos_ids(getattr(cfg, "eos_token_id", None), extra_eos),
        dtype=_dtype_name(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)),
    )


def _dtype_name(dtype: Any) -> str:
    if dtype is None:
        return "float32"
    return str(dtype).replace("torch.", "")


def load_model_config(model_dir: Path) -> ModelConfig:
    """Parse ``model_dir/config.json`` (and generation_config.json when present)."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise EdgecmError(
            f"{path}: no config.json; point --model at a checkpoint directory "
            f"(llava-hf, Qwen2.5-VL or Llama layout) that contains config.json"
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgecmError(f"{path}: not valid JSON ({exc}); re-copy the checkpoint's config.json") from None
    from edgecm.families import family_for

    family = family_for(raw, path)

    import transformers  # heavy import, only once a checkpoint is actually opened

    gen_eos = None
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        try:
            gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError):
            gen_eos = None  # generation_config.json is optional metadata; config.json decides
    try:
        hf = transformers.AutoConfig.for_model(**raw) if "model_type" in raw else None
    except (ValueError, TypeError, KeyError) as exc:
        raise EdgecmError(f"{path}: transformers cannot parse it ({exc}); fix or re-copy config.json") from None
    if hf is None:
        raise EdgecmError(f"{path}: no model_type; re-copy the checkpoint's config.json")

    return family.parse_config(raw, hf, gen_eos, path)
