"""LLaVA (``LlavaForConditionalGeneration``): a CLIP tower and a two-layer projector before a LLaMA decoder.

Key layouts: transformers 4.x (``language_model.model.layers.N``,
``language_model.lm_head``, ``vision_tower.vision_model.*``) and 5.x
(``model.language_model.layers.N``, ``model.vision_tower.*``, ``lm_head``).
The processor expands ``<image>`` into one placeholder token per image
feature; positions are 1-D (``0..T-1``).

The tower is transformers' CLIPVisionModel, built on the meta device (no
random initialisation of ~300M parameters that are overwritten at once) and
given the checkpoint's weights. Encoder layers after the deepest feature
layer LLaVA reads are never built: LLaVA-1.5 reads layer -2, so the last
layer would be computed and thrown away.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from edgecm.config import ModelConfig, text_config_from_hf
from edgecm.errors import EdgecmError
from edgecm.families.base import Family
from edgecm.model import ACTIVATIONS

if TYPE_CHECKING:
    from edgecm.checkpoint import Checkpoint
    from edgecm.prompt import Prompt


@dataclass(frozen=True)
class ClipVisionConfig:
    """The CLIP tower and the LLaVA projector in front of the decoder."""

    clip: dict[str, Any]  # a CLIPVisionConfig as a dict, handed back to transformers
    feature_layer: int | tuple[int, ...] = -2
    select_strategy: str = "default"  # "default" drops the CLS token, "full" keeps it
    projector_act: str = "gelu"
    projector_bias: bool = True

    @property
    def image_size(self) -> int:
        return int(self.clip["image_size"])

    @property
    def patch_size(self) -> int:
        return int(self.clip["patch_size"])

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_image(self) -> int:
        return self.num_patches + (1 if self.select_strategy == "full" else 0)


def feature_layers(vision: ClipVisionConfig) -> tuple[int, tuple[int, ...]]:
    """(encoder layers to build, hidden_states indices to read) for the configured feature layer(s)."""
    total = int(vision.clip["num_hidden_layers"])
    requested = vision.feature_layer if isinstance(vision.feature_layer, tuple) else (vision.feature_layer,)
    # hidden_states has total + 1 entries (embeddings first); negative indices count from its end.
    indices = tuple(i if i >= 0 else total + 1 + i for i in requested)
    return max(indices), indices


def clip_params(clip: dict, layers: int) -> int:
    """Parameters of a CLIP tower cut after ``layers`` encoder layers."""
    h, i, p = int(clip["hidden_size"]), int(clip["intermediate_size"]), int(clip["patch_size"])
    positions = (int(clip["image_size"]) // p) ** 2 + 1
    embeddings = 3 * p * p * h + h + positions * h
    per_layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
    return embeddings + 2 * h + layers * per_layer + 2 * h


class ClipEncoder:
    """CLIP tower + projector for one checkpoint; load, encode, and free with ``del``."""

    def __init__(self, checkpoint: "Checkpoint", device: torch.device, dtype: torch.dtype):
        from transformers import CLIPVisionConfig, CLIPVisionModel

        vision: ClipVisionConfig = checkpoint.config.vision
        self.vision = vision
        layers, self.indices = feature_layers(vision)
        clip_cfg = CLIPVisionConfig(**{**vision.clip, "num_hidden_layers": layers})
        with torch.device("meta"):
            tower = CLIPVisionModel(clip_cfg)
        state = checkpoint.read_prefix("vision_tower.")
        keep = {k: v for k, v in state.items() if not _is_unused_layer(k, layers)}
        # Older transformers wrap the CLIP modules in ``vision_model``; match whichever this one builds.
        wrapper = getattr(tower, "vision_model", None)
        if wrapper is not None:
            keep = {f"vision_model.{k}": v for k, v in keep.items()}
        try:
            tower.load_state_dict(keep, strict=True, assign=True)
        except RuntimeError as exc:  # missing, unexpected or mis-shaped tower tensors
            first = str(exc).strip().splitlines()[-1].strip()
            raise EdgecmError(
                f"{checkpoint.path}: the vision tower's tensors do not match config.json ({first}); "
                f"re-download the checkpoint"
            ) from None
        embeddings = (wrapper or tower).embeddings
        # A non-persistent buffer is not in the state dict, so it is still on meta.
        embeddings.position_ids = torch.arange(embeddings.num_positions).expand((1, -1))
        self.tower = tower.to(device=device, dtype=dtype).eval()
        proj = checkpoint.read_prefix("multi_modal_projector.")
        self.projector = {k: v.to(device=device, dtype=dtype) for k, v in proj.items()}
        self.act = ACTIVATIONS.get(vision.projector_act)
        if self.act is None:
            raise EdgecmError(f"config.json: projector_hidden_act '{vision.projector_act}' is not supported")
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values (N, 3, H, W) -> image features (N * tokens_per_image, d_text); every image has one size."""
        out = self.tower(pixel_values.to(self.device, self.dtype), output_hidden_states=True)
        selected = [out.hidden_states[i] for i in self.indices]
        if self.vision.select_strategy == "default":
            selected = [h[:, 1:] for h in selected]  # drop CLS
        features = torch.cat(selected, dim=-1)
        p = self.projector
        hidden = self.act(F.linear(features, p["linear_1.weight"], p.get("linear_1.bias")))
        return F.linear(hidden, p["linear_2.weight"], p.get("linear_2.bias")).flatten(0, 1)


def _is_unused_layer(name: str, layers: int) -> bool:
    marker = "encoder.layers."
    if marker not in name:
        return False
    index = int(name.split(marker, 1)[1].split(".", 1)[0])
    return index >= layers


class LlavaFamily(Family):
    name = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    model_types = ("llava",)
    prefix_rules = (
        ("model.language_model.", ""),
        ("language_model.model.", ""),
        ("language_model.lm_head.", "lm_head."),
        ("model.", ""),
        ("", ""),
    )
    plain_single_turn = False

    def canonical_name(self, stored: str) -> str:
        name = super().canonical_name(stored)
        # CLIP towers saved by transformers 4.x wrap their modules in ``vision_model.``; 5.x does not.
        if name.startswith("vision_tower.vision_model."):
            name = "vision_tower." + name[len("vision_tower.vision_model."):]
        return name

    def parse_config(self, raw: dict[str, Any], hf: Any, generation_eos: Any, path: Path) -> ModelConfig:
        feature_layer = hf.vision_feature_layer
        if isinstance(feature_layer, list):
            feature_layer = tuple(int(x) for x in feature_layer)
        vision_model_type = getattr(hf.vision_config, "model_type", "")
        if vision_model_type not in ("clip_vision_model", "clip"):
            raise EdgecmError(
                f"{path}: vision tower '{vision_model_type}' is not supported; "
                f"edgecm runs CLIP vision towers in LLaVA checkpoints (LLaVA-1.5)"
            )
        vision = ClipVisionConfig(
            clip=hf.vision_config.to_dict(),
            feature_layer=feature_layer,
            select_strategy=hf.vision_feature_select_strategy,
            projector_act=getattr(hf, "projector_hidden_act", "gelu"),
            projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
        )
        image_token_id = getattr(hf, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(hf, "image_token_index", None)
        return ModelConfig(
            family=self.name,
            text=text_config_from_hf(hf.text_config, generation_eos),
            vision=vision,
            image_token_id=int(image_token_id),
        )

    def required_tensors(self, config: ModelConfig) -> list[str]:
        return super().required_tensors(config) + [
            "multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.weight"
        ]

    def expected_shapes(self, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        v: ClipVisionConfig = config.vision
        d_text = config.text.hidden_size
        _, indices = feature_layers(v)
        d_in = int(v.clip["hidden_size"]) * len(indices)
        return {
            **super().expected_shapes(config),
            "multi_modal_projector.linear_1.weight": (d_text, d_in),
            "multi_modal_projector.linear_2.weight": (d_text, d_text),
        }

    def vision_encoder(self, checkpoint: "Checkpoint", device: torch.device, dtype: torch.dtype) -> ClipEncoder:
        return ClipEncoder(checkpoint, device, dtype)

    def vision_bytes(self, config: ModelConfig, compute_bytes: int) -> int:
        v: ClipVisionConfig = config.vision
        d_text = config.text.hidden_size
        used, indices = feature_layers(v)
        d_in = int(v.clip["hidden_size"]) * len(indices)
        projector = d_in * d_text + d_text * d_text + 2 * d_text
        return (clip_params(v.clip, used) + projector) * compute_bytes

    def image_tokens(self, config: ModelConfig) -> int:
        return config.vision.tokens_per_image

    def check_prompt(self, config: ModelConfig, prompt: "Prompt") -> None:
        images = 0 if prompt.pixel_values is None else int(prompt.pixel_values.shape[0])
        expected = config.vision.tokens_per_image * images
        found = int(prompt.image_positions.numel())
        if found != expected:
            raise EdgecmError(
                f"the processor produced {found} image tokens but the vision tower yields {expected}; "
                f"the checkpoint's processor files do not match its config.json"
            )

    def patch_grid(self, config: ModelConfig, prompt: "Prompt") -> tuple[int, int]:
        side = config.vision.image_size // config.vision.patch_size
        return side, side
