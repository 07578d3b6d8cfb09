"""Reading a video as a folder of frames, and turning frames into Qwen2-VL-style flattened patches.

A folder of frames is read in name order and taken to be sampled at ``fps``
frames per second (2 by default, Qwen2.5-VL's training rate), so each
temporal patch of ``temporal_patch_size`` frames spans
``temporal_patch_size / fps`` seconds: the ``second_per_grid_ts`` that scales
the temporal position ids. Video files are not decoded here: that would need
a decoding library (PyAV or decord) as a new dependency; extract frames first
(``ffmpeg -i clip.mp4 -vf fps=2 frames/%05d.png``).

transformers' own video processor needs torchvision, so the patch layout is
reproduced here with PIL and NumPy: every frame resized (bicubic) to one size
on the ``patch_size * merge_size`` grid, rescaled and normalised as the image
processor does, the frame count padded to a multiple of the temporal patch by
repeating the last frame, and patches ordered merge block by merge block.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgecm.errors import EdgecmError
from edgecm.vision import load_image

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_FPS = 2.0
DEFAULT_MAX_FRAMES = 768  # transformers' Qwen2-VL video processor default


@dataclass(frozen=True)
class VideoOptions:
    """How a folder of frames is read: its frame rate and the most frames kept (evenly spaced)."""

    fps: float = DEFAULT_FPS
    max_frames: int = DEFAULT_MAX_FRAMES


@dataclass(frozen=True)
class Video:
    """Frames (RGB PIL images, all one size) and the rate they are sampled at."""

    frames: tuple
    fps: float = DEFAULT_FPS


def read_video(path: str | Path, options: VideoOptions = VideoOptions()) -> Video:
    """A folder of frames as a Video: name order, at ``options.fps``; evenly thinned to ``max_frames``.

    Thinning keeps the clip's duration, so the rate of the kept frames drops in proportion.
    """
    frames = read_frames(path, options)
    total = sum(1 for p in Path(path).iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    return Video(tuple(frames), options.fps * len(frames) / total)


def read_frames(path: str | Path, options: VideoOptions = VideoOptions()) -> list:
    """The frames of a folder, in name order, as RGB PIL images; at most ``max_frames`` of them, evenly spaced."""
    path = Path(path)
    if options.fps <= 0:
        raise EdgecmError(f"fps {options.fps}: must be above 0")
    if options.max_frames < 1:
        raise EdgecmError(f"max_frames {options.max_frames}: must be at least 1")
    if path.is_file():
        raise EdgecmError(
            f"{path}: video files are not decoded; extract frames into a folder (ffmpeg -i {path.name} -vf fps=2 "
            f"frames/%05d.png) and pass the folder"
        )
    if not path.is_dir():
        raise EdgecmError(f"{path}: no such folder of frames; check the path")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise EdgecmError(f"{path}: no frames (PNG, JPEG, WebP or BMP files) in the folder; the video is empty")
    if len(files) > options.max_frames:
        picks = np.linspace(0, len(files) - 1, options.max_frames).round().astype(int)
        files = [files[i] for i in picks]
    frames = [load_image(f) for f in files]
    if len({f.size for f in frames}) != 1:
        raise EdgecmError(f"{path}: the frames differ in size; a video's frames must all have one size")
    return frames


def frames_to_patches(
    frames: list, size: tuple[int, int], mean, std, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames resized to ``size`` (height, width) -> flattened patches (t * h * w, C * tp * p * p) and grid (1, 3)."""
    from PIL import Image

    height, width = size
    arrays = []
    for frame in frames:
        if frame.size != (width, height):
            frame = frame.resize((width, height), Image.BICUBIC)
        arrays.append(np.asarray(frame, dtype=np.float32).transpose(2, 0, 1) / 255.0)  # (C, H, W)
    video = np.stack(arrays)  # (T, C, H, W)
    video = (video - np.asarray(mean, dtype=np.float32)[:, None, None]) / np.asarray(std, dtype=np.float32)[:, None, None]
    if pad := -len(video) % temporal_patch_size:
        video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
    frames_n, channels = video.shape[:2]
    t, h, w = frames_n // temporal_patch_size, height // patch_size, width // patch_size
    m, p = merge_size, patch_size
    patches = video.reshape(t, temporal_patch_size, channels, h // m, m, p, w // m, m, p)
    # (t, block row, block col, row in block, col in block, C, temporal, p, p): the tower's order
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h * w, channels * temporal_patch_size * p * p)
    return torch.from_numpy(np.ascontiguousarray(patches)), torch.tensor([[t, h, w]])
