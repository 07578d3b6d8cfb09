"""Images in, projected image features out: loading, the CLIP tower, the LLaVA projector.

The tower is transformers' CLIPVisionModel, built on the meta device (no
random initialisation of ~300M parameters that are overwritten at once) and
given the checkpoint's weights. Encoder layers after the deepest feature
layer LLaVA reads are never built: LLaVA-1.5 reads layer -2, so the last
layer would be computed and thrown away.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from edgecm.checkpoint import Checkpoint
from edgecm.config import VisionConfig
from edgecm.errors import EdgecmError
from edgecm.model import ACTIVATIONS

# Larger images are refused instead of decoded: a decompression bomb (a tiny
# file that expands to gigapixels) must not take the process down.
MAX_IMAGE_PIXELS = 64_000_000


def load_image(path: str | Path):
    """Open an image file as RGB, or raise EdgecmError naming the file and the fix."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise EdgecmError(f"{path}: no such image file; check the path")
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise EdgecmError(
            f"{path}: image is too large (over {MAX_IMAGE_PIXELS:,} pixels, possibly a decompression bomb); "
            f"downscale it first"
        ) from None
    except UnidentifiedImageError:
        raise EdgecmError(f"{path}: not an image file; use a PNG, JPEG or WebP image") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise EdgecmError(f"{path}: image is corrupt or truncated ({exc}); re-export or re-download it") from None


def feature_layers(vision: VisionConfig) -> tuple[int, tuple[int, ...]]:
    """(encoder layers to build, hidden_states indices to read) for the configured feature layer(s)."""
    total = int(vision.clip["num_hidden_layers"])
    requested = vision.feature_layer if isinstance(vision.feature_layer, tuple) else (vision.feature_layer,)
    # hidden_states has total + 1 entries (embeddings first); negative indices count from its end.
    indices = tuple(i if i >= 0 else total + 1 + i for i in requested)
    return max(indices), indices


class VisionEncoder:
    """CLIP tower + projector for one checkpoint; load, encode, and free with ``del``."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype):
        from transformers import CLIPVisionConfig, CLIPVisionModel

        vision = checkpoint.config.vision
        if vision is None:
            raise EdgecmError(f"{checkpoint.path}: a text-only model cannot take an image; drop --image")
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
        tower.load_state_dict(keep, strict=True, assign=True)
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
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, 3, H, W) -> image features (N, tokens_per_image, d_text)."""
        out = self.tower(pixel_values.to(self.device, self.dtype), output_hidden_states=True)
        selected = [out.hidden_states[i] for i in self.indices]
        if self.vision.select_strategy == "default":
            selected = [h[:, 1:] for h in selected]  # drop CLS
        features = torch.cat(selected, dim=-1)
        p = self.projector
        hidden = self.act(F.linear(features, p["linear_1.weight"], p.get("linear_1.bias")))
        return F.linear(hidden, p["linear_2.weight"], p.get("linear_2.bias"))


def _is_unused_layer(name: str, layers: int) -> bool:
    marker = "encoder.layers."
    if marker not in name:
        return False
    index = int(name.split(marker, 1)[1].split(".", 1)[0])
    return index >= layers
