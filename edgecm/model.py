"""The LLaMA-family decoder layer, written as functions over explicit weights.

Weights are plain tensors in a ``LayerWeights`` record rather than
``nn.Module`` parameters: a layer's weights arrive from the streamer, are
used, and are dropped, and a sparse layer is the same record with sliced FFN
matrices. The numerics follow transformers' Llama exactly (RMSNorm in float32,
rotary embedding on absolute positions, scaled_dot_product_attention) so dense
logits match it to float32 round-off.

Rotary positions arrive as ready cos/sin tables; causal masking uses each
token's sequence index (``order``) instead. The two are the same for 1-D RoPE,
but not for multimodal RoPE, where many image tokens share a rotary position.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

import torch
import torch.nn.functional as F

from edgecm.config import TextConfig
from edgecm.errors import EdgecmError
from edgecm.kv_cache import KVCache
from edgecm.quant import QuantizedWeight, linear, quantize, weight_nbytes
from edgecm.rope import apply_rotary

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

# Called with the FFN's down_proj input h = act(gate(x)) * up(x), shape (B, T, F).
FFNObserver = Callable[[torch.Tensor], None]
# Called with the rotary-embedded queries (B, H, T, D) and the layer's keys after the cache update
# (B, Hkv, S, D): token-ranking rules that read attention (FastV) use the layer's own q and k.
AttentionObserver = Callable[[torch.Tensor, torch.Tensor], None]


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise EdgecmError(f"config.json: hidden_act '{name}' is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer. Matrices are (out_features, in_features) as in nn.Linear."""

    input_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate: torch.Tensor  # (F, d)
    up: torch.Tensor  # (F, d)
    down: torch.Tensor  # (d, F)
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    _STATE_NAMES = {
        "input_norm": "input_layernorm.weight",
        "post_norm": "post_attention_layernorm.weight",
        "q": "self_attn.q_proj.weight",
        "k": "self_attn.k_proj.weight",
        "v": "self_attn.v_proj.weight",
        "o": "self_attn.o_proj.weight",
        "q_bias": "self_attn.q_proj.bias",
        "k_bias": "self_attn.k_proj.bias",
        "v_bias": "self_attn.v_proj.bias",
        "o_bias": "self_attn.o_proj.bias",
        "gate": "mlp.gate_proj.weight",
        "up": "mlp.up_proj.weight",
        "down": "mlp.down_proj.weight",
        "gate_bias": "mlp.gate_proj.bias",
        "up_bias": "mlp.up_proj.bias",
        "down_bias": "mlp.down_proj.bias",
    }

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> "LayerWeights":
        """Build from a layer's state dict (canonical names without the ``layers.N.`` prefix)."""
        kwargs = {}
        for attr, key in cls._STATE_NAMES.items():
            tensor = state.get(key)
            if tensor is not None:
                kwargs[attr] = tensor.to(device=device, dtype=dtype)
        return cls(**kwargs)

    def state(self) -> dict[str, torch.Tensor]:
        """The inverse of ``from_state``: tensors under their checkpoint names."""
        return {key: t for attr, key in self._STATE_NAMES.items() if (t := getattr(self, attr)) is not None}

    def tensors(self) -> list:
        """Every weight present: tensors, or QuantizedWeight for quantised matrices."""
        return [t for t in (getattr(self, f.name) for f in fields(self)) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(weight_nbytes(t) for t in self.tensors())

    def copied_to(self, device: torch.device, pin: bool = False) -> "LayerWeights":
        """Own copies of every tensor on ``device`` (pinned host memory with ``pin``).

        Streamed weights live in the streamer's reusable buffers, which the next
        layer overwrites; whatever must outlive the pass is copied out with this.
        """
        def move(t):
            if not isinstance(t, torch.Tensor):
                return t  # a quantised matrix is already its own memory
            if pin:  # straight into page-locked memory, with no pageable copy in between
                pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                return pinned.copy_(t)
            return t.to(device, copy=True)

        return replace(self, **{f.name: move(t) for f in fields(self) if (t := getattr(self, f.name)) is not None})

    def quantized(self, kind: str) -> "LayerWeights":
        """The seven projection matrices quantised (NF4 or int8); norms and biases stay as they are."""
        return replace(self, **{
            name: w if isinstance(w := getattr(self, name), QuantizedWeight) else quantize(w, kind)
            for name in self.MATRICES
        })

    MATRICES = ("q", "k", "v", "o", "gate", "up", "down")

    def with_ffn_neurons(self, neurons: torch.Tensor) -> "LayerWeights":
        """The same layer with its FFN restricted to ``neurons`` (gate/up rows, down columns)."""

        def full(w):  # slices of a kept quantised layer are cut from its dequantised matrix (and quantised again)
            return w.dequantize() if isinstance(w, QuantizedWeight) else w

        return replace(
            self,
            gate=full(self.gate)[neurons].contiguous(),
            up=full(self.up)[neurons].contiguous(),
            down=full(self.down)[:, neurons].contiguous(),
            gate_bias=None if self.gate_bias is None else self.gate_bias[neurons].contiguous(),
            up_bias=None if self.up_bias is None else self.up_bias[neurons].contiguous(),
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 whatever the compute dtype, as transformers' LlamaRMSNorm does.
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def attention(
    x: torch.Tensor,
    w: LayerWeights,
    text: TextConfig,
    cos: torch.Tensor,
    sin: torch.Tensor,
    order: torch.Tensor,
    cache: KVCache,
    layer: int,
    observer: AttentionObserver | None = None,
) -> torch.Tensor:
    """Grouped-query self-attention over the cache's entries plus ``x``. x: (B, T, d).

    order: (T,) sequence indices of one sequence, or (B, T) of a batch, where a
    padded query (and an empty cache slot) carries PAD_ORDER; cos/sin: (T, D),
    or (B, 1, T, D) for a batch.
    """
    b, t, _ = x.shape
    h, hkv, d = text.num_heads, text.num_kv_heads, text.head_dim
    q = linear(x, w.q, w.q_bias).view(b, t, h, d).transpose(1, 2)  # (B, H, T, D)
    k = linear(x, w.k, w.k_bias).view(b, t, hkv, d).transpose(1, 2)  # (B, Hkv, T, D)
    v = linear(x, w.v, w.v_bias).view(b, t, hkv, d).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    had_entries = cache.length(layer) > 0
    keys, values, kv_order = cache.update(layer, k, v, order)
    if observer is not None:
        observer(q, keys)
    mask, causal = None, False
    if t > 1 and not had_entries:
        # Entries are in sequence order, even after compaction, and a batch pads each row on the right,
        # after its last real token: plain causal masking is exact for every real query.
        causal = True
    elif order.dim() == 2:
        # A batch with entries already cached: rows hold different numbers of live entries, so each
        # query sees the entries at or before its own sequence index (never an empty slot, PAD_ORDER).
        mask = (kv_order[:, None, :] <= order.to(kv_order.device)[:, :, None])[:, None]  # (B, 1, T, S)
    elif t > 1:
        mask = kv_order[0, None, :] <= order.to(kv_order.device)[:, None]  # (T, S)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=h != hkv)
    out = out.transpose(1, 2).reshape(b, t, h * d)
    return linear(out, w.o, w.o_bias)


def feed_forward(
    x: torch.Tensor, w: LayerWeights, act: Callable[[torch.Tensor], torch.Tensor], observer: FFNObserver | None = None
) -> torch.Tensor:
    """SwiGLU: down(act(gate(x)) * up(x)). ``observer`` sees the down_proj input (B, T, F)."""
    hidden = act(linear(x, w.gate, w.gate_bias)) * linear(x, w.up, w.up_bias)
    if observer is not None:
        observer(hidden)
    return linear(hidden, w.down, w.down_bias)


def decoder_layer(
    x: torch.Tensor,
    w: LayerWeights,
    text: TextConfig,
    cos: torch.Tensor,
    sin: torch.Tensor,
    order: torch.Tensor,
    cache: KVCache,
    layer: int,
    observer: FFNObserver | None = None,
    attention_observer: AttentionObserver | None = None,
) -> torch.Tensor:
    """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(.)). x: (B, T, d)."""
    normed = rms_norm(x, w.input_norm, text.rms_norm_eps)
    x = x + attention(normed, w, text, cos, sin, order, cache, layer, attention_observer)
    ffn_in = rms_norm(x, w.post_norm, text.rms_norm_eps)
    return x + feed_forward(ffn_in, w, activation(text.hidden_act), observer)
