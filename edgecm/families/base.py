"""What a model family states about itself, and the defaults that plain decoders share.

A family is everything that differs between model architectures around a
LLaMA-style decoder: how its config.json reads, what its tensors are called
in each key layout it is published in, its vision encoder, how a prompt with
an image is built and checked, the position ids the decoder sees, what its
vision side costs the planner and the patch grid ``show`` draws. The engine,
the streamer, the KV cache, CoreMatching and the planner ask the family and
never look at an architecture name themselves.

Each family is one module under ``edgecm/families/`` holding one ``Family``
subclass, listed in the registry (``edgecm/families/__init__.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from edgecm.errors import EdgecmError

if TYPE_CHECKING:
    from edgecm.checkpoint import Checkpoint
    from edgecm.config import ModelConfig
    from edgecm.prompt import Prompt

# The decoder tensors every family's checkpoint must hold for each layer (canonical names).
LAYER_TENSORS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)


class VisionEncoder(Protocol):
    """Loaded from a checkpoint, run once per request, freed with ``del``."""

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values (and, for dynamic-resolution families, each image's patch grid (N, 3)) as the
        family's processor gives them -> features (N, d_text), in prompt order."""


class Family:
    """The base family: a text-only LLaMA-style decoder with 1-D positions and no vision side."""

    name = "base"
    architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()  # recognised when config.json has no ``architectures``
    # (stored prefix, canonical replacement), first match wins: specific prefixes before generic ones.
    prefix_rules: tuple[tuple[str, str], ...] = (("model.", ""), ("", ""))
    # Without a chat template, a one-turn text prompt is the question alone (a completion prompt).
    plain_single_turn = True
    # What opens the assistant's turn in the fallback format; its first token is core-ref's reference token.
    assistant_header = "ASSISTANT:"
    # Whether a prompt may hold a video: the family's processor, encoder and positions know one.
    takes_video = False

    # -- config -------------------------------------------------------------------------------

    def parse_config(self, raw: dict[str, Any], hf: Any, generation_eos: Any, path: Path) -> "ModelConfig":
        raise NotImplementedError

    # -- tensors ------------------------------------------------------------------------------

    def canonical_name(self, stored: str) -> str:
        """A stored tensor name in any of this family's key layouts -> edgecm's canonical name."""
        for prefix, replacement in self.prefix_rules:
            if stored.startswith(prefix):
                return replacement + stored[len(prefix):]
        return stored

    def required_tensors(self, config: "ModelConfig") -> list[str]:
        text = config.text
        names = ["embed_tokens.weight", "norm.weight"]
        if not text.tie_word_embeddings:
            names.append("lm_head.weight")
        for i in range(text.num_layers):
            names += [f"layers.{i}.{n}" for n in LAYER_TENSORS]
        return names

    def expected_shapes(self, config: "ModelConfig") -> dict[str, tuple[int, ...]]:
        """Every decoder tensor's shape as config.json implies it (canonical names)."""
        t = config.text
        q, kv, d, f = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.hidden_size, t.intermediate_size
        shapes = {"embed_tokens.weight": (t.vocab_size, d), "norm.weight": (d,), "lm_head.weight": (t.vocab_size, d)}
        per_layer = {
            "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d), "self_attn.v_proj.weight": (kv, d),
            "self_attn.o_proj.weight": (d, q), "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (d,),
            "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
            "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
        }
        for i in range(t.num_layers):
            shapes.update({f"layers.{i}.{name}": shape for name, shape in per_layer.items()})
        return shapes

    # -- vision -------------------------------------------------------------------------------

    def vision_encoder(self, checkpoint: "Checkpoint", device: torch.device, dtype: torch.dtype) -> VisionEncoder:
        raise EdgecmError(f"{checkpoint.path}: a text-only model cannot take an image; drop --image")

    def vision_bytes(self, config: "ModelConfig", compute_bytes: int) -> int:
        """Bytes of the vision encoder (as loaded for one request) in the compute dtype."""
        return 0

    def vision_activation_bytes(self, config: "ModelConfig", compute_bytes: int) -> int | None:
        """Peak activations of the vision encoder on one planned image; None lets the planner estimate them."""
        return None

    def image_tokens(self, config: "ModelConfig") -> int:
        """Image tokens of one image at the processor's default size (what the planner plans for)."""
        return 0

    def patches_per_token(self, config: "ModelConfig") -> int:
        """Vision-tower positions behind one image token (what the tower's compute grows with)."""
        return 1

    # -- prompts and positions ----------------------------------------------------------------

    def fallback_prompt(self, turns: list[tuple[str, str]], image_turn: int | None, eos: str) -> str:
        """The prompt for a checkpoint without a chat template: LLaVA-1.5's ``USER: ... ASSISTANT:``."""
        if self.plain_single_turn and len(turns) == 1:
            return turns[0][1]
        parts = []
        for i, (role, text) in enumerate(turns):
            if role == "user":
                parts.append("USER: " + ("<image>\n" if i == image_turn else "") + text + " ")
            else:
                parts.append("ASSISTANT: " + text + eos)
        return "".join(parts) + self.assistant_header

    def check_prompt(self, config: "ModelConfig", prompt: "Prompt") -> None:
        """Raise if the processor's placeholder expansion disagrees with what the encoder will give."""

    def load_processor(self, directory: Path, config: "ModelConfig", min_pixels: int | None, max_pixels: int | None):
        """The checkpoint's processor (tokenizer + image processor + placeholder expansion)."""
        if min_pixels is not None or max_pixels is not None:
            raise EdgecmError(
                f"{directory}: this model's images have a fixed size; min/max pixels apply to dynamic-resolution "
                f"models (Qwen2.5-VL) only"
            )
        import transformers

        return transformers.AutoProcessor.from_pretrained(str(directory))

    def positions(self, config: "ModelConfig", prompt: "Prompt", device: torch.device) -> torch.Tensor:
        """Rotary position ids of the prompt tokens: (T,) for 1-D rope, (3, T) for multimodal rope."""
        return torch.arange(prompt.num_tokens, device=device)

    def next_position(self, config: "ModelConfig", prompt: "Prompt") -> int:
        """The rotary position of the first generated token (then +1 per token)."""
        return prompt.num_tokens

    def model_view(self, config: "ModelConfig", prompt: "Prompt", processor: Any) -> torch.Tensor:
        """The first image as the vision tower saw it, normalisation undone: (3, H, W) in [0, 1].

        This base form reads (N, 3, H, W) pixel values (a fixed-size tower such as CLIP).
        """
        image = processor.image_processor
        mean = torch.tensor(image.image_mean).view(3, 1, 1)
        std = torch.tensor(image.image_std).view(3, 1, 1)
        return (prompt.pixel_values[0].float() * std + mean).clamp(0, 1)

    def video_view(self, config: "ModelConfig", prompt: "Prompt", processor: Any) -> torch.Tensor:
        """One frame per token grid of the prompt's video, (t, 3, H, W) in [0, 1]; families with video say how."""
        raise EdgecmError("this model takes no video")

    def patch_grid(self, config: "ModelConfig", prompt: "Prompt") -> tuple[int, int]:
        """(rows, columns) of image tokens over the image as the processor resized it, for ``show``."""
        raise EdgecmError("this model has no vision side")
