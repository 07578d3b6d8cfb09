"""An independent reference for token pruning: a dense forward with the dropped tokens masked out.

Shared by every family's pruning test: positions come from the family (1-D or
3-D rotary ids), causal masking follows sequence order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgecm.model import activation, rms_norm
from edgecm.rope import apply_rotary


def masked_reference(engine, prompt, generated: list[int], dropped: torch.Tensor, k: int,
                     keep_early_kv: bool = False, stages: list[tuple[int, torch.Tensor]] | None = None,
                     ffn_neurons: list[torch.Tensor | None] | None = None, capture: list | None = None) -> torch.Tensor:
    """Dense forward over prompt + generated tokens at their original rotary positions, with the dropped
    image tokens masked out of attention from layer K on (and, for a core-token-only cache, out of the
    generated tokens' attention in layers 0..K-1 too). Returns the logits predicting each generated token.

    ``stages`` ((K, dropped rows) pairs) describes pruning in several stages instead of one.
    ``ffn_neurons`` (per layer, None for dense) zeroes every other FFN neuron in the generated tokens' rows:
    a sparse decode written as a masked dense one. ``capture`` receives each layer's FFN activations h
    (the down_proj input) of the prompt rows, (T, F)."""
    text = engine.text
    t = prompt.num_tokens
    hidden = torch.cat([engine.embed(prompt), F.embedding(torch.tensor([generated[:-1]]), engine.embed_tokens)], dim=1)
    length = hidden.shape[1]
    prompt_positions = engine.family.positions(engine.config, prompt, torch.device("cpu"))  # (T,) or (3, T)
    start = engine.family.next_position(engine.config, prompt)
    decode_positions = torch.arange(start, start + length - t).expand(*prompt_positions.shape[:-1], -1)
    positions = torch.cat([prompt_positions, decode_positions], dim=-1)
    cos, sin = engine.rotary.cos_sin(positions, engine.dtype)
    causal = torch.ones(length, length, dtype=torch.bool).tril()  # sequence order, not rotary ids
    stages = stages if stages is not None else [(k, dropped)]
    gone_from = torch.full((length,), text.num_layers)  # the first layer that no longer sees each row
    for first, rows in stages:
        gone_from[rows] = torch.minimum(gone_from[rows], torch.tensor(first))
    is_gone = gone_from < text.num_layers
    h, hkv, d = text.num_heads, text.num_kv_heads, text.head_dim
    for layer in range(text.num_layers):
        w = engine.streamer.load(layer)
        allowed = causal.clone()
        allowed[:, gone_from <= layer] = False
        if not keep_early_kv:
            allowed[t:, is_gone] = False
        allowed |= torch.eye(length, dtype=torch.bool)  # a dropped query still needs one key; its output is unused
        x = rms_norm(hidden, w.input_norm, text.rms_norm_eps)
        q = F.linear(x, w.q, w.q_bias).view(1, length, h, d).transpose(1, 2)
        kk = F.linear(x, w.k, w.k_bias).view(1, length, hkv, d).transpose(1, 2)
        v = F.linear(x, w.v, w.v_bias).view(1, length, hkv, d).transpose(1, 2)
        q, kk = apply_rotary(q, cos, sin), apply_rotary(kk, cos, sin)
        att = F.scaled_dot_product_attention(q, kk, v, attn_mask=allowed, enable_gqa=True)
        hidden = hidden + F.linear(att.transpose(1, 2).reshape(1, length, h * d), w.o, w.o_bias)
        ffn_in = rms_norm(hidden, w.post_norm, text.rms_norm_eps)
        act = activation(text.hidden_act)(F.linear(ffn_in, w.gate, w.gate_bias)) * F.linear(ffn_in, w.up, w.up_bias)
        if capture is not None:
            capture.append(act[0, :t].clone())
        if ffn_neurons is not None and ffn_neurons[layer] is not None:
            keep = torch.zeros(act.shape[-1])
            keep[ffn_neurons[layer]] = 1.0
            act[:, t:] = act[:, t:] * keep  # the prompt ran every neuron; decode steps use the slice
        hidden = hidden + F.linear(act, w.down, w.down_bias)
    return engine.head(hidden)[0, t - 1 :]
