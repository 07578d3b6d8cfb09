"""Reading a video (a file, or a folder of frames), and turning frames into Qwen2-VL-style flattened patches.

A video is sampled at ``fps`` frames per second (2 by default, Qwen2.5-VL's
training rate), so each temporal patch of ``temporal_patch_size`` frames
spans ``temporal_patch_size / fps`` seconds: the ``second_per_grid_ts`` that
scales the temporal position ids.

- A folder of frames is read in name order and taken to be sampled at ``fps``.
- A video file is decoded with PyAV, the FFmpeg binding that ships its own
  FFmpeg in the wheel (MP4, MKV, WebM, AVI, MOV; H.264, HEVC, VP9, AV1...), so
  no system FFmpeg is needed, and it is kept up by the FFmpeg community.
  Frames are picked at ``fps`` from the decoded frames' own timestamps, one
  pass, holding only the picked frames in memory.

Either way at most ``max_frames`` frames are kept, evenly spaced over the
whole clip; thinning keeps the clip's duration, so the rate drops in proportion.

transformers' own video processor needs torchvision, so the patch layout is
reproduced here with PIL and NumPy: every frame resized (bicubic) to one size
on the ``patch_size * merge_size`` grid, rescaled and normalised as the image
processor does, the frame count padded to a multiple of the temporal patch by
repeating the last frame, and patches ordered merge block by merge block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgecm.errors import EdgecmError
from edgecm.vision import load_image, not_a_file

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# File names taken as videos where a folder is searched (caption --videos); any file can be passed directly.
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")
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
    """A video file or a folder of frames as a Video sampled at ``options.fps``, thinned to ``max_frames``."""
    check_options(options)
    if Path(path).is_file():
        return read_video_file(path, options)
    frames = read_frames(path, options)
    total = sum(1 for p in Path(path).iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    return Video(tuple(frames), options.fps * len(frames) / total)


def read_frames(path: str | Path, options: VideoOptions = VideoOptions()) -> list:
    """The frames of a folder, in name order, as RGB PIL images; at most ``max_frames`` of them, evenly spaced."""
    path = Path(path)
    check_options(options)
    if not path.is_dir():
        if path.is_symlink() or path.exists():  # a link to nothing, a FIFO: never opened, named for what it is
            raise EdgecmError(not_a_file(path, "video file or folder of frames"))
        raise EdgecmError(f"{path}: no such video file or folder of frames; check the path")
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


def check_options(options: VideoOptions) -> None:
    if not (math.isfinite(options.fps) and options.fps > 0):  # inf passes "> 0" and overflows the frame count
        raise EdgecmError(f"fps {options.fps}: must be a finite number above 0")
    if options.max_frames < 1:
        raise EdgecmError(f"max_frames {options.max_frames}: must be at least 1")


def read_video_file(path: str | Path, options: VideoOptions = VideoOptions()) -> Video:
    """Decode a video file and keep the frames nearest to ``fps`` samples a second (at most ``max_frames``)."""
    import av

    path = Path(path)
    if path.suffix.lower() in FRAME_SUFFIXES:
        raise EdgecmError(f"{path}: is a still image, not a video; pass it with --image, or pass a folder of frames")
    if path.stat().st_size == 0:
        raise EdgecmError(f"{path}: the file is empty (0 bytes), so the video is empty; pass another video")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise EdgecmError(f"{path}: has no video stream; pass a video file or a folder of frames")
            stream = container.streams.video[0]
            duration = _duration_s(container, stream)
            if duration is None:  # no duration in the header: count the frames in a first pass
                duration = sum(1 for _ in container.decode(stream)) / float(stream.average_rate or 1)
                container.seek(0)
            frames = _sample(container.decode(stream), duration, stream, options)
    except av.FFmpegError as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise EdgecmError(f"{path}: cannot be decoded as a video ({reason}); pass a video file "
                          f"(MP4, MKV, WebM, AVI, MOV) or a folder of frames") from None
    if not frames:
        raise EdgecmError(f"{path}: the video holds no frames; the video is empty")
    # Frames are picked on a uniform grid of the clip's duration, so their rate is count / duration.
    return Video(tuple(frames), len(frames) / duration if duration > 0 else options.fps)


def _duration_s(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base: microseconds
    return None


def _sample(decoded, duration: float, stream, options: VideoOptions) -> list:
    """For each sample time k * duration / n, the first decoded frame at or after it (or the last frame)."""
    rate = float(stream.average_rate or options.fps)
    # Never more samples than the clip has frames: an --fps above the clip's own rate takes every frame. The
    # rate is capped before it multiplies, so a huge finite --fps (1e308) cannot overflow to inf.
    wanted = min(options.max_frames, max(1, round(duration * min(options.fps, rate))))
    times = [k * duration / wanted for k in range(wanted)]
    start = None
    picked: list = []
    last = None
    for index, frame in enumerate(decoded):
        t = frame.time if frame.time is not None else index / rate
        start = t if start is None else start
        t -= start  # streams may start at a non-zero timestamp
        last = frame
        # Half a frame of slack, so a frame stamped a hair before its sample time still counts.
        while len(picked) < wanted and t >= times[len(picked)] - 0.5 / rate:
            picked.append(frame.to_image().convert("RGB"))
        if len(picked) == wanted:
            break
    while last is not None and len(picked) < wanted:  # the header overstated the duration
        picked.append(last.to_image().convert("RGB"))
    return picked


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
