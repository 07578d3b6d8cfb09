"""``edgecm caption``: batch offline captioning into a JSONL file that survives interruption.

Safety of the output file:
- every line is written whole, then flushed and fsynced, before the next image starts;
- on start, an existing file is read back: complete lines mark their images
  as done (captions and recorded errors alike), and a torn last line (a
  write cut off by a kill or a power loss) is truncated away, so the file
  always parses and no image is written twice;
- images are identified by their resolved absolute path.

With ``--videos`` every folder among the inputs is one video (its frames in
name order, as ``run --video`` reads them) instead of a folder of images.

``--shard I/N`` keeps the images whose path hash modulo N is I: independent of
listing order and of which other files exist, so N launchers need no coordination.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from edgecm.errors import EdgecmError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
LIST_SUFFIXES = {".txt", ".lst"}


def expand_inputs(inputs: list[str], videos: bool = False) -> list[Path]:
    """Files as given, folders searched recursively for images (or, with ``videos``, taken whole as videos),
    list files read line by line; deduplicated."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir() and videos:
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    listed = Path(line).expanduser()
                    found.append(listed if listed.is_absolute() else path.parent / listed)
        elif path.exists():
            found.append(path)
        else:
            raise EdgecmError(f"{path}: no such file or folder; pass image files, folders or .txt/.lst path lists")
    unique: dict[str, Path] = {}
    for p in found:
        unique.setdefault(str(p.resolve()), p)
    return [Path(key) for key in unique]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise EdgecmError(f"--shard {text}: use I/N with 0 <= I < N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise EdgecmError(f"--shard {text}: use I/N with 0 <= I < N, e.g. 0/4")
    return index, count


def in_shard(path: Path, shard: tuple[int, int] | None) -> bool:
    if shard is None:
        return True
    digest = hashlib.sha256(str(path).encode()).digest()
    return int.from_bytes(digest[:8], "big") % shard[1] == shard[0]


def recover(out: Path) -> set[str]:
    """Paths already recorded in ``out``; a torn last line is cut off so the file parses again."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
    if end < len(data):
        with out.open("r+b") as fh:
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())
        print(f"edgecm: {out}: dropped a torn last line ({len(data) - end} bytes); that image is redone", file=sys.stderr)
    done = set()
    for number, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)["path"])
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise EdgecmError(
                f"{out}:{number}: not a caption line; pass a new --out or repair that line"
            ) from None
    return done


class JsonlWriter:
    """Appends whole lines, each flushed and fsynced before ``write`` returns."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def caption_one(loaded, path: Path, prompt_text: str, video_options=None) -> dict:
    """The JSON line for one image (or, with ``video_options``, one video folder): a caption, or an
    ``error`` for an input that cannot be read."""
    from edgecm.video import read_video
    from edgecm.vision import load_image

    base = {"path": str(path), "prompt": prompt_text, "model": loaded.model_name}
    settings = {"sparsity": loaded.sparsity.to_json(), "max_new_tokens": loaded.generation.max_new_tokens}
    is_video = video_options is not None and path.is_dir()
    try:
        image = None if is_video else load_image(path)
        video = read_video(path, video_options) if is_video else None
    except EdgecmError as exc:
        return {**base, "error": str(exc), "settings": settings}
    prompt = loaded.builder.build(prompt_text, image, video)
    result = loaded.engine.generate(prompt, loaded.generation, loaded.builder.stop_token_ids, sparsity=loaded.sparsity)
    return {
        **base,
        "caption": loaded.builder.decode(result.token_ids).strip(),
        "kept_image_tokens": result.kept_image_tokens,
        "image_tokens": result.image_tokens,
        "prefill_s": round(result.timings.time_to_answer_s, 4),
        "decode_tokens_per_s": round(result.timings.decode_tokens_per_s, 2),
        "settings": settings,
    }


def cmd_caption(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from edgecm.video import VideoOptions
    from edgecm_cli import check_generation_flags, load_model, sparsity_from_flags

    check_generation_flags(args)
    sparsity_from_flags(args)  # bad flags fail before the model loads
    shard = parse_shard(args.shard)
    out = Path(args.out)
    paths = [p for p in expand_inputs(args.inputs, args.videos) if in_shard(p, shard)]
    video_options = VideoOptions(args.fps, args.max_frames) if args.videos else None
    done = recover(out)
    todo = [p for p in paths if str(p) not in done]
    print(f"edgecm: {len(paths)} images, {len(paths) - len(todo)} already in {out}, {len(todo)} to caption", file=sys.stderr)
    if not todo:
        return 0
    loaded = load_model(args)
    if not loaded.checkpoint.config.is_multimodal:
        raise EdgecmError(f"{loaded.model_name}: a text-only model cannot caption images; pass --model a LLaVA checkpoint")
    writer = JsonlWriter(out)
    errors = written = 0
    started = time.perf_counter()
    columns = (
        TextColumn("[bold]captioning"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.2f} images/s"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    try:
        with Progress(*columns, console=Console(stderr=True)) as progress:
            task = progress.add_task("caption", total=len(todo), rate=0.0)
            for path in todo:
                record = caption_one(loaded, path, args.prompt, video_options)
                errors += "error" in record
                writer.write(record)
                written += 1
                progress.update(task, advance=1, rate=written / (time.perf_counter() - started))
    except KeyboardInterrupt:
        print(
            f"edgecm: interrupted after {written} of {len(todo)} images; every finished line is saved in {out}; "
            f"run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        writer.close()
    print(f"edgecm: wrote {len(todo)} lines to {out} ({errors} errors)", file=sys.stderr)
    return 0
