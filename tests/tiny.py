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

CORPUS = [
    "What is shown in this image? A red square, a blue circle and a green triangle.",
    "Describe the picture in one sentence. The sky is clear and the grass is green.",
    "USER: ASSISTANT: The quick brown fox jumps over the lazy dog.",
    "Count the objects: one, two, three, four, five, six, seven, eight, nine, ten.",
    "Edge devices run vision-language models with little memory and small GPUs.",
]

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def make_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences, with LLaMA-style BOS and an <image> token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<image>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )


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
