"""Standard streams as a shell can hand them over: closed (>&-, 2>&-, <&-), full (/dev/full), not UTF-8.

Every case runs the real program under bash with the redirection written as a user would, and checks the
exit status, that stderr holds one line and no traceback, and what reached stdout.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

import pytest

from tiny import write_test_image

TINY = dict(gqa=True, tied=False, layout="v5", sharded=False, chat_template=True)
EDGECM = f"{shlex.quote(sys.executable)} -m edgecm_cli"


def shell(command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=timeout, errors="replace")


def error_line(stderr: str) -> str:
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("edgecm: error")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_run_with_stdout_closed_is_refused_before_the_model_opens(tmp_path):
    # A path that was never a model: the refusal must come first, before anything is opened.
    done = shell(f"{EDGECM} run --model {tmp_path}/never-opened -q hi >&-")
    assert done.returncode == 2
    assert "standard output is closed (>&-)" in error_line(done.stderr)


@pytest.mark.parametrize("flags", [[], ["--json"]])
def test_run_into_a_full_stdout_is_one_line_and_exit_1(build_llava, flags):
    model_dir, _ = build_llava(**TINY)
    done = shell(f"{EDGECM} run --model {model_dir} -q hi --max-new-tokens 4 {' '.join(flags)} > /dev/full")
    assert done.returncode == 1
    assert "standard output cannot be written (No space left on device)" in error_line(done.stderr)
    assert "edgecm: prefill" not in done.stderr  # generation ended at the first failed write


def test_plan_into_a_full_stdout_is_one_line():
    done = shell(f"{EDGECM} plan --shape llava-1.5-7b --budget 12GiB > /dev/full")
    assert done.returncode == 1
    assert "No space left on device" in error_line(done.stderr)


def test_chat_with_stdin_closed_is_refused_before_the_model_opens(tmp_path):
    done = shell(f"{EDGECM} chat --model {tmp_path}/never-opened <&-")
    assert done.returncode == 2
    assert "standard input is closed (<&-)" in error_line(done.stderr)


def test_a_full_stderr_does_not_stop_a_caption_run(build_llava, tmp_path):
    """Notices and the progress bar go to stderr; a log that cannot be written loses them, not the captions."""
    model_dir, _ = build_llava(**TINY)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        write_test_image(folder / f"p{i}.png", 40 + 5 * i)
    out = tmp_path / "c.jsonl"
    done = shell(f"{EDGECM} caption {folder} --model {model_dir} --out {out} --max-new-tokens 2 2>/dev/full")
    assert done.returncode == 0
    assert len([json.loads(line) for line in out.read_text().splitlines()]) == 3


def test_stderr_closed_keeps_stats_out_of_the_answer(build_llava, tmp_path):
    model_dir, _ = build_llava(**TINY)
    answer = tmp_path / "answer.txt"
    done = shell(f"{EDGECM} run --model {model_dir} -q hi --max-new-tokens 4 --json 2>&- > {answer}")
    assert done.returncode == 0
    assert json.loads(answer.read_text())["text"] is not None  # one JSON object, nothing else in the file


def test_a_captions_file_never_takes_a_closed_stdouts_number(build_llava, tmp_path):
    """With fd 1 closed, the next file opened would become "stdout": anything printed would land in it."""
    model_dir, _ = build_llava(**TINY)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        write_test_image(folder / f"p{i}.png", 40 + 5 * i)
    out = tmp_path / "c.jsonl"
    proc = subprocess.Popen(["bash", "-c", f"exec {EDGECM} caption {folder} --model {model_dir} --out {out} "
                             f"--max-new-tokens 200 --batch-size 1 >&-"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out.exists() and out.read_text().count("\n") >= 1) and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be looked at"
        assert os.readlink(f"/proc/{proc.pid}/fd/1") == os.devnull
        assert all(os.readlink(f"/proc/{proc.pid}/fd/{fd}") != str(out) for fd in (0, 1, 2))
    finally:
        proc.kill()
        proc.wait()


def test_a_question_that_is_not_utf8_is_one_line(build_llava):
    model_dir, _ = build_llava(**TINY)
    done = shell(f"{EDGECM} run --model {model_dir} -q $'caf\\xe9?' --max-new-tokens 2")
    assert done.returncode == 2
    assert "byte \\xe9, which is not UTF-8 text" in error_line(done.stderr)


def test_piped_chat_refuses_a_line_that_is_not_utf8_and_goes_on(build_llava, tmp_path):
    model_dir, _ = build_llava(**TINY)
    messages = tmp_path / "messages.txt"
    messages.write_bytes(b"caf\xe9?\nhi\n")
    done = shell(f"LC_ALL=C.UTF-8 {EDGECM} chat --model {model_dir} --max-new-tokens 2 < {messages}")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "not UTF-8 text" in done.stdout and done.stdout.count("you>") == 3  # two lines read, then the end
    assert "last turn" in done.stdout  # "hi" was answered after the refusal


def test_guarded_streams_are_handed_back_to_an_in_process_caller(capsys):
    import edgecm_cli

    before = sys.stdout, sys.stderr
    assert edgecm_cli.main(["plan", "--shape", "llava-1.5-7b", "--budget", "12GiB", "--json"]) == 0
    assert (sys.stdout, sys.stderr) == before
    assert json.loads(capsys.readouterr().out)["budget"] > 0
