"""LLaMA-architecture GGUF files: config from metadata, tensors dequantised one by one.

The ``gguf`` package memory-maps the file; each tensor is dequantised to
float32 only when asked for. Two conventions differ from Hugging Face
checkpoints and are undone here:
- tensor names (``blk.N.attn_q.weight`` ...), mapped to our canonical names;
- the rows of Q and K projections, which llama.cpp's converter interleaves
  per head for its rotary layout (pairs ``(2i, 2i+1)`` instead of halves
  ``(i, i + d/2)``); we restore the Hugging Face order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgecm.config import ModelConfig, RopeConfig, TextConfig
from edgecm.errors import EdgecmError

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def canonical_gguf_name(name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``layers.3.self_attn.q_proj.weight``; None for tensors we do not use."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    return None


def unpermute_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head interleaving of Q/K projection rows."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


class GGUFSource:
    """Tensor access and config for one ``.gguf`` file of a LLaMA-architecture model."""

    def __init__(self, path: Path):
        import gguf  # optional at import time: only GGUF users pay for it

        self.path = path
        try:
            self._reader = gguf.GGUFReader(str(path))
        except (ValueError, IndexError, OSError, KeyError) as exc:
            raise EdgecmError(
                f"{path}: not a readable GGUF file ({exc}); re-download it or point --model at another file"
            ) from None
        arch = self._field("general.architecture")
        if arch != "llama":
            raise EdgecmError(
                f"{path}: GGUF architecture '{arch}' is not supported; edgecm reads LLaMA-architecture GGUF files"
            )
        self._tensors = {}
        for tensor in self._reader.tensors:
            name = canonical_gguf_name(tensor.name)
            if name is not None:
                self._tensors[name] = tensor
        self.config = ModelConfig(family="llama", text=self._text_config())

    def _field(self, key: str, default=None):
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def _text_config(self) -> TextConfig:
        f = self._field
        hidden = int(f("llama.embedding_length"))
        heads = int(f("llama.attention.head_count"))
        vocab = f("llama.vocab_size") or len(self._reader.fields["tokenizer.ggml.tokens"].data)
        eos = f("tokenizer.ggml.eos_token_id")
        return TextConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(f("llama.feed_forward_length")),
            num_layers=int(f("llama.block_count")),
            num_heads=heads,
            num_kv_heads=int(f("llama.attention.head_count_kv", heads)),
            head_dim=int(f("llama.rope.dimension_count", hidden // heads)),
            rms_norm_eps=float(f("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            max_position_embeddings=int(f("llama.context_length", 2048)),
            tie_word_embeddings="lm_head.weight" not in self._tensors,
            rope=RopeConfig(theta=float(f("llama.rope.freq_base", 10000.0))),
            bos_token_id=f("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
            dtype="float32",
        )

    def names(self) -> list[str]:
        return list(self._tensors)

    def nbytes(self, name: str) -> int:
        """Bytes of the dequantised float32 tensor (what the engine will hold)."""
        return int(self._tensors[name].n_elements) * 4

    def shape(self, name: str) -> tuple[int, ...]:
        """The logical shape, rows first (GGUF stores dimensions innermost first)."""
        return tuple(int(n) for n in reversed(self._tensors[name].shape))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        import gguf

        text = self.config.text
        out = {}
        for name in names:
            tensor = self._tensors[name]
            try:
                array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            except (ValueError, NotImplementedError) as exc:
                raise EdgecmError(f"{self.path}: cannot dequantise {tensor.name} ({exc}); use another GGUF file") from None
            # Copy: unquantised tensors come back as views of the read-only memory map.
            weight = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
            if name.endswith("q_proj.weight"):
                weight = unpermute_rotary_rows(weight, text.num_heads)
            elif name.endswith("k_proj.weight"):
                weight = unpermute_rotary_rows(weight, text.num_kv_heads)
            out[name] = weight
        return out
