"""Small pieces checked on hand-made inputs."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from edgecm.families import family_named
from edgecm.errors import EdgecmError
from edgecm.kv_cache import KVCache
from edgecm.safetensors_source import read_header
from edgecm.sampling import SamplingSettings, next_token


@pytest.mark.parametrize(
    "family, stored, canonical",
    [
        ("llava", "language_model.model.layers.3.mlp.up_proj.weight", "layers.3.mlp.up_proj.weight"),
        ("llava", "model.language_model.layers.3.mlp.up_proj.weight", "layers.3.mlp.up_proj.weight"),
        ("llama", "model.layers.3.mlp.up_proj.weight", "layers.3.mlp.up_proj.weight"),
        ("llava", "language_model.lm_head.weight", "lm_head.weight"),
        ("llava", "lm_head.weight", "lm_head.weight"),
        ("llama", "lm_head.weight", "lm_head.weight"),
        ("llava", "language_model.model.embed_tokens.weight", "embed_tokens.weight"),
        ("llava", "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
         "vision_tower.encoder.layers.0.mlp.fc1.weight"),
        ("llava", "model.vision_tower.encoder.layers.0.mlp.fc1.weight", "vision_tower.encoder.layers.0.mlp.fc1.weight"),
        ("qwen2_5_vl", "model.layers.3.self_attn.q_proj.bias", "layers.3.self_attn.q_proj.bias"),
        ("qwen2_5_vl", "model.language_model.layers.3.self_attn.q_proj.bias", "layers.3.self_attn.q_proj.bias"),
        ("qwen2_5_vl", "model.embed_tokens.weight", "embed_tokens.weight"),
        ("qwen2_5_vl", "model.language_model.norm.weight", "norm.weight"),
        ("qwen2_5_vl", "lm_head.weight", "lm_head.weight"),
        ("qwen2_5_vl", "visual.blocks.0.attn.qkv.weight", "visual.blocks.0.attn.qkv.weight"),
        ("qwen2_5_vl", "model.visual.merger.mlp.0.weight", "visual.merger.mlp.0.weight"),
        ("llava", "multi_modal_projector.linear_1.bias", "multi_modal_projector.linear_1.bias"),
        ("llava", "model.multi_modal_projector.linear_1.bias", "multi_modal_projector.linear_1.bias"),
    ],
)
def test_canonical_names_for_every_layout(family, stored, canonical):
    assert family_named(family).canonical_name(stored) == canonical


def test_kv_cache_appends_grows_and_compacts():
    cache = KVCache(num_layers=1, reserve_tokens=2)
    k = torch.arange(5.0).view(1, 1, 5, 1)
    keys, values, pos = cache.update(0, k, -k, torch.arange(5))
    assert keys.flatten().tolist() == [0, 1, 2, 3, 4] and pos.tolist() == [[0, 1, 2, 3, 4]]
    for step in range(5, 12):  # past the reserved room: the buffers regrow and keep their contents
        keys, values, pos = cache.update(0, torch.full((1, 1, 1, 1), float(step)), torch.zeros(1, 1, 1, 1), torch.tensor([step]))
    assert keys.flatten().tolist() == list(range(12)) and cache.length(0) == 12
    cache.prune(0, torch.tensor([0, 3, 11]))
    assert cache.length(0) == 3
    assert cache.order(0).tolist() == [[0, 3, 11]]  # survivors keep their sequence indices
    assert cache.nbytes() == 2 * 3 * 4
    keys, _, pos = cache.update(0, torch.full((1, 1, 1, 1), 12.0), torch.zeros(1, 1, 1, 1), torch.tensor([12]))
    assert keys.flatten().tolist() == [0, 3, 11, 12] and pos.tolist() == [[0, 3, 11, 12]]


def test_kv_cache_rows_compact_apart_and_leave_the_batch():
    from edgecm.kv_cache import PAD_ORDER

    cache = KVCache(num_layers=1)
    k = torch.arange(10.0).view(2, 1, 5, 1)  # row 0: 0..4, row 1: 5..9
    cache.update(0, k, k, torch.arange(5))
    cache.prune_rows(0, [torch.tensor([0, 2, 4]), torch.tensor([1])])
    assert cache.length(0) == 3 and cache.live(0) == [3, 1]
    assert cache.order(0).tolist() == [[0, 2, 4], [1, PAD_ORDER, PAD_ORDER]]
    assert cache.nbytes() == 2 * 4 * (3 + 1)
    keys, _, order = cache.update(0, torch.tensor([[[[20.0]]], [[[21.0]]]]), torch.zeros(2, 1, 1, 1),
                                  torch.tensor([[5], [5]]))
    assert keys[0, 0, :, 0].tolist() == [0, 2, 4, 20] and keys[1, 0, [0, 3], 0].tolist() == [6, 21]
    assert order[1].tolist() == [1, PAD_ORDER, PAD_ORDER, 5]
    cache.select_rows(torch.tensor([1]))
    assert cache.live(0) == [2] and cache.order(0).tolist() == [[1, PAD_ORDER, PAD_ORDER, 5]]


def test_kv_cache_keeps_entries_by_sequence_index():
    """Each row keeps the entries whose sequence index survives, wherever they sit in the buffer."""
    from edgecm.kv_cache import PAD_ORDER

    cache = KVCache(num_layers=1)
    k = torch.arange(10.0).view(2, 1, 5, 1)
    cache.update(0, k, k, torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 7, 9]]))
    cache.keep_orders(0, [torch.tensor([4, 1, 8]), torch.tensor([9, 0])])  # 8 is in no entry: ignored
    assert cache.order(0).tolist() == [[1, 4], [0, 9]]
    assert cache.layers[0].keys[:, 0, :2, 0].tolist() == [[1.0, 4.0], [5.0, 9.0]]
    cache.keep_orders(0, [torch.tensor([4]), torch.tensor([], dtype=torch.long)])
    assert cache.order(0).tolist() == [[4], [PAD_ORDER]] and cache.live(0) == [1, 0]


def test_multimodal_rope_matches_transformers():
    """cos/sin for 3-D position ids equal Qwen2.5-VL's rotary embedding (and 1-D ids act as three equal rows)."""
    from transformers import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    from edgecm.config import RopeConfig, TextConfig
    from edgecm.rope import Rotary

    rope = {"rope_type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    hf = Qwen2_5_VLTextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_scaling=dict(rope))
    text = TextConfig(
        vocab_size=10, hidden_size=64, intermediate_size=8, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
        rms_norm_eps=1e-6, max_position_embeddings=128, tie_word_embeddings=True, rope=RopeConfig.from_dict(rope),
    )
    positions = torch.tensor([[0, 1, 2, 2, 2, 2, 4], [0, 1, 2, 2, 3, 3, 4], [0, 1, 2, 3, 2, 3, 4]])  # (3, T)
    ref_cos, ref_sin = Qwen2_5_VLRotaryEmbedding(hf)(torch.zeros(1), positions[:, None, :])
    cos, sin = Rotary(text, torch.device("cpu")).cos_sin(positions, torch.float32)
    assert torch.equal(cos, ref_cos[0]) and torch.equal(sin, ref_sin[0])
    text_cos, _ = Rotary(text, torch.device("cpu")).cos_sin(torch.arange(3), torch.float32)
    assert torch.equal(text_cos, cos[:3])


def test_greedy_and_top_p_sampling():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert next_token(logits, SamplingSettings(), None) == 1
    # top_p small enough that only the most likely token survives: sampling is then deterministic.
    gen = torch.Generator().manual_seed(0)
    picks = {next_token(logits, SamplingSettings(temperature=1.0, top_p=0.3), gen) for _ in range(50)}
    assert picks == {1}
    picks = {next_token(logits, SamplingSettings(temperature=1.0, top_p=0.99), gen) for _ in range(200)}
    assert picks == {1, 2}


def _write(path, header: dict, data_len: int):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)


def test_safetensors_header_validation(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    good = tmp_path / "good.safetensors"
    _write(good, header, 16)
    assert "a" in read_header(good)
    short = tmp_path / "short.safetensors"
    _write(short, header, 10)
    with pytest.raises(EdgecmError, match="short.safetensors: truncated"):
        read_header(short)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{{{{{")
    with pytest.raises(EdgecmError, match="not a safetensors file"):
        read_header(garbage)
    with pytest.raises(EdgecmError, match="missing"):
        read_header(tmp_path / "absent.safetensors")
