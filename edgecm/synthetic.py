"""Random LLaVA checkpoints at any shape, a published one included, written tensor by tensor.

For measuring at real scale where no real weights can be had: the memory
tests and ``bench/scale.py`` run edgecm and transformers on a 7B-shaped
LLaVA-1.5 this way. The tensors' names and shapes come from transformers'
own model class built on the meta device (so nothing is allocated), and each
tensor is drawn, converted and added to the current shard on its own, so the
writer's memory is one shard, never the model. The result is a normal
llava-hf directory: config.json, sharded safetensors with their index, and a
processor (a small byte-level BPE tokenizer with an ``<image>`` token, the
CLIP image processor at the tower's size, a LLaVA-1.5 chat template).

Random weights answer nothing: they are for time and memory, never for answers.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

CORPUS = [
    "What is shown in this image? A red square, a blue circle and a green triangle.",
    "Describe the picture in one sentence. The sky is clear and the grass is green.",
    "USER: ASSISTANT: The quick brown fox jumps over the lazy dog.",
    "Count the objects: one, two, three, four, five, six, seven, eight, nine, ten.",
    "Edge devices run vision-language models with little memory and small GPUs.",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>"]
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
WEIGHT_STD = 0.02
SHARD_BYTES = 2 * 1024**3


def small_tokenizer(corpus: list[str] = CORPUS, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on ``corpus``, with LLaMA-style BOS and an ``<image>`` token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )


def _random_tensor(name: str, shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
    if name.endswith("norm.weight") or "layer_norm" in name or name.endswith("layrnorm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    # A generator per tensor, seeded by its name: the same checkpoint whatever the shard size.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=generator) * WEIGHT_STD).to(dtype)


def write_random_llava(
    out: Path, text: dict, vision: dict, dtype: torch.dtype = torch.float16, seed: int = 0,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """A LlavaForConditionalGeneration of this ``text`` (LlamaConfig fields) and ``vision`` (CLIPVisionConfig
    fields) shape with random weights, saved into ``out`` in the llava-hf layout; returns ``out``."""
    from safetensors.torch import save_file
    from transformers import (
        CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = small_tokenizer()
    text = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, **text}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=text.get("tie_word_embeddings", False),
    )
    config.dtype = dtype
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in LlavaForConditionalGeneration(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes = {n: s for n, s in shapes.items() if not n.endswith("lm_head.weight")}
    weight_map, shard, shard_size, files = {}, {}, 0, []

    def flush() -> None:
        nonlocal shard, shard_size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        files.append(name)
        shard, shard_size = {}, 0

    for name, shape in shapes.items():
        tensor = _random_tensor(name, shape, dtype, seed)
        if shard and shard_size + tensor.nbytes > shard_bytes:
            flush()
        shard[name] = tensor
        shard_size += tensor.nbytes
    flush()
    total = sum((out / f).stat().st_size for f in files)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    config.save_pretrained(str(out))
    size = config.vision_config.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer, patch_size=config.vision_config.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(out))
    return out


def published_shape(name: str) -> tuple[dict, dict]:
    """The text and vision fields of a shape shipped in edgecm/data/shapes (e.g. "llava-1.5-7b")."""
    data = json.loads((Path(__file__).parent / "data" / "shapes" / name / "config.json").read_text())
    drop = {"model_type"}
    return ({k: v for k, v in data["text_config"].items() if k not in drop},
            {k: v for k, v in data["vision_config"].items() if k not in drop})
