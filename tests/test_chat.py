"""edgecm chat, driven as a person would: the real program in a pseudo-terminal (pexpect)."""

from __future__ import annotations

import os
import sys

import pexpect
from conftest import default_sigint

TINY = dict(gqa=True, tied=False, layout="v5", sharded=False, chat_template=True)
PROMPT = "you>"


def spawn(args, env_extra=None, timeout=90):
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40", **(env_extra or {})}
    # The terminal's own ^C echo can land inside a multi-byte character: decode with replacement.
    child = pexpect.spawn(
        sys.executable, ["-m", "edgecm_cli", "chat", *args], env=env, encoding="utf-8", codec_errors="replace",
        timeout=timeout, preexec_fn=default_sigint,
    )
    child.expect(PROMPT)
    return child


def test_chat_commands_and_turns(build_llava, image_path, frames_dir):
    model_dir, _ = build_llava(**TINY)
    child = spawn(["--model", str(model_dir), "--image", str(image_path), "--max-new-tokens", "6"])
    child.sendline("What is shown?")
    child.expect("KV cache")  # the live panel
    child.expect("kept \\d+ of 16")
    child.expect(PROMPT)
    child.sendline("And the colours?")  # a second turn over the same conversation
    child.expect("last turn")
    child.expect(PROMPT)
    child.sendline("/stats")
    child.expect("decode_tokens_per_s")
    child.expect("core neurons per layer")
    child.expect(PROMPT)
    child.sendline("/image /no/such/file.png")
    child.expect("no such image file")
    child.expect(PROMPT)
    child.sendline(f"/image {image_path}")
    child.expect("image attached")
    child.expect(PROMPT)
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.expect(PROMPT)
    child.sendline("/help")
    child.expect("/quit")
    child.expect(PROMPT)
    child.sendline("/bogus")
    child.expect("unknown command")
    child.expect(PROMPT)
    child.sendline(f"/video {frames_dir}")  # a LLaVA model: refused at once, not at the next answer
    child.expect("this model takes no video")
    child.expect(PROMPT)
    child.sendline("Is <image> a word?")  # a forged placeholder is refused, and the chat goes on
    child.expect("reserves for its prompt format")
    child.expect(PROMPT)
    child.sendline("What is shown?")
    child.expect("last turn")
    child.expect(PROMPT)
    child.sendintr()  # Ctrl-C at the prompt does not leave
    child.expect("Ctrl-D or /quit to leave")
    child.expect(PROMPT)
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_an_answer_and_ctrl_d_leaves(demo_home):
    """On the demo (real language weights, streamed layers): a long answer is stopped mid-way."""
    child = spawn(["--max-new-tokens", "400"], {"EDGECM_HOME": str(demo_home)}, timeout=180)
    child.sendline("Write a long story about a dragon who learns to bake bread.")
    child.expect(r"decoding.{0,40}?\d+ tokens")  # tokens are streaming (colour codes sit between label and count)
    child.sendintr()
    child.expect("answer stopped")
    child.expect(PROMPT)
    child.sendline("/stats")
    child.expect("decode_s")
    child.expect(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_control_characters_in_an_answer_are_shown_escaped(control_parrot):
    from conftest import CONTROL_ANSWER

    child = spawn(["--model", str(control_parrot), "--max-new-tokens", "5"])
    child.sendline("hi")
    child.expect(r"(\\x13){5}")
    shown = child.before + child.after
    child.expect(PROMPT)
    shown += child.before
    assert CONTROL_ANSWER not in shown, repr(shown)
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_piped_chat_starts_each_prompt_on_its_own_line(build_llava):
    """stdin and stdout not terminals (a script feeding questions): the transcript reads turn by turn."""
    import subprocess

    model_dir, _ = build_llava(**TINY)
    done = subprocess.run([sys.executable, "-m", "edgecm_cli", "chat", "--model", str(model_dir), "--max-new-tokens", "3"],
                          input="What is shown?\n/help\nAnd now?\n", capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "120"})
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count(PROMPT) == 4, out  # three lines read, then end of input
    assert all(out[i - 1] == "\n" for i in range(len(out)) if out.startswith(PROMPT, i)), out
    assert f"{PROMPT} What is shown?\n" in out and f"{PROMPT} /help\ncommands:" in out and f"{PROMPT} And now?\n" in out
    assert "╯\n" in out and "╯" + PROMPT not in out


def test_reset_detaches_a_video_that_no_message_can_pass(build_qwen2_5_vl, tmp_path):
    """A video too long for the tiny model's context makes every message fail; /reset must clear it (it used
    to keep the attachments, so the chat stayed stuck)."""
    from tiny import write_test_frames

    model_dir, _ = build_qwen2_5_vl()
    long_video = write_test_frames(tmp_path / "long", count=96)  # 48 temporal patches x 12 tokens: past 512
    child = spawn(["--model", str(model_dir), "--max-new-tokens", "4"])
    child.sendline(f"/video {long_video}")
    child.expect("video attached")
    child.expect(PROMPT)
    child.sendline("What happens?")
    child.expect("context")
    child.expect(PROMPT)
    child.sendline("And now?")  # still attached: still refused
    child.expect("context")
    child.expect(PROMPT)
    child.sendline("/reset")
    child.expect("image and video detached")
    child.expect(PROMPT)
    child.sendline("What happens?")
    child.expect("last turn")
    child.expect(PROMPT)
    assert "video:" not in child.before  # the panel's title no longer names a video
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
