"""Tiny random checkpoints in the real transformers architectures, saved the way the hub ships them.

Each builder returns the transformers model it saved (the reference) and
writes config.json, safetensors weights (single file or shards, transformers
4.x or 5.x key layout) and tokenizer/processor files into a directory, so the
whole loading path of edgecm runs on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgecm.synthetic import CORPUS, LLAVA_CHAT_TEMPLATE, small_tokenizer  # noqa: F401  (re-exported)


def make_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences, with LLaMA-style BOS and an <image> token."""
    return small_tokenizer(CORPUS)


def _text_config(vocab: int, gqa: bool, tied: bool, layers: int = 3, **extra):
    from transformers import LlamaConfig

    options = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        initializer_range=0.08,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaConfig(**{**options, **extra})


def _rewrite_v4_layout(model_dir: Path) -> None:
    """Rename keys in every shard (and the index) to the transformers 4.x llava layout."""

    def old(name: str) -> str:
        for new, legacy in (
            ("model.language_model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."),
            ("model.vision_tower.", "vision_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
        ):
            if name.startswith(new):
                return legacy + name[len(new):]
        return name

    for shard in model_dir.glob("*.safetensors"):
        tensors = load_file(str(shard))
        save_file({old(k): v.contiguous() for k, v in tensors.items()}, str(shard), metadata={"format": "pt"})
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {old(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))


def tiny_llava(
    out: Path,
    *,
    gqa: bool = True,
    tied: bool = False,
    layout: str = "v5",
    sharded: bool = False,
    chat_template: bool = True,
    seed: int = 0,
):
    """Save a tiny LlavaForConditionalGeneration into ``out``; return the model (eval, float32)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
        initializer_range=0.08,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(len(tokenizer), gqa, tied),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=tied,
    )
    model = LlavaForConditionalGeneration(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), max_shard_size="150KB" if sharded else "10GB")
    if layout == "v4":
        _rewrite_v4_layout(out)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE if chat_template else None,
    )
    processor.save_pretrained(str(out))
    return model


def tiny_llama(out: Path, *, gqa: bool = True, tied: bool = True, seed: int = 0, **text_extra):
    """Save a tiny LlamaForCausalLM (text only) into ``out``; return the model (eval, float32)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    model = LlamaForCausalLM(_text_config(len(tokenizer), gqa, tied, **text_extra)).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return model


def tiny_parrot(out: Path, text: str):
    """Save a tiny Llama whose every answer is the one token spelling ``text``, over and over.

    Its layers write nothing into the residual stream (o_proj and down_proj are zero) and every
    token embeds alike, so the last hidden state is one fixed vector whatever the prompt, and
    the LM head scores only that token above zero. For tests of what the CLI does with text.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    (token,) = tokenizer.encode(text, add_special_tokens=False)
    model = LlamaForCausalLM(_text_config(len(tokenizer), gqa=True, tied=False)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[token] = 1.0
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return model


def write_test_image(path: Path, size: int = 48) -> Path:
    """A small synthetic picture (gradient with a square), made here, no third-party content."""
    from PIL import Image

    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):
        for x in range(size):
            inside = size // 4 <= x < 3 * size // 4 and size // 4 <= y < 3 * size // 4
            px[x, y] = (255, 40, 40) if inside else (x * 255 // size, y * 255 // size, 128)
    img.save(path)
    return path


QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen2.5-VL's ChatML template, without the default system turn (the tiny model has no use for it).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# 8-pixel patches merged 2x2: an image costs one token per 16x16 pixels, between 4 and 24 tokens.
QWEN_PATCH, QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 8, 16 * 16 * 4, 16 * 16 * 24


def make_qwen_tokenizer():
    """A byte-level BPE tokenizer with Qwen2.5-VL's special tokens (no BOS, like Qwen's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=QWEN_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def _flatten_qwen_config(model_dir: Path) -> None:
    """Rewrite config.json the way published Qwen2.5-VL checkpoints ship it: text fields at the top,
    ``rope_scaling`` of type ``mrope``, a ``vision_config`` without ``model_type``."""
    path = model_dir / "config.json"
    nested = json.loads(path.read_text())
    text = nested.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**{k: v for k, v in text.items() if k not in ("model_type", "layer_types", "dtype")}, **nested}
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat["vision_config"] = {k: v for k, v in nested["vision_config"].items() if k not in ("model_type", "rope_parameters")}
    flat["torch_dtype"] = "float32"
    path.write_text(json.dumps(flat, indent=2))


def tiny_qwen2_5_vl(
    out: Path, *, tied: bool = False, layout: str = "published", sharded: bool = False, seed: int = 0
):
    """Save a tiny Qwen2_5_VLForConditionalGeneration into ``out``; return the model (eval, float32).

    ``layout="published"``: flat config.json, ``model.layers`` / ``visual.*`` keys, preprocessor_config.json
    and chat_template.json, as on the hub; ``layout="v5"``: nested config.json, transformers 5.x
    module-tree keys (``model.language_model``), processor_config.json and chat_template.jinja.
    The tower has 2 blocks, the first windowed (2x2 merged patches per window), the second global.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    tokenizer = make_qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        initializer_range=0.08, bos_token_id=None, eos_token_id=ids("<|im_end|>"), tie_word_embeddings=tied,
    )
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=QWEN_PATCH, temporal_patch_size=2,
        spatial_merge_size=2, window_size=32, out_hidden_size=64, fullatt_block_indexes=[1], tokens_per_second=2,
        initializer_range=0.08,
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=tied,
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    # Random biases: a zero bias would hide a missing one.
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.08)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(
        str(out), max_shard_size="150KB" if sharded else "10GB", save_original_format=layout == "published"
    )
    if layout == "published":
        _flatten_qwen_config(out)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=QWEN_PATCH, temporal_patch_size=2, merge_size=2, min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS
    )
    image_processor.save_pretrained(str(out))
    if layout == "published":
        _publish_qwen_processor_files(out, tokenizer)
    else:  # transformers 5.x processors nest the image processor's settings in processor_config.json
        image_config = json.loads((out / "preprocessor_config.json").read_text())
        (out / "preprocessor_config.json").unlink()
        nested = {"image_processor": image_config, "processor_class": "Qwen2_5_VLProcessor"}
        (out / "processor_config.json").write_text(json.dumps(nested, indent=2))
        tokenizer.chat_template = QWEN_CHAT_TEMPLATE
        tokenizer.save_pretrained(str(out))
    return model


def _publish_qwen_processor_files(model_dir: Path, tokenizer) -> None:
    """Processor files as the hub ships Qwen2.5-VL: min_pixels/max_pixels at the top of
    preprocessor_config.json and the chat template in chat_template.json, not in the tokenizer."""
    path = model_dir / "preprocessor_config.json"
    config = json.loads(path.read_text())
    size = config.pop("size")
    config.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"], processor_class="Qwen2_5_VLProcessor")
    path.write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(model_dir))
    (model_dir / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_CHAT_TEMPLATE}))


def write_wide_image(path: Path, width: int = 96, height: int = 48) -> Path:
    """A non-square synthetic picture: horizontal bands and a circle."""
    from PIL import Image

    img = Image.new("RGB", (width, height))
    px = img.load()
    for y in range(height):
        for x in range(width):
            inside = (x - width // 3) ** 2 + (y - height // 2) ** 2 < (height // 3) ** 2
            px[x, y] = (30, 200, 60) if inside else ((y * 7) % 256, x * 255 // width, 90)
    img.save(path)
    return path


def write_test_frames(folder: Path, count: int = 4, width: int = 64, height: int = 48) -> Path:
    """A few synthetic frames of a square moving left to right, named in playing order."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = Image.new("RGB", (width, height), (20, 30 + 40 * i, 120))
        draw = ImageDraw.Draw(img)
        x = 4 + i * (width - 24) // max(count - 1, 1)
        draw.rectangle((x, height // 3, x + 16, height // 3 + 16), fill=(250, 220, 40))
        img.save(folder / f"frame_{i:03d}.png")
    return folder


def write_test_video(path: Path, frames_dir: Path, fps: int = 2, codec: str = "ffv1") -> Path:
    """The frames of ``frames_dir`` encoded as one video file at ``fps`` (FFV1 in Matroska: lossless RGB,
    so decoding gives the frames back bit for bit)."""
    import av
    import numpy as np
    from PIL import Image

    frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(frames_dir.iterdir())]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
