"""``edgecm caption``: batch offline captioning into a JSONL file that survives interruption.

Safety of the output file:
- one process at a time: ``OUT.lock`` is held with ``flock`` for the whole run, so
  a second process on the same OUT is refused at once, naming the first;
- a file that is not a captions file (its lines are not caption records) is
  refused before anything is written, and left byte for byte as it was;
- every line is written whole, then flushed and fsynced, before the next image starts;
- on start, an existing file is read back: complete lines mark their images
  as done (captions and recorded errors alike), and a torn last line (a
  write cut off by a kill or a power loss) is truncated away, so the file
  always parses and no image is written twice;
- images are identified by their resolved absolute path.

Video files among the inputs (named directly, or found in folders with
``--videos``) are captioned as videos. With ``--videos`` a folder that holds
no video file is one video (its frames in name order, as ``run --video``
reads them) instead of a folder of images.

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
from edgecm_cli.interrupt import is_interrupt

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
LIST_SUFFIXES = {".txt", ".lst"}
# Every record this module writes starts with these bytes; a torn tail that does not is not ours.
RECORD_START = b'{"path": '


def expand_inputs(inputs: list[str], videos: bool = False) -> list[Path]:
    """Files as given, folders searched recursively for images (or, with ``videos``, for video files, and
    taken whole as a video of frames where they hold none), list files read line by line; deduplicated."""
    from edgecm.video import VIDEO_SUFFIXES

    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir() and videos:
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
            found += files or [path]
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


def plural(n: int, noun: str) -> str:
    """'1 image', '2 images', '0 errors': the summaries count anything from none to millions."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


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
    digest = hashlib.sha256(os.fsencode(path)).digest()  # the name's bytes: any file name hashes
    return int.from_bytes(digest[:8], "big") % shard[1] == shard[0]


def recover(out: Path) -> set[str]:
    """Paths already recorded in ``out``; a torn last line is cut off so the file parses again.

    Everything is checked before anything is changed: a file whose complete
    lines are not caption records, or whose unfinished tail is not the start
    of one, is not ours (a picture, a text file), and is refused untouched.
    """
    if not out.exists():
        return set()
    if not out.is_file():
        raise EdgecmError(f"--out {out}: not a regular file; pass a path for the captions file (.jsonl)")
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
    done = set()
    for number, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            done.add(record["path"])
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise EdgecmError(
                f"{out}:{number}: not a caption line, so this is not an edgecm captions file; it was left as it is. "
                f"Pass a new --out (or repair that line)"
            ) from None
    tail = data[end:]
    if tail and not (tail.startswith(RECORD_START) or RECORD_START.startswith(tail)):
        raise EdgecmError(
            f"{out}: does not end in a caption line, so this is not an edgecm captions file; it was left as it is. "
            f"Pass a new --out"
        )
    if tail:
        with out.open("r+b") as fh:
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())
        print(f"edgecm: {out}: dropped a torn last line ({len(tail)} bytes); that image is redone", file=sys.stderr)
    return done


class OutputLock:
    """An exclusive lock on ``OUT.lock`` for as long as one caption process writes OUT.

    ``flock`` locks are released by the kernel when their process dies, so a
    lock left by a killed run never blocks the next one; the file itself stays.
    """

    def __init__(self, out: Path):
        import fcntl

        self.path = out.with_name(out.name + ".lock")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.handle = self.path.open("a+")
        except OSError as exc:
            raise EdgecmError(
                f"--out {out}: cannot write in {out.parent} ({exc.strerror}); pass --out a path in a writable folder"
            ) from None
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            owner = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise EdgecmError(
                f"--out {out}: another edgecm caption (pid {owner}) is writing it; wait for that run to finish "
                f"or pass another --out"
            ) from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()

    def release(self) -> None:
        self.handle.close()  # closing the descriptor releases the lock


class JsonlWriter:
    """Appends whole lines, each flushed and fsynced before ``write`` returns."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            # A file name that is not valid UTF-8 holds surrogate escapes (Python's view of its raw
            # bytes); JSON's \\udcXX escapes record them losslessly and json.loads gives them back.
            line = json.dumps(record, ensure_ascii=True)
        self.handle.write(line + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def cmd_caption(args: argparse.Namespace) -> int:
    from edgecm_cli import check_generation_flags, sparsity_from_flags

    check_generation_flags(args)
    sparsity_from_flags(args)  # bad flags fail before the model loads
    shard = parse_shard(args.shard)
    out = Path(args.out)
    if out.exists() and not out.is_file():
        raise EdgecmError(f"--out {out}: not a regular file; pass a path for the captions file (.jsonl)")
    paths = [p for p in expand_inputs(args.inputs, args.videos) if in_shard(p, shard)]
    if args.ray is not None:
        from runtime.ray_captioning import require_ray

        require_ray()  # without the extra: one line naming the install command, before OUT is touched
    lock = OutputLock(out)
    try:
        return _caption_ray(args, out, paths) if args.ray is not None else _caption(args, out, paths)
    finally:
        lock.release()


def still_to_caption(out: Path, paths: list[Path]) -> list[Path]:
    """The paths ``out`` does not hold yet (after recovering it), said on stderr."""
    done = recover(out)
    todo = [p for p in paths if str(p) not in done]
    print(f"edgecm: {plural(len(paths), 'image')}, {len(paths) - len(todo)} already in {out}, {len(todo)} to caption",
          file=sys.stderr)
    return todo


def _caption(args: argparse.Namespace, out: Path, paths: list[Path]) -> int:
    """Caption ``paths`` into ``out``, holding its lock."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from edgecm.video import VideoOptions
    from edgecm_cli import load_model
    from runtime.captioning import Captioner

    todo = still_to_caption(out, paths)
    if not todo:
        return 0
    loaded = load_model(args)  # a text-only model, or --videos for one without video, is refused before it loads
    # A prompt the model cannot take is refused here, before OUT is touched.
    captioner = Captioner(
        loaded.engine, loaded.builder, loaded.model_name, prompt=args.prompt, generation=loaded.generation,
        sparsity=loaded.sparsity, batch_size=args.batch_size, video_options=VideoOptions(args.fps, args.max_frames),
        folders_are_videos=args.videos,
    )
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
            # A batch's lines are written when the batch is done; a kill before that redoes the batch on resume.
            for record in captioner.caption(todo):
                errors += "error" in record
                writer.write(record)
                written += 1
                progress.update(task, advance=1, rate=written / (time.perf_counter() - started))
    except BaseException as exc:
        if not is_interrupt(exc):
            raise
        print(
            f"edgecm: interrupted after {written} of {plural(len(todo), 'image')}; every finished line is saved in {out}; "
            f"run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        writer.close()
    print(f"edgecm: wrote {plural(len(todo), 'line')} to {out} ({plural(errors, 'error')})", file=sys.stderr)
    return 0


def _caption_ray(args: argparse.Namespace, out: Path, paths: list[Path]) -> int:
    """Caption ``paths`` into ``out`` on a Ray cluster, holding its lock; the driver alone writes ``out``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from edgecm.checkpoint import open_checkpoint
    from edgecm_cli import check_model_takes_inputs, checkpoint_calibration, demo_directory, sparsity_from_flags
    from runtime.captioning import AUTO_BATCH_LIMIT
    from runtime.ray_captioning import WorkerSpec, caption_on_ray, connect, placement_for

    todo = still_to_caption(out, paths)
    if not todo:
        return 0
    path = Path(args.model) if args.model else demo_directory()
    # What `edgecm caption` refuses before loading, refused here before any worker starts (config.json only).
    checkpoint = open_checkpoint(path)
    check_model_takes_inputs(args, checkpoint, args.model or "demo")
    # The same settings `edgecm caption` would use: the flags over the checkpoint's calibration record.
    sparsity = sparsity_from_flags(args, checkpoint_calibration(checkpoint, args.model or "demo"))
    ray = connect(None if args.ray == "local" else args.ray)
    place = placement_for(ray, args.device, args.workers)
    spec = WorkerSpec(
        model=args.model, prompt=args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, sparsity=sparsity, batch_size=args.batch_size, device=args.device,
        dtype=args.dtype, budget=args.budget, quant=args.quant, resident=args.resident, min_pixels=args.min_pixels,
        max_pixels=args.max_pixels, fps=args.fps, max_frames=args.max_frames, folders_are_videos=args.videos,
        threads=int(place.num_cpus),
    )
    rows = AUTO_BATCH_LIMIT if args.batch_size == "auto" else args.batch_size
    print(f"edgecm: Ray cluster at {ray.get_runtime_context().gcs_address}: {place.describe()}", file=sys.stderr)
    writer = JsonlWriter(out)
    written = errors = 0
    seen: set[str] = set()
    started = time.perf_counter()
    columns = (TextColumn("[bold]captioning on Ray"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:.2f} images/s, {task.fields[errors]} failed"), TextColumn("ETA"),
               TimeRemainingColumn())
    try:
        with Progress(*columns, console=Console(stderr=True)) as progress:
            task = progress.add_task("caption", total=len(todo), rate=0.0, errors=0)
            for record in caption_on_ray(ray, todo, spec, place, rows):
                if record["path"] in seen:  # a batch Ray retried after losing its actor: written once already
                    continue
                seen.add(record["path"])
                errors += "error" in record
                writer.write(record)
                written += 1
                progress.update(task, advance=1, rate=written / (time.perf_counter() - started), errors=errors)
    except BaseException as exc:
        if not is_interrupt(exc):
            raise
        print(f"edgecm: interrupted after {written} of {plural(len(todo), 'image')}; every finished line is saved in {out}; "
              f"run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        writer.close()
    print(f"edgecm: wrote {plural(written, 'line')} to {out} ({plural(errors, 'error')})", file=sys.stderr)
    return 0 if written == len(todo) else 1
