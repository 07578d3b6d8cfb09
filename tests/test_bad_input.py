"""A user's mistakes end in one line on stderr and exit 2, and nothing already written is lost.

Each test runs the real console program in a subprocess, as a user would, and
checks the exit code, that stderr holds one error line and no traceback, and
for the output-file cases the files' bytes before and after.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny import write_test_image

TINY = dict(gqa=True, tied=False, layout="v5", sharded=False, chat_template=True)


def edgecm(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecm_cli", *args], capture_output=True, text=True,
                          timeout=timeout, errors="replace")


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("edgecm: error") or "Traceback" in line]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        write_test_image(folder / f"p{i}.png", 40 + 10 * i)
    return folder


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR not jsonl at all", b"my notes\nline two\n",
                                     b'{"caption": "no path"}\n'])
def test_caption_refuses_an_out_that_is_not_a_captions_file_and_leaves_it_intact(build_llava, images, tmp_path,
                                                                                content):
    model_dir, _ = build_llava(**TINY)
    out = tmp_path / "precious.dat"
    out.write_bytes(content)
    done = edgecm("caption", str(images), "--model", str(model_dir), "--out", str(out), "--max-new-tokens", "2")
    assert done.returncode == 2
    assert "not an edgecm captions file" in one_error_line(done.stderr)
    assert out.read_bytes() == content


def test_caption_prompt_with_a_reserved_string_is_refused_before_out_is_written(build_llava, images, tmp_path):
    model_dir, _ = build_llava(**TINY)
    out = tmp_path / "c.jsonl"
    done = edgecm("caption", str(images), "--model", str(model_dir), "--out", str(out), "--prompt", "<image> what?")
    assert done.returncode == 2 and "'<image>'" in one_error_line(done.stderr)
    assert not out.exists()


def test_run_with_a_literal_image_placeholder_in_the_question(build_llava, image_path):
    model_dir, _ = build_llava(**TINY)
    done = edgecm("run", "--model", str(model_dir), "--image", str(image_path), "-q", "what is <image> here?")
    assert done.returncode == 2 and "reserves for its prompt format" in one_error_line(done.stderr)


def test_a_second_caption_process_on_the_same_out_is_refused_and_nothing_doubles(build_llava, images, tmp_path):
    model_dir, _ = build_llava(**TINY)
    for i in range(3, 8):
        write_test_image(images / f"q{i}.png", 30 + 7 * i)
    out = tmp_path / "c.jsonl"
    args = [sys.executable, "-m", "edgecm_cli", "caption", str(images), "--model", str(model_dir), "--out", str(out),
            "--max-new-tokens", "24"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out.with_name(out.name + ".lock")
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text().strip() == str(first.pid)) and time.time() < deadline:
        time.sleep(0.1)
    second = edgecm("caption", str(images), "--model", str(model_dir), "--out", str(out))
    assert second.returncode == 2
    assert f"pid {first.pid}" in one_error_line(second.stderr)
    assert first.wait(timeout=300) == 0
    paths = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert len(paths) == len(set(paths)) == 8


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(build_llava, images, tmp_path):
    model_dir, _ = build_llava(**TINY)
    out = tmp_path / "c.jsonl"
    args = [sys.executable, "-m", "edgecm_cli", "caption", str(images), "--model", str(model_dir), "--out", str(out),
            "--max-new-tokens", "24"]
    victim = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = out.with_name(out.name + ".lock")
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text().strip() == str(victim.pid)) and time.time() < deadline:
        time.sleep(0.1)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert lock.exists()
    again = edgecm("caption", str(images), "--model", str(model_dir), "--out", str(out), "--max-new-tokens", "2")
    assert again.returncode == 0, again.stderr
    assert len(out.read_text().splitlines()) == 3


def test_a_file_name_that_is_not_utf8_is_recorded_losslessly_and_resumes(build_llava, images, tmp_path):
    model_dir, _ = build_llava(**TINY)
    raw = os.fsencode(images) + b"/caf\xe9-\xff.png"  # Latin-1 bytes: not valid UTF-8
    with open(raw, "wb") as fh:
        fh.write(write_test_image(tmp_path / "src.png", 44).read_bytes())
    out = tmp_path / "c.jsonl"
    done = edgecm("caption", str(images), "--model", str(model_dir), "--out", str(out), "--max-new-tokens", "2")
    assert done.returncode == 0, done.stderr
    text = out.read_bytes().decode("utf-8")  # the file stays valid UTF-8
    records = [json.loads(line) for line in text.splitlines()]
    odd = [r for r in records if os.fsencode(r["path"]).endswith(b"caf\xe9-\xff.png")]
    assert len(odd) == 1 and "caption" in odd[0] and Path(odd[0]["path"]).exists()
    again = edgecm("caption", str(images), "--model", str(model_dir), "--out", str(out))
    assert again.returncode == 0 and "0 to caption" in again.stderr
    assert out.read_text() == text


def test_caption_out_under_a_file_is_refused_before_the_model_loads(images, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = edgecm("caption", str(images), "--model", str(tmp_path / "never-opened"), "--out", str(blocker / "c.jsonl"))
    assert done.returncode == 2 and "writable folder" in one_error_line(done.stderr)
    assert blocker.read_text() == "not a folder"


def test_caption_out_naming_a_folder_is_refused(images, tmp_path):
    done = edgecm("caption", str(images), "--model", str(tmp_path / "never-opened"), "--out", str(tmp_path))
    assert done.returncode == 2 and "not a regular file" in one_error_line(done.stderr)
