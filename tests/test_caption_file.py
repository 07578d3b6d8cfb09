"""The captions file and what caption reads, against real links, FIFOs, a real full filesystem and real runs.

Each case runs the console program in a subprocess and checks the exit status, the one line it ends
with, and the captions file's lines before and after.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_bad_input import TINY, edgecm, one_error_line, wait_for_holder
from tiny import write_test_image


def caption_args(model_dir, *inputs, out, extra=()) -> list[str]:
    return ["caption", *map(str, inputs), "--model", str(model_dir), "--out", str(out), *extra]


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture()
def folder(tmp_path) -> Path:
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(12):
        write_test_image(images / f"p{i:02d}.png", 32 + 3 * i)
    return images


def slow_run(model_dir, folder: Path, out: Path) -> subprocess.Popen:
    """A run that holds OUT for a while: one image at a time, long answers."""
    return subprocess.Popen([sys.executable, "-m", "edgecm_cli", *caption_args(
        model_dir, folder, out=out, extra=["--max-new-tokens", "300", "--batch-size", "1"])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_lock_covers_every_path_to_the_file(build_llava, folder, tmp_path):
    """A symlink and a hard link to a file being written are both refused: nothing is captioned twice."""
    model_dir, _ = build_llava(**TINY)
    for extra in sorted(folder.iterdir())[8:]:
        extra.unlink()  # eight images: enough for the first run to outlast the others' start
    out = tmp_path / "c.jsonl"
    out.touch()
    hard, soft = tmp_path / "hard.jsonl", tmp_path / "elsewhere" / "soft.jsonl"
    os.link(out, hard)
    soft.parent.mkdir()
    soft.symlink_to(out)
    first = slow_run(model_dir, folder, out)
    wait_for_holder(out, first.pid)
    others = [subprocess.Popen([sys.executable, "-m", "edgecm_cli", *caption_args(model_dir, folder, out=link)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for link in (hard, soft)]
    for other in others:
        _, err = other.communicate(timeout=300)
        assert other.returncode == 2, err
        assert f"another edgecm caption (pid {first.pid}) is writing this file" in one_error_line(err)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    paths = [r["path"] for r in lines(out)]
    assert len(paths) == len(set(paths)) == 8
    assert hard.read_bytes() == out.read_bytes()  # still one file


def test_a_full_disk_ends_in_one_line_and_the_file_ends_whole(build_llava, folder, small_disk):
    model_dir, _ = build_llava(**TINY)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 60 * 1024)  # one 4 KiB page left: a few caption lines, not twelve
    out = small_disk / "c.jsonl"
    args = caption_args(model_dir, folder, out=out, extra=["--max-new-tokens", "2"])
    done = edgecm(*args)
    assert done.returncode == 1, done.stderr
    line = one_error_line(done.stderr)
    assert f"the disk holding {out} is full (No space left on device)" in line
    assert "are safe, and the file ends in a whole line" in line
    written = lines(out)  # every line parses: nothing torn
    assert out.read_bytes().endswith(b"\n") and 0 < len(written) < 12
    command = shlex.split(line.split("then resume with: ", 1)[1])
    assert command == ["edgecm", *args]  # the command that resumes is the one that was run
    filler.unlink()
    again = edgecm(*command[1:])
    assert again.returncode == 0, again.stderr
    paths = [r["path"] for r in lines(out)]
    assert len(paths) == len(set(paths)) == 12
    assert [r["path"] for r in lines(out)[: len(written)]] == [r["path"] for r in written]


def test_entries_that_look_like_images_never_go_missing(build_llava, folder):
    """A link that loops, a link to nothing and a FIFO, each named *.png in a folder: one error line each."""
    model_dir, _ = build_llava(**TINY)
    (folder / "self.png").symlink_to("self.png")
    (folder / "gone.png").symlink_to("deleted-long-ago.png")
    os.mkfifo(folder / "pipe.png")  # reading it would wait for a writer forever
    out = folder.parent / "c.jsonl"
    done = edgecm(*caption_args(model_dir, folder, out=out, extra=["--max-new-tokens", "2"]), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "15 images" in done.stderr and "(3 errors)" in done.stderr
    errors = {Path(r["path"]).name: r["error"] for r in lines(out) if "error" in r}
    assert "a symbolic link to nothing" in errors["self.png"] and "a symbolic link to nothing" in errors["gone.png"]
    assert "a FIFO (named pipe), not an image file" in errors["pipe.png"]
    named = edgecm(*caption_args(model_dir, folder / "self.png", out=folder.parent / "d.jsonl"))
    assert named.returncode == 0 and "a symbolic link to nothing" in lines(folder.parent / "d.jsonl")[0]["error"]


def test_error_lines_can_be_retried_and_are_counted(build_llava, folder, tmp_path):
    """A file that vanished mid-run and came back: plain runs skip it, --retry-errors captions it."""
    model_dir, _ = build_llava(**TINY)
    for extra in sorted(folder.iterdir())[6:]:
        extra.unlink()  # six images: p00..p05
    last = folder / "p05.png"
    kept = last.read_bytes()
    out = tmp_path / "c.jsonl"
    first = slow_run(model_dir, folder, out)
    deadline = time.time() + 120
    while not (out.exists() and out.read_text().count("\n") >= 1):
        assert time.time() < deadline and first.poll() is None, "no first line"
        time.sleep(0.05)
    last.unlink()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert "1 image in it ends in an error line: run again with --retry-errors to retry it" in err
    assert "no such image file" in next(r for r in lines(out) if r["path"] == str(last))["error"]
    last.write_bytes(kept)
    plain = edgecm(*caption_args(model_dir, folder, out=out))
    assert "6 images, 6 already in" in plain.stderr and "(1 of them as error lines: --retry-errors" in plain.stderr
    assert "0 to caption" in plain.stderr and len(lines(out)) == 6
    retry = edgecm(*caption_args(model_dir, folder, out=out, extra=["--retry-errors", "--max-new-tokens", "2"]))
    assert retry.returncode == 0, retry.stderr
    assert "1 to caption (1 of them error lines retried)" in retry.stderr
    assert "in an error line" not in retry.stderr  # none left
    records = lines(out)
    mine = [r for r in records if r["path"] == str(last)]
    assert len(records) == 7 and "error" in mine[0] and "caption" in mine[1]  # the error line stays, before
    latest = {r["path"]: r for r in records}  # an image's last line counts
    assert len(latest) == 6 and all("caption" in r for r in latest.values())


def test_a_linked_folder_is_searched_once_and_a_loop_is_not_followed(build_llava, folder, tmp_path):
    model_dir, _ = build_llava(**TINY)
    elsewhere = tmp_path / "more"
    elsewhere.mkdir()
    write_test_image(elsewhere / "linked.png", 50)
    (folder / "more").symlink_to(elsewhere)  # rglob did not follow it, and said nothing
    (folder / "again").symlink_to(elsewhere)  # the same folder a second time
    (elsewhere / "up").symlink_to(folder)  # a loop back to the top
    out = tmp_path / "c.jsonl"
    done = edgecm(*caption_args(model_dir, folder, out=out, extra=["--max-new-tokens", "2"]), timeout=120)
    assert done.returncode == 0, done.stderr
    paths = [r["path"] for r in lines(out)]
    assert len(paths) == len(set(paths)) == 13 and str(elsewhere / "linked.png") in paths


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder, so no folder here is unreadable")
def test_an_unreadable_folder_is_a_counted_skip(build_llava, folder, tmp_path):
    model_dir, _ = build_llava(**TINY)
    locked = folder / "locked"
    locked.mkdir()
    write_test_image(locked / "hidden.png", 40)
    locked.chmod(0)
    try:
        done = edgecm(*caption_args(model_dir, folder, out=tmp_path / "c.jsonl", extra=["--max-new-tokens", "2"]))
    finally:
        locked.chmod(0o755)
    assert done.returncode == 0 and f"skipped {locked} (a folder that cannot be read" in done.stderr
    assert "1 skipped" in done.stderr


def test_an_out_that_is_a_looping_link_is_one_line(folder, tmp_path):
    out = tmp_path / "c.jsonl"
    out.symlink_to(out.name)
    done = edgecm(*caption_args(tmp_path / "never-opened", folder, out=out))
    assert done.returncode == 2 and "a symbolic link that loops" in one_error_line(done.stderr)


def test_an_out_through_a_dangling_link_is_made_and_resumed(build_llava, folder, tmp_path):
    model_dir, _ = build_llava(**TINY)
    target, link = tmp_path / "real" / "c.jsonl", tmp_path / "c.jsonl"
    target.parent.mkdir()
    link.symlink_to(target)
    first = edgecm(*caption_args(model_dir, *sorted(folder.iterdir())[:2], out=link, extra=["--max-new-tokens", "2"]))
    assert first.returncode == 0 and link.is_symlink() and len(lines(target)) == 2, first.stderr
    again = edgecm(*caption_args(model_dir, folder, out=link, extra=["--max-new-tokens", "2"]))
    assert again.returncode == 0 and "2 already in" in again.stderr
    assert link.is_symlink() and len(lines(target)) == 12


def test_a_refused_run_through_a_dangling_link_leaves_the_link_and_no_file(folder, tmp_path):
    target, link = tmp_path / "c.jsonl", tmp_path / "link.jsonl"
    link.symlink_to(target)
    done = edgecm(*caption_args(tmp_path / "never-opened", folder, out=link))
    assert done.returncode == 2
    assert link.is_symlink() and not target.exists()  # the empty file it made is gone, the user's link stays


def test_the_out_file_among_the_inputs_is_skipped_not_captioned(build_llava, folder):
    """`caption imgs/* --out imgs/c.jsonl`, run twice: the second time the glob names the captions file."""
    model_dir, _ = build_llava(**TINY)
    out = folder / "c.jsonl"
    inputs = sorted(folder.glob("p0[0-2].png"))
    assert edgecm(*caption_args(model_dir, *inputs, out=out, extra=["--max-new-tokens", "2"])).returncode == 0
    before = out.read_bytes()
    again = edgecm(*caption_args(model_dir, *inputs, out, out=out, extra=["--max-new-tokens", "2"]))
    assert again.returncode == 0, again.stderr
    assert f"skipped {out} (it is --out itself)" in again.stderr and "1 skipped" in again.stderr
    assert out.read_bytes() == before


def test_a_binary_list_file_is_one_line(tmp_path):
    listing = tmp_path / "inputs.txt"
    listing.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    done = edgecm(*caption_args(tmp_path / "never-opened", listing, out=tmp_path / "c.jsonl"))
    assert done.returncode == 2 and "not a list of paths (it holds NUL bytes" in one_error_line(done.stderr)
    assert not (tmp_path / "c.jsonl").exists()


def test_a_list_file_naming_files_that_are_not_utf8(build_llava, folder, tmp_path):
    model_dir, _ = build_llava(**TINY)
    odd = os.fsencode(folder) + b"/caf\xe9.png"
    with open(odd, "wb") as fh:
        fh.write((folder / "p00.png").read_bytes())
    listing = tmp_path / "inputs.lst"
    listing.write_bytes(odd + b"\n")
    out = tmp_path / "c.jsonl"
    done = edgecm(*caption_args(model_dir, listing, out=out, extra=["--max-new-tokens", "2"]))
    assert done.returncode == 0, done.stderr
    [record] = lines(out)
    assert os.fsencode(record["path"]) == odd and "caption" in record
