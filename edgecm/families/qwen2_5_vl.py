"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): a windowed ViT with a patch merger before a
Qwen2 decoder (q/k/v biases, no o bias) that uses multimodal RoPE.

Key layouts: published checkpoints, which transformers 5.x ``save_pretrained``
also writes by default (``model.layers.N``, ``model.embed_tokens``,
``visual.blocks``, ``visual.merger``, ``lm_head``), and the 5.x module tree
(``model.language_model.*``, ``model.visual.*``). config.json comes flat (as
published: text fields at the top, ``rope_scaling`` of type ``mrope``) or
nested (``text_config``); transformers' config class reads both.

Images have a dynamic resolution: the processor resizes each image to a
multiple of ``patch_size * spatial_merge_size`` within [min_pixels,
max_pixels] and the tower turns every 2x2 block of patches into one token, so
the token count follows the image. The tower is transformers'
``Qwen2_5_VisionTransformerPretrainedModel``, built on the meta device, given
the checkpoint's ``visual.*`` tensors, run once and freed.

Position ids are 3-D (temporal, height, width) as transformers'
``get_rope_index`` computes them: text tokens count up on all three axes; an
image's tokens share the temporal id where the image starts and take
start + row and start + column on the others; a video's temporal ids step by
tokens_per_second x second_per_grid_ts; text after an image or video resumes
at the largest id it used + 1 (see ``rope_index`` for where transformers 5.x
differs on long videos). Decoding continues at the largest prompt id + 1, not
at the prompt length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from edgecm.config import ModelConfig, text_config_from_hf
from edgecm.errors import EdgecmError
from edgecm.families.base import Family

if TYPE_CHECKING:
    from edgecm.checkpoint import Checkpoint
    from edgecm.prompt import Prompt

# What the planner plans one image for: a 1280x720 photo at the processor's default pixel limits
# (it becomes 1288x728, 46x26 merged patches = 1196 tokens on the published 14-pixel patches).
PLAN_IMAGE_SIZE = (720, 1280)  # (height, width)
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 16384  # the published preprocessor_config.json's max_pixels
# transformers' default when a config names no sections (Qwen2.5-VL's 128-wide heads).
DEFAULT_MROPE_SECTION = (16, 24, 24)


@dataclass(frozen=True)
class QwenVisionConfig:
    """The vision tower and the token ids that frame its output in a prompt."""

    tower: dict[str, Any]  # a Qwen2_5_VLVisionConfig as a dict, handed back to transformers
    vision_start_token_id: int | None = None
    video_token_id: int | None = None

    @property
    def tokens_per_second(self) -> float:
        """Temporal position ids per second of video (a video's temporal ids step by this x seconds per patch)."""
        return float(self.tower.get("tokens_per_second", 2))

    @property
    def patch_size(self) -> int:
        return int(self.tower["patch_size"])

    @property
    def merge_size(self) -> int:
        return int(self.tower["spatial_merge_size"])

    @property
    def temporal_patch_size(self) -> int:
        return int(self.tower["temporal_patch_size"])

    def tokens(self, grid_thw: torch.Tensor) -> int:
        """Tokens of one image or video with patch grid (t, h, w) after the 2x2 merge."""
        return int(grid_thw.prod()) // self.merge_size**2


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size Qwen2-VL's image processor resizes to: multiples of ``factor``, area within the limits."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def check_min_pixels(min_pixels: int | None, label: str = "min_pixels") -> None:
    """Every image is scaled up to at least min_pixels: one above the largest input taken is refused."""
    from edgecm.vision import MAX_IMAGE_PIXELS

    if min_pixels is not None and min_pixels > MAX_IMAGE_PIXELS:
        raise EdgecmError(f"{label} {min_pixels:,}: every image would be scaled up to at least that, past the "
                          f"{MAX_IMAGE_PIXELS:,} pixels edgecm takes in one image; use at most {MAX_IMAGE_PIXELS}")


def tower_params(tower: dict[str, Any]) -> int:
    """Parameters of the vision tower: patch embedding, blocks, patch merger."""
    h, i = int(tower["hidden_size"]), int(tower["intermediate_size"])
    p, tp, c = int(tower["patch_size"]), int(tower["temporal_patch_size"]), int(tower.get("in_channels", 3))
    out, m = int(tower["out_hidden_size"]), int(tower["spatial_merge_size"])
    embed = c * tp * p * p * h  # Conv3d without bias
    per_block = 2 * h + (3 * h * h + 3 * h) + (h * h + h) + 2 * (h * i + i) + (i * h + h)
    merged = h * m * m
    merger = h + (merged * merged + merged) + (merged * out + out)
    return embed + int(tower["depth"]) * per_block + merger


class QwenVisionEncoder:
    """Qwen2.5-VL's vision tower for one checkpoint; load, encode, and free with ``del``."""

    def __init__(self, checkpoint: "Checkpoint", device: torch.device, dtype: torch.dtype):
        from transformers import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel,
            Qwen2_5_VLVisionRotaryEmbedding,
        )

        vision: QwenVisionConfig = checkpoint.config.vision
        config = Qwen2_5_VLVisionConfig(**vision.tower)
        with torch.device("meta"):
            tower = Qwen2_5_VisionTransformerPretrainedModel(config)
        tower.load_state_dict(checkpoint.read_prefix("visual."), strict=True, assign=True)
        # The rotary frequencies are a non-persistent buffer, absent from the checkpoint and still on meta.
        tower.rotary_pos_emb = Qwen2_5_VLVisionRotaryEmbedding(config)
        self.tower = tower.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """Flattened patches (P, C * t * p * p) and grids (N, 3) -> features (P / merge^2, d_text), in prompt order."""
        if grid_thw is None:
            raise EdgecmError("a Qwen2.5-VL image needs its image_grid_thw from the processor; build the prompt with it")
        out = self.tower(pixel_values.to(self.device, self.dtype), grid_thw=grid_thw.to(self.device))
        return out.pooler_output


class QwenProcessor:
    """The checkpoint's tokenizer and image processor, with the placeholder expansion of Qwen2.5-VL.

    transformers' ``Qwen2_5_VLProcessor`` cannot be built without torchvision
    (its video processor needs it), so images go through the image processor
    (whose PIL backend needs nothing extra), video frames through
    ``edgecm.video``, and each ``<|image_pad|>`` / ``<|video_pad|>`` is expanded
    here by the same rule: one placeholder per merged patch.
    """

    def __init__(
        self, directory: Path, config: ModelConfig, min_pixels: int | None, max_pixels: int | None
    ):
        import json

        import transformers

        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
        overrides = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        self.image_processor = transformers.AutoImageProcessor.from_pretrained(str(directory), **overrides)
        # The placeholders are whatever tokens config.json's ids name in this tokenizer.
        self.image_token = self.tokenizer.convert_ids_to_tokens(config.image_token_id)
        self.video_token_id = config.vision.video_token_id
        self.video_token = None if self.video_token_id is None else self.tokenizer.convert_ids_to_tokens(self.video_token_id)
        self.video_pixels = _video_pixel_limits(directory, self.image_processor, min_pixels, max_pixels)
        size = self.image_processor.size
        self.image_pixels = (int(size.shortest_edge), int(size.longest_edge))
        self.context = config.text.max_position_embeddings
        template = None
        # Published checkpoints keep the template beside the processor (chat_template.json), 5.x as a .jinja file.
        if (directory / "chat_template.json").is_file():
            template = json.loads((directory / "chat_template.json").read_text()).get("chat_template")
        elif (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text()
        self.chat_template = template or getattr(self.tokenizer, "chat_template", None)

    @property
    def merge_size(self) -> int:
        return int(self.image_processor.merge_size)

    def resized(self, width: int, height: int, limits: tuple[int, int], frames: int = 1, kind: str = "image"):
        """(height, width) an input is resized to, refused before any pixel is allocated when that size
        passes MAX_IMAGE_PIXELS or its tokens the model's context: a min_pixels far above the input scales
        a small image up until memory runs out, past the input-size check made on the file."""
        from edgecm.vision import MAX_IMAGE_PIXELS

        factor = int(self.image_processor.patch_size) * self.merge_size
        h, w = smart_resize(height, width, factor, *limits)
        temporal = -(-frames // int(self.image_processor.temporal_patch_size)) if kind == "video" else 1
        tokens = temporal * (h // factor) * (w // factor)
        if h * w > MAX_IMAGE_PIXELS or tokens > self.context:
            past = (f"the {MAX_IMAGE_PIXELS:,} pixels edgecm takes in one image" if h * w > MAX_IMAGE_PIXELS
                    else f"the model's context of {self.context:,} tokens")
            raise EdgecmError(
                f"a {width}x{height} {kind} would be resized to {w}x{h} ({h * w:,} pixels"
                f"{f' a frame, {frames} frames' if kind == 'video' else ''}, {tokens:,} {kind} tokens), past {past}; "
                f"lower min_pixels ({limits[0]:,}, --min-pixels) or max_pixels ({limits[1]:,}, --max-pixels)"
                f"{', or --max-frames' if kind == 'video' else ''}"
            )
        return h, w

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=add_generation_prompt, tokenize=tokenize
        )

    def __call__(
        self, images=None, text: str = "", videos=None, return_tensors: str = "pt", add_special_tokens: bool = True
    ) -> dict:
        """Pixel values and grids of the image(s) and of one video (an ``edgecm.video.Video``), and the ids of
        ``text`` with every placeholder expanded."""
        out: dict = {}
        if images is not None:
            images = list(images) if isinstance(images, (list, tuple)) else [images]
            for image in images:
                self.resized(image.width, image.height, self.image_pixels)
            pixels = self.image_processor(images=images, return_tensors="pt")
            out.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
            text = self._expand(text, self.image_token, pixels["image_grid_thw"], "image")
        if videos is not None:
            out.update(self._video(videos))
            text = self._expand(text, self.video_token, out["video_grid_thw"], "video")
        enc = self.tokenizer(text, return_tensors=return_tensors, add_special_tokens=add_special_tokens)
        return {"input_ids": enc["input_ids"], **out}

    def _expand(self, text: str, token: str | None, grids: torch.Tensor, kind: str) -> str:
        pieces = text.split(token) if token else [text]
        if len(pieces) - 1 != len(grids):
            raise EdgecmError(
                f"the prompt has {len(pieces) - 1} {kind} placeholders for {len(grids)} {kind}s; "
                f"the chat template and the inputs disagree"
            )
        expanded = pieces[0]
        for grid, rest in zip(grids, pieces[1:]):
            expanded += token * (int(grid.prod()) // self.merge_size**2) + rest
        return expanded

    def _video(self, video) -> dict:
        from edgecm.video import frames_to_patches

        ip = self.image_processor
        width, height = video.frames[0].size
        size = self.resized(width, height, self.video_pixels, len(video.frames), "video")
        temporal = int(ip.temporal_patch_size)
        patches, grid = frames_to_patches(
            list(video.frames), size, ip.image_mean, ip.image_std, int(ip.patch_size), self.merge_size, temporal
        )
        return {
            "pixel_values_videos": patches,
            "video_grid_thw": grid,
            "second_per_grid_ts": [temporal / video.fps],  # seconds each temporal patch spans
            "video_token_id": self.video_token_id,
        }


def rope_index(
    input_ids: torch.Tensor, blocks: dict[int, list[tuple[list[int], float]]], merge_size: int
) -> torch.Tensor:
    """3-D position ids (3, T) of one prompt, as transformers' ``get_rope_index`` computes them.

    input_ids: (T,); blocks: placeholder token id -> [(patch grid (t, h, w), time interval)] of that
    kind's inputs in prompt order; the interval spaces the temporal ids (tokens_per_second x seconds
    per temporal patch for a video, 1 for an image).

    Text after a block resumes at the largest id the block used + 1, as Qwen's own code and
    transformers 4.x do. transformers 5.x resumes at start + max(rows, columns) instead: the same
    for images, but for a video whose temporal ids run past its spatial ones it makes the text reuse
    ids of later frames. edgecm keeps the rule the model was trained with.
    """
    ids = input_ids.tolist()
    queues = {token: list(items) for token, items in blocks.items()}
    columns: list[torch.Tensor] = []
    start, i = 0, 0
    while i < len(ids):
        if ids[i] not in queues:
            j = i
            while j < len(ids) and ids[j] not in queues:
                j += 1
            columns.append(torch.arange(start, start + j - i).expand(3, -1))
            start += j - i
            i = j
            continue
        if not queues[ids[i]]:
            raise EdgecmError("the prompt holds more vision tokens than its inputs; rebuild it with the processor")
        (t, h, w), interval = queues[ids[i]].pop(0)
        h, w = h // merge_size, w // merge_size
        temporal = (torch.arange(t) * interval).long()
        tt, hh, ww = torch.meshgrid(temporal, torch.arange(h), torch.arange(w), indexing="ij")
        block = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + start  # (3, t*h*w)
        columns.append(block)
        start = int(block.max()) + 1
        i += t * h * w
    return torch.cat(columns, dim=1) if columns else torch.zeros(3, 0, dtype=torch.long)


def _video_pixel_limits(directory: Path, image_processor: Any, min_pixels: int | None, max_pixels: int | None):
    """(min, max) pixels of a video frame: the overrides, else video_preprocessor_config.json, else the images'."""
    import json

    low, high = image_processor.size.shortest_edge, image_processor.size.longest_edge
    path = directory / "video_preprocessor_config.json"
    if path.is_file():
        video = json.loads(path.read_text())
        size = video.get("size") or {}
        low = video.get("min_pixels") or size.get("shortest_edge") or low
        high = video.get("max_pixels") or size.get("longest_edge") or high
    return (min_pixels or low, max_pixels or high)


class Qwen2_5_VLFamily(Family):
    name = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    model_types = ("qwen2_5_vl",)
    prefix_rules = (
        ("model.language_model.", ""),
        ("model.visual.", "visual."),
        ("model.", ""),
        ("", ""),
    )
    plain_single_turn = False
    assistant_header = "<|im_start|>assistant\n"
    takes_video = True

    def parse_config(self, raw: dict[str, Any], hf: Any, generation_eos: Any, path: Path) -> ModelConfig:
        text_hf = hf.text_config
        if getattr(text_hf, "use_sliding_window", False):
            raise EdgecmError(f"{path}: use_sliding_window=true is not supported; edgecm runs full attention")
        text = text_config_from_hf(text_hf, generation_eos, model_types=("qwen2_5_vl_text",))
        rope = text.rope
        if rope.mrope_section is None:
            rope = replace(rope, mrope_section=DEFAULT_MROPE_SECTION)
        text = replace(
            text,
            rope=rope,
            attention_bias=True,  # Qwen2 attention: biases on q, k and v; o has none (its absence is read as such)
            # 5.x moves tie_word_embeddings to the top; older nested configs kept it in text_config.
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False) or text.tie_word_embeddings),
        )
        tower = hf.vision_config.to_dict()
        for key in ("model_type", "transformers_version", "architectures"):
            tower.pop(key, None)
        vision = QwenVisionConfig(
            tower=tower,
            vision_start_token_id=getattr(hf, "vision_start_token_id", None),
            video_token_id=getattr(hf, "video_token_id", None),
        )
        return ModelConfig(family=self.name, text=text, vision=vision, image_token_id=int(hf.image_token_id))

    def required_tensors(self, config: ModelConfig) -> list[str]:
        names = super().required_tensors(config)
        for i in range(config.text.num_layers):
            names += [f"layers.{i}.self_attn.{p}_proj.bias" for p in "qkv"]
        return names + ["visual.patch_embed.proj.weight", "visual.merger.mlp.0.weight", "visual.merger.mlp.2.weight"]

    # -- vision -------------------------------------------------------------------------------

    def vision_encoder(self, checkpoint: "Checkpoint", device: torch.device, dtype: torch.dtype) -> QwenVisionEncoder:
        return QwenVisionEncoder(checkpoint, device, dtype)

    def vision_bytes(self, config: ModelConfig, compute_bytes: int) -> int:
        return tower_params(config.vision.tower) * compute_bytes

    def vision_activation_bytes(self, config: ModelConfig, compute_bytes: int) -> int:
        """One block's working set over every patch of the planned image (4 patches per token): hidden,
        residual and norm (3 x h), q/k/v and output (4 x h), gate/up/product (3 x intermediate); SDPA's
        fused kernels keep attention scores out of memory."""
        tower = config.vision.tower
        patches = self.image_tokens(config) * config.vision.merge_size**2
        return patches * (7 * int(tower["hidden_size"]) + 3 * int(tower["intermediate_size"])) * compute_bytes

    def patches_per_token(self, config: ModelConfig) -> int:
        return config.vision.merge_size**2  # the merger folds merge x merge patches into one token

    def image_tokens(self, config: ModelConfig) -> int:
        v: QwenVisionConfig = config.vision
        factor = v.patch_size * v.merge_size
        h, w = smart_resize(*PLAN_IMAGE_SIZE, factor, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
        return (h // factor) * (w // factor)

    def load_processor(self, directory: Path, config: ModelConfig, min_pixels: int | None, max_pixels: int | None):
        for label, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if value is not None and value < 1:
                raise EdgecmError(f"{label} {value}: must be a positive number of pixels")
        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            raise EdgecmError(f"min_pixels {min_pixels} is above max_pixels {max_pixels}; lower it or raise max_pixels")
        check_min_pixels(min_pixels)
        return QwenProcessor(directory, config, min_pixels, max_pixels)

    # -- prompts and positions ----------------------------------------------------------------

    def fallback_prompt(self, turns: list[tuple[str, str]], image_turn: int | None, eos: str) -> str:
        """Qwen's ChatML turns, for a checkpoint saved without its chat template."""
        parts = []
        for i, (role, text) in enumerate(turns):
            image = "<|vision_start|><|image_pad|><|vision_end|>" if i == image_turn else ""
            parts.append(f"<|im_start|>{role}\n{image}{text}<|im_end|>\n")
        return "".join(parts) + self.assistant_header

    def check_prompt(self, config: ModelConfig, prompt: "Prompt") -> None:
        for token, _, grids in prompt.vision_inputs():
            expected = 0 if grids is None else sum(config.vision.tokens(g) for g in grids)
            found = int((prompt.input_ids[0] == token).sum())
            if found != expected:
                raise EdgecmError(
                    f"the processor produced {found} vision tokens but the grids give {expected}; "
                    f"the checkpoint's processor files (merge_size, patch_size) do not match its config.json"
                )

    def positions(self, config: ModelConfig, prompt: "Prompt", device: torch.device) -> torch.Tensor:
        """3-D rotary ids (3, T) of the prompt."""
        blocks: dict[int, list[tuple[list[int], float]]] = {}
        for token, _, grids in prompt.vision_inputs():
            video = token == prompt.video_token_id and token != prompt.image_token_id
            seconds = list(prompt.second_per_grid_ts or [1.0] * len(grids)) if video else [None] * len(grids)
            # Only a video's temporal ids are spaced in time; an image's single frame sits at the block start.
            blocks[token] = [
                (g.tolist(), config.vision.tokens_per_second * s if video else 1.0) for g, s in zip(grids, seconds)
            ]
        return rope_index(prompt.input_ids[0].cpu(), blocks, config.vision.merge_size).to(device)

    def next_position(self, config: ModelConfig, prompt: "Prompt") -> int:
        """The largest prompt id + 1 (transformers' rope delta added to the prompt length)."""
        if not prompt.num_tokens:
            return 0
        return int(self.positions(config, prompt, torch.device("cpu")).max()) + 1

    def model_view(self, config: ModelConfig, prompt: "Prompt", processor: Any) -> torch.Tensor:
        """The first image put back together from its flattened patches: (3, H, W) in [0, 1].

        The processor lays patches out merge block by merge block (rows of 2x2
        blocks, each block row-major), each patch as (C, temporal, p, p); an
        image repeats its one frame over the temporal patch, so frame 0 is it.
        """
        t, h, w = (int(x) for x in prompt.image_grid_thw[0])
        return self._frames(config, prompt.pixel_values[: t * h * w], (t, h, w), processor)[0]

    def video_view(self, config: ModelConfig, prompt: "Prompt", processor: Any) -> torch.Tensor:
        """The first frame of each temporal patch of the video: (t, 3, H, W) in [0, 1], one per token grid."""
        t, h, w = (int(x) for x in prompt.video_grid_thw[0])
        return self._frames(config, prompt.video_pixel_values, (t, h, w), processor)

    @staticmethod
    def _frames(config: ModelConfig, patches: torch.Tensor, grid: tuple[int, int, int], processor: Any) -> torch.Tensor:
        v: QwenVisionConfig = config.vision
        t, h, w = grid
        m, p, c = v.merge_size, v.patch_size, int(v.tower.get("in_channels", 3))
        blocks = patches.float().view(t, h // m, w // m, m, m, c, v.temporal_patch_size, p, p)[..., 0, :, :]
        frames = blocks.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(t, c, h * p, w * p)  # (t, C, H, W)
        mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
        return (frames * std + mean).clamp(0, 1)

    def patch_grid(self, config: ModelConfig, prompt: "Prompt") -> tuple[int, int]:
        """(rows, columns) of tokens over the image, or over each temporal patch of the video."""
        grids = prompt.image_grid_thw if prompt.image_grid_thw is not None else prompt.video_grid_thw
        if grids is None:
            raise EdgecmError("the prompt has no image or video; pass --image or --video")
        _, h, w = (int(x) for x in grids[0])
        m = config.vision.merge_size
        return h // m, w // m
