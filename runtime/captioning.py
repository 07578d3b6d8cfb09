"""Captioning as a library: images and videos in, one JSON record each out, in batches.

``edgecm caption`` drives this with its output-file guarantees (lock, fsync,
resume); a Python user or a distributed worker can call it directly:

    captioner = Captioner(engine, builder, "my-model")
    for record in captioner.caption(paths):
        ...

Its defaults are ``edgecm caption``'s (the CLI's flags take them from here):
CAPTION_PROMPT, CAPTION_NEW_TOKENS, CoreMatching with ``SparsitySettings()``,
batches sized by the planner. The CLI also reads a checkpoint's calibration file.

A record is ``{"path", "prompt", "model", "caption", ...}`` or, for an input
that cannot be read, ``{"path", "prompt", "model", "error"}``: a bad file is
an error record at once and never holds up the batch it would have joined.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from edgecm.errors import EdgecmError
from edgecm.sparsity import SparsitySettings
from edgecm.video import VIDEO_SUFFIXES, VideoOptions

# --batch-size auto never goes past this: gains flatten well before (bench/results/throughput-*.md), and a
# kill redoes the batch in flight, so a smaller batch also loses less.
AUTO_BATCH_LIMIT = 16
CAPTION_PROMPT = "Write a short caption for this image."
CAPTION_NEW_TOKENS = 64  # a caption, not an answer to read at length


@dataclass
class Captioner:
    """Caption inputs with one engine; ``batch_size`` is a number or "auto" (the planner's largest batch)."""

    engine: object  # runtime.engine.Engine
    builder: object  # edgecm.prompt.PromptBuilder
    model_name: str
    prompt: str = CAPTION_PROMPT
    generation: object = None  # runtime.engine.GenerationSettings; default: greedy, CAPTION_NEW_TOKENS new tokens
    sparsity: SparsitySettings = field(default_factory=SparsitySettings)
    batch_size: int | str = "auto"
    video_options: VideoOptions = field(default_factory=VideoOptions)
    folders_are_videos: bool = False  # a folder input is one video of frames (caption --videos)

    def __post_init__(self) -> None:
        from runtime.engine import GenerationSettings

        if self.generation is None:
            self.generation = GenerationSettings(max_new_tokens=CAPTION_NEW_TOKENS)
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise EdgecmError(f"--batch-size {self.batch_size}: use a whole number of at least 1, or auto")
        self.builder.check_text(self.prompt)

    # -- one input ---------------------------------------------------------------------------------

    def base(self, path: Path) -> dict:
        settings = {"sparsity": self.sparsity.to_json(), "max_new_tokens": self.generation.max_new_tokens}
        return {"path": str(path), "prompt": self.prompt, "model": self.model_name, "settings": settings}

    def is_video(self, path: Path) -> bool:
        return path.suffix.lower() in VIDEO_SUFFIXES or (self.folders_are_videos and path.is_dir())

    def read(self, path: Path):
        """The prompt for ``path``, or an error record if it cannot be read as an image or video."""
        from edgecm.video import read_video
        from edgecm.vision import load_image

        try:
            if self.is_video(path):
                return self.builder.build(self.prompt, None, read_video(path, self.video_options))
            return self.builder.build(self.prompt, load_image(path), None)
        except EdgecmError as exc:
            return {**self.base(path), "error": str(exc)}

    # -- batches -------------------------------------------------------------------------------------

    def batch_limit(self, prompts: list) -> int:
        """How many prompts like these run together: the fixed size, or the planner's largest (capped)."""
        if self.batch_size != "auto":
            return int(self.batch_size)
        longest = max(p.num_tokens for p in prompts)
        images = max(int(p.image_positions.numel()) for p in prompts)
        found = self.engine.largest_batch(longest, images, self.generation.max_new_tokens, self.sparsity,
                                          limit=AUTO_BATCH_LIMIT)
        return max(found, 1)  # a budget that holds no sequence is refused, with its numbers, by the run itself

    def run_batch(self, paths: list[Path], prompts: list) -> list[dict]:
        """Caption prompts that were read together; one record per path, in order."""
        from runtime.batch import generate_batch

        started = time.perf_counter()
        results = generate_batch(self.engine, prompts, self.generation, self.builder.stop_token_ids,
                                 sparsity=self.sparsity)
        seconds = time.perf_counter() - started
        records = []
        for path, result in zip(paths, results):
            records.append({
                **self.base(path),
                "caption": self.builder.decode(result.token_ids).strip(),
                "kept_image_tokens": result.kept_image_tokens,
                "image_tokens": result.image_tokens,
                "batch_size": len(prompts),
                # the batch's times: each image of a batch waits for all of them
                "batch_s": round(seconds, 4),
                "prefill_s": round(result.timings.time_to_answer_s, 4),
                "decode_tokens_per_s": round(result.timings.decode_tokens_per_s, 2),
            })
        return records

    def caption(self, paths: Iterable[Path]) -> Iterator[dict]:
        """Records for ``paths``: error records as soon as an input fails to read, captions a batch at a time.

        Inputs are read as the batch fills, so no more than one batch of images is in memory.
        """
        pending_paths: list[Path] = []
        pending: list = []
        for path in paths:
            prompt = self.read(Path(path))
            if isinstance(prompt, dict):
                yield prompt
                continue
            pending_paths.append(Path(path))
            pending.append(prompt)
            limit = self.batch_limit(pending)
            if len(pending) > limit:  # the newest prompt is longer, and fewer of its size fit: run the others
                yield from self.run_batch(pending_paths[:-1], pending[:-1])
                pending_paths, pending = pending_paths[-1:], pending[-1:]
            if len(pending) >= limit:
                yield from self.run_batch(pending_paths, pending)
                pending_paths, pending = [], []
        if pending:
            yield from self.run_batch(pending_paths, pending)
