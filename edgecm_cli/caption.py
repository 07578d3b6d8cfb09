"""``edgecm caption``: batch offline captioning into a JSONL file that survives interruption.

The output file's guarantees (one lock on the file itself, whole fsynced lines, resume, a full disk
that leaves the file whole, ``--retry-errors``) are edgecm_cli.captions_file's.

Inputs: image files named directly, folders searched recursively (links to folders followed, each
folder once), and .txt/.lst files listing paths. In a folder, every entry whose name looks like an
input (an image suffix; with ``--videos`` a video suffix) is an input, even one that cannot be read (a
link to nothing, a FIFO): it gets an error line, never silence; what cannot be searched (an unreadable
folder) is a counted skip, named on stderr. Images are identified by their resolved absolute path.

Video files among the inputs (named directly, or found in folders with
``--videos``) are captioned as videos. With ``--videos`` a folder that holds
no video file is one video (its frames in name order, as ``run --video``
reads them) instead of a folder of images.

``--shard I/N`` keeps the images whose path hash modulo N is I: independent of
listing order and of which other files exist, so N launchers need no coordination.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgecm.errors import EdgecmError
from edgecm_cli.captions_file import CaptionsFile, CaptionsFileError
from edgecm_cli.interrupt import is_interrupt
from edgecm_cli.ray_address import RAY_CONNECT_TIMEOUT_S, bounded_wait, check_address, check_timeout, probe

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
LIST_SUFFIXES = {".txt", ".lst"}


@dataclass
class Listing:
    """The inputs found, and what was left out of the search, one line each (said on stderr)."""

    paths: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _search(folder: Path, suffixes, listing: Listing) -> list[Path]:
    """Entries under ``folder`` whose names end in ``suffixes``, links to folders followed, each folder once.

    pathlib's rglob neither follows a link to a folder nor says it did not, and drops an entry it cannot
    stat (a link that loops): both were silently missing images.
    """
    found, seen, stack = [], set(), [folder]
    while stack:
        current = stack.pop()
        try:
            st = current.stat()
            if (st.st_dev, st.st_ino) in seen:  # a link back up the tree, or a second link to one folder
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(current))
        except OSError as exc:
            listing.skipped.append(f"{current} (a folder that cannot be read: {exc.strerror})")
            continue
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows a link; False for one that dangles or loops
            except OSError:
                is_dir = False
            if is_dir:
                stack.append(Path(entry.path))
            elif os.path.splitext(entry.name)[1].lower() in suffixes:
                found.append(Path(entry.path))  # unreadable or not: it gets a line
    return sorted(found)


def read_list(path: Path) -> list[Path]:
    """The paths a .txt/.lst file lists, one a line (# comments); names are bytes, as file names are."""
    data = path.read_bytes()
    if b"\0" in data:
        raise EdgecmError(f"{path}: not a list of paths (it holds NUL bytes, so it is a binary file); pass a text "
                          f"file with one path a line")
    found = []
    for raw in data.splitlines():
        line = os.fsdecode(raw).strip()  # any file name, UTF-8 or not
        if line and not line.startswith("#"):
            listed = Path(line).expanduser()
            found.append(listed if listed.is_absolute() else path.parent / listed)
    return found


def identity(path: Path) -> str:
    """The absolute path an input is recorded under: links resolved, or the link itself where it leads
    nowhere (so its error line names the link the user has)."""
    resolved = os.path.realpath(path)
    return resolved if os.path.exists(resolved) else os.path.abspath(path)


def expand_inputs(inputs: list[str], videos: bool = False) -> Listing:
    """Files as given, folders searched recursively for images (or, with ``videos``, for video files, and
    taken whole as a video of frames where they hold none), list files read line by line; deduplicated."""
    from edgecm.video import VIDEO_SUFFIXES

    listing = Listing()
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir() and videos:
            found += _search(path, set(VIDEO_SUFFIXES), listing) or [path]
        elif path.is_dir():
            found += _search(path, IMAGE_SUFFIXES, listing)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            found += read_list(path)
        elif path.exists() or path.is_symlink():  # a link to nothing is an input that gets its error line
            found.append(path)
        else:
            raise EdgecmError(f"{path}: no such file or folder; pass image files, folders or .txt/.lst path lists")
    unique: dict[str, Path] = {}
    for p in found:
        unique.setdefault(identity(p), p)
    listing.paths = [Path(key) for key in unique]
    return listing


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


def cmd_caption(args: argparse.Namespace) -> int:
    from edgecm_cli import check_generation_flags, sparsity_from_flags

    check_generation_flags(args)
    sparsity_from_flags(args)  # bad flags fail before the model loads
    shard = parse_shard(args.shard)
    out = Path(args.out)
    if out.exists() and not out.is_file():
        raise EdgecmError(f"--out {out}: not a regular file; pass a path for the captions file (.jsonl)")
    if args.ray is None and (args.workers is not None or args.ray_timeout != RAY_CONNECT_TIMEOUT_S):
        flag = "--workers" if args.workers is not None else "--ray-timeout"
        raise EdgecmError(f"{flag} is for captioning on Ray; add --ray (alone for a local cluster), or drop {flag}")
    target = None if args.ray is None else check_address(args.ray)  # malformed: refused before Ray starts
    listing = expand_inputs(args.inputs, args.videos)
    if args.ray is not None:
        from runtime.ray_captioning import require_ray

        require_ray()  # without the extra: one line naming the install command, before OUT is touched
        if target is not None:
            probe(args.ray, target, check_timeout(args.ray_timeout))  # nothing listening: one line, at once
    captions = CaptionsFile(out)  # locked from here on, by the file's inode
    try:
        paths = []
        for p in listing.paths:
            if captions.same_file(p):  # e.g. `caption dir/* --out dir/c.jsonl`, run a second time
                listing.skipped.append(f"{p} (it is --out itself)")
            elif in_shard(p, shard):
                paths.append(p)
        for line in listing.skipped:
            print(f"edgecm: skipped {line}", file=sys.stderr)
        todo = still_to_caption(captions, paths, args.retry_errors, len(listing.skipped))
        if not todo:
            return 0
        run = _caption_ray if args.ray is not None else _caption
        return run(args, captions, todo)
    finally:
        captions.close()


def still_to_caption(captions: CaptionsFile, paths: list[Path], retry_errors: bool, skipped: int = 0) -> list[Path]:
    """The paths ``captions`` does not hold yet (with ``retry_errors``, or holds as errors), said on stderr."""
    done = captions.contents.done(retry_errors)
    todo = [p for p in paths if str(p) not in done]
    retried = sum(1 for p in todo if captions.contents.last_is_error.get(str(p)))
    errors = sum(1 for p in paths if captions.contents.last_is_error.get(str(p)))
    held = f"{len(paths) - len(todo)} already in {captions.out}"
    if errors and not retry_errors:
        held += f" ({errors} of them as error lines: --retry-errors tries them again)"
    line = f"edgecm: {plural(len(paths), 'image')}, {held}, {len(todo)} to caption"
    if retried:
        line += f" ({retried} of them error lines retried)"
    if skipped:
        line += f"; {skipped} skipped (above)"
    print(line, file=sys.stderr)
    return todo


def resume_command(args: argparse.Namespace) -> str:
    return shlex.join(getattr(args, "command_line", None) or ["edgecm", "caption", "..."])


def write_failed(args: argparse.Namespace, captions: CaptionsFile, exc: CaptionsFileError, written: int,
                 total: int) -> int:
    """One line for a line that could not be written: what filled up, what is safe, how to resume."""
    out = captions.out
    what = (f"the disk holding {out} is full ({exc.reason})" if exc.reason in (os.strerror(errno.ENOSPC),
            os.strerror(errno.EDQUOT)) else f"{out} cannot be written ({exc.reason})")
    print(f"edgecm: error: {what} after {written} of {plural(total, 'image')}; the {plural(written, 'line')} written "
          f"and every line before them are safe, and the file ends in a whole line; make room, then resume with: "
          f"{resume_command(args)}", file=sys.stderr)
    return 1


def summary(captions: CaptionsFile, written: int, errors: int) -> str:
    line = f"edgecm: wrote {plural(written, 'line')} to {captions.out} ({plural(errors, 'error')})"
    held = captions.contents.errors
    if held:
        line += (f"; {plural(held, 'image')} in it {'ends' if held == 1 else 'end'} in an error line: run again "
                 f"with --retry-errors to retry {'it' if held == 1 else 'them'}")
    return line


def _caption(args: argparse.Namespace, captions: CaptionsFile, todo: list[Path]) -> int:
    """Caption ``todo`` into ``captions``, holding its lock."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from edgecm.video import VideoOptions
    from edgecm_cli import load_model
    from runtime.captioning import Captioner

    loaded = load_model(args)  # a text-only model, or --videos for one without video, is refused before it loads
    # A prompt the model cannot take is refused here, before OUT is touched.
    captioner = Captioner(
        loaded.engine, loaded.builder, loaded.model_name, prompt=args.prompt, generation=loaded.generation,
        sparsity=loaded.sparsity, batch_size=args.batch_size, video_options=VideoOptions(args.fps, args.max_frames),
        folders_are_videos=args.videos,
    )
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
                captions.append(record)
                errors += "error" in record
                written += 1
                progress.update(task, advance=1, rate=written / (time.perf_counter() - started))
    except CaptionsFileError as exc:
        return write_failed(args, captions, exc, written, len(todo))
    except BaseException as exc:
        if not is_interrupt(exc):
            raise
        print(
            f"edgecm: interrupted after {written} of {plural(len(todo), 'image')}; every finished line is saved in "
            f"{captions.out}; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    print(summary(captions, written, errors), file=sys.stderr)
    return 0


def _caption_ray(args: argparse.Namespace, captions: CaptionsFile, todo: list[Path]) -> int:
    """Caption ``todo`` into ``captions`` on a Ray cluster, holding its lock; the driver alone writes it."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from edgecm.checkpoint import open_checkpoint
    from edgecm_cli import (
        check_model_takes_inputs, checkpoint_calibration, demo_directory, refuse_idle_sparsevlm_flags,
        sparsity_from_flags,
    )
    from runtime.captioning import AUTO_BATCH_LIMIT
    from runtime.ray_captioning import WorkerSpec, caption_on_ray, connect, placement_for

    path = Path(args.model) if args.model else demo_directory()
    # What `edgecm caption` refuses before loading, refused here before any worker starts (config.json only).
    checkpoint = open_checkpoint(path)
    check_model_takes_inputs(args, checkpoint, args.model or "demo")
    # The same settings `edgecm caption` would use: the flags over the checkpoint's calibration record.
    calibration = checkpoint_calibration(checkpoint, args.model or "demo")
    sparsity = sparsity_from_flags(args, calibration)
    if calibration is not None and sparsity.mode != "dense":  # the line every other command prints
        print(f"edgecm: {calibration.describe()}; flags override it", file=sys.stderr)
    refuse_idle_sparsevlm_flags(args, sparsity)
    if args.ray == "local":
        ray = connect(None)
    else:
        with bounded_wait(args.ray, args.ray_timeout, cleanup=captions.close):
            ray = connect(args.ray)
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
                captions.append(record)
                errors += "error" in record
                written += 1
                progress.update(task, advance=1, rate=written / (time.perf_counter() - started), errors=errors)
    except CaptionsFileError as exc:
        return write_failed(args, captions, exc, written, len(todo))
    except BaseException as exc:
        if not is_interrupt(exc):
            raise
        print(f"edgecm: interrupted after {written} of {plural(len(todo), 'image')}; every finished line is saved in "
              f"{captions.out}; run the same command again to resume", file=sys.stderr)
        return 130
    print(summary(captions, written, errors), file=sys.stderr)
    return 0 if written == len(todo) else 1
