"""A user's mistakes end in one line on stderr and exit 2, and nothing already written is lost.

Each test runs the real console program in a subprocess, as a user would, and
checks the exit code, that stderr holds one error line and no traceback, and
for the output-file cases the files' bytes before and after.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import default_sigint
from tiny import write_test_image, write_test_video

TINY = dict(gqa=True, tied=False, layout="v5", sharded=False, chat_template=True)


def edgecm(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecm_cli", *args], capture_output=True, text=True,
                          timeout=timeout, errors="replace")


def one_error_line(stderr: str) -> str:
    # "edgecm: error: ..." from a command, "edgecm COMMAND: error: ..." from argument parsing
    lines = [line for line in stderr.splitlines() if re.match(r"edgecm( \w+)?: error", line) or "Traceback" in line]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


def wait_for_holder(out: Path, pid: int, timeout: float = 120) -> None:
    """Until process ``pid`` holds the lock on ``out`` (the file itself)."""
    from edgecm_cli.captions_file import holder_of

    deadline = time.time() + timeout
    while holder_of(out) != pid:
        assert time.time() < deadline, f"pid {pid} never locked {out}"
        time.sleep(0.1)


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
    # One image at a time and long answers: the first run must still hold OUT when the second one starts.
    args = [sys.executable, "-m", "edgecm_cli", "caption", str(images), "--model", str(model_dir), "--out", str(out),
            "--max-new-tokens", "300", "--batch-size", "1"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_holder(out, first.pid)
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
    wait_for_holder(out, victim.pid)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
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


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature -1.0: must be 0"),
    (["--temperature", "nan"], "argument --temperature: nan: use a finite number, not inf or nan"),
    (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    (["--budget", "0"], "--budget 0: must be more than zero"),
    (["--budget=-2GiB"], "--budget -2GiB: use a positive size"),
    (["--budget", "lots"], "--budget lots: use a positive size"),
])
def test_generation_flags_are_refused_before_the_model_is_opened(flags, message, tmp_path):
    done = edgecm("run", "--model", str(tmp_path / "never-opened"), "-q", "hi", *flags)
    assert done.returncode == 2 and message in one_error_line(done.stderr)


@pytest.mark.parametrize("flags, message", [
    (["--dense-layers", "1,99"], "--dense-layers 1,99: layer 99 does not exist; the model has 3 layers, 0..2"),
    (["--prune-layer", "3"], "--prune-layer 3: the model has 3 layers, 0..2"),
])
def test_layer_numbers_past_the_model_are_refused_naming_its_layer_count(build_llava, flags, message):
    model_dir, _ = build_llava(**TINY)
    done = edgecm("run", "--model", str(model_dir), "-q", "hi", *flags)
    assert done.returncode == 2 and message in one_error_line(done.stderr)


@pytest.mark.parametrize("flags, message", [
    (["--prompt-tokens", "-1"], "--prompt-tokens -1: must be at least 1"),
    (["--new-tokens", "0"], "--new-tokens 0: must be at least 1"),
    (["--kept-tokens", "-5"], "--kept-tokens -5: must be at least 0"),
])
def test_plan_refuses_negative_sizes(flags, message):
    done = edgecm("plan", "--shape", "llava-1.5-7b", "--budget", "12GiB", *flags)
    assert done.returncode == 2 and message in one_error_line(done.stderr)


@pytest.mark.parametrize("command, flag", [
    (["run", "-q", "hi", "--video", "FRAMES"], "--video"),
    (["chat", "--video", "FRAMES"], "--video"),
    (["show", "-q", "hi", "--video", "FRAMES", "--out", "OUT.png"], "--video"),
    (["caption", "--videos", "FRAMES", "--out", "OUT.jsonl"], "--videos"),
])
def test_video_for_a_model_without_video_is_refused_before_it_loads(build_llava, frames_dir, tmp_path, command, flag):
    model_dir, _ = build_llava(**TINY)
    command = [str(frames_dir) if a == "FRAMES" else str(tmp_path / a) if a.startswith("OUT") else a for a in command]
    # --device is first checked as the engine is built: a refusal naming the video flag instead means the
    # model was judged from its config.json alone, before any weight was read.
    done = edgecm(*command, "--model", str(model_dir), "--device", "not-a-device")
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and f"{flag}: {model_dir} (llava) takes no video" in line, line
    assert "Qwen2_5_VLForConditionalGeneration" in line


@pytest.mark.parametrize("command, message", [
    (["run", "-q", "hi", "--image", "IMAGE"], "--image: MODEL is a text-only model"),
    (["caption", "IMAGE", "--out", "OUT.jsonl"], "MODEL: a text-only model cannot caption images"),
])
def test_an_image_for_a_text_only_model_is_refused_before_it_loads(build_llama, image_path, tmp_path, command, message):
    model_dir, _ = build_llama()
    command = [str(image_path) if a == "IMAGE" else str(tmp_path / a) if a.startswith("OUT") else a for a in command]
    done = edgecm(*command, "--model", str(model_dir), "--device", "not-a-device")
    assert done.returncode == 2 and message.replace("MODEL", str(model_dir)) in one_error_line(done.stderr)


def test_a_budget_beyond_the_device_means_all_of_it(build_llava):
    model_dir, _ = build_llava(**TINY)
    done = edgecm("run", "--model", str(model_dir), "-q", "hi", "--budget", "1PiB", "--max-new-tokens", "2")
    assert done.returncode == 0, done.stderr
    assert "--budget 1PiB is more than the cpu device has; planning with all of it" in done.stderr
    assert "all layers kept" in done.stderr


def test_a_tensor_whose_shape_disagrees_with_config_is_named_when_the_checkpoint_opens(build_llava, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    model_dir, _ = build_llava(**TINY)
    copy = tmp_path / "mismatched"
    shutil.copytree(model_dir, copy)
    weights = copy / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k in state if k.endswith("layers.1.mlp.up_proj.weight"))
    state[name] = state[name][:-8].clone()  # a truncated matrix: 8 rows short
    save_file(state, str(weights), metadata={"format": "pt"})
    done = edgecm("run", "--model", str(copy), "-q", "hi")
    line = one_error_line(done.stderr)
    assert done.returncode == 2
    assert "layers.1.mlp.up_proj.weight has shape [152, 64] but config.json implies [160, 64]" in line


def test_a_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from edgecm.vision import load_image

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    seen = np.asarray(load_image(tmp_path / "grey16.png"))
    assert seen.shape == (32, 32, 3)
    np.testing.assert_allclose(seen[..., 0], ramp / 257.0, atol=0.51)  # 0..65535 onto 0..255, not clipped at 255


def test_run_into_a_closed_pipe_exits_quietly_with_its_stats(build_llava):
    model_dir, _ = build_llava(**TINY)
    # `edgecm run ... | head -c 1`: the reader leaves after one byte.
    shell = (f"{sys.executable} -m edgecm_cli run --model {model_dir} -q 'hi' --max-new-tokens 64 "
             f"--temperature 1 --seed 3 2>{model_dir.parent}/stderr.txt | head -c 1 >/dev/null; "
             f"echo ${{PIPESTATUS[0]}}")
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=300)
    stderr = (model_dir.parent / "stderr.txt").read_text()
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("edgecm: prefill")]  # the usual stats
    assert done.stdout.strip() in ("0", "141")


@pytest.mark.parametrize("delay", [2.0, 5.0, 10.0])
def test_ctrl_c_at_any_moment_is_one_line_and_exit_130(demo_home, delay):
    """Imports, loading, prefill and decode alike: SIGINT ``delay`` seconds into a long run on the demo.

    (The first moments belong to the interpreter starting up, before any edgecm code runs.)
    """
    from edgecm.demo import demo_checkpoint_dir

    demo_checkpoint_dir()  # built beforehand, so the signal lands in loading, prefill or decode
    run = subprocess.Popen([sys.executable, "-m", "edgecm_cli", "run", "--mode", "dense", "--max-new-tokens", "400",
                            "-q", "Write a long story about a dragon who learns to bake bread."],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint,
                           env={**os.environ, "EDGECM_HOME": str(demo_home)})
    time.sleep(delay)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    if run.returncode == 0:
        pytest.skip("the run finished before the signal")
    assert run.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "edgecm: interrupted"


@pytest.mark.parametrize("where", ["folder", "under-a-file"])
def test_show_out_that_cannot_be_written_is_refused_before_the_model_loads(image_path, tmp_path, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = tmp_path / "pic.png" if where == "folder" else blocker / "pic.png"
    if where == "folder":
        out.mkdir()
    done = edgecm("show", "--model", str(tmp_path / "never-opened"), "--image", str(image_path), "-q", "hi",
                  "--out", str(out), "--tokens", "count:2")
    assert done.returncode == 2
    assert ("is a folder" if where == "folder" else "writable folder") in one_error_line(done.stderr)


def test_an_error_raised_in_place_of_ctrl_c_still_reads_as_ctrl_c():
    """Some torch C functions report a KeyboardInterrupt that lands inside them as another error."""
    import os
    import signal

    from edgecm_cli.interrupt import is_interrupt, noting_interrupts

    def torch_like():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10**6):  # the handler runs at the next bytecode boundary
                pass
        except KeyboardInterrupt:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")

    with noting_interrupts():
        assert not is_interrupt(ValueError("a real bug"))
        with pytest.raises(ValueError) as caught:
            torch_like()
        assert is_interrupt(caught.value)
    with noting_interrupts():  # each command starts afresh
        assert not is_interrupt(ValueError("a real bug"))


def float_flags() -> list[tuple[str, str]]:
    """(command, flag) for every float flag of every command, read off the registry itself."""
    import edgecm_cli

    registry = edgecm_cli._flag_registry()
    found = []
    for command, (_, _, names, _, _) in edgecm_cli._commands().items():
        for name in names:
            spellings, options = registry[name]
            if options.get("type") is float:
                found.append((command, spellings[0]))
    return found


REQUIRED = {"run": ["-q", "hi"], "caption": ["x.png", "--out", "x.jsonl"], "show": ["-q", "hi", "--out", "x.png"],
            "plan": ["--budget", "1GiB"]}


def test_every_float_flag_refuses_inf_and_nan(capsys):
    """One rule for all of them: inf and nan pass range checks such as > 0, and overflow where they are used."""
    import edgecm_cli

    flags = float_flags()
    assert {"--fps", "--rank-scale", "--rho", "--beta", "--temperature", "--top-p", "--target"} <= {f for _, f in flags}
    for command, flag in flags:
        for value in ("inf", "-inf", "nan", "1e999"):
            with pytest.raises(SystemExit) as ended:
                edgecm_cli.main([command, *REQUIRED.get(command, []), f"{flag}={value}"])
            err = capsys.readouterr().err
            assert ended.value.code == 2, (command, flag, value)
            assert f"argument {flag}: {value}: use a finite number, not inf or nan" in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def video_file(frames_dir, tmp_path_factory) -> Path:
    return write_test_video(tmp_path_factory.mktemp("clip") / "clip.mkv", frames_dir)


@pytest.mark.parametrize("command", ["run", "caption"])
def test_fps_inf_is_refused_before_any_work(build_qwen2_5_vl, video_file, image_path, tmp_path, command):
    model_dir, _ = build_qwen2_5_vl()
    out = tmp_path / "c.jsonl"
    args = (["run", "--video", str(video_file), "-q", "hi"] if command == "run"
            else ["caption", str(video_file), str(image_path), "--out", str(out)])
    done = edgecm(*args, "--model", str(model_dir), "--fps", "inf")
    assert done.returncode == 2 and "--fps: inf: use a finite number" in one_error_line(done.stderr)
    assert not out.exists()


def test_a_video_that_cannot_be_read_at_its_options_costs_only_its_own_line(build_qwen2_5_vl, video_file,
                                                                           image_path):
    """The library's own check: VideoOptions(fps=inf) from Python makes the video an error record, and the
    image beside it is still captioned (the run used to stop at an OverflowError)."""
    from edgecm.checkpoint import open_checkpoint
    from edgecm.prompt import PromptBuilder
    from edgecm.video import VideoOptions
    from runtime.captioning import Captioner
    from runtime.engine import Engine, GenerationSettings

    model_dir, _ = build_qwen2_5_vl()
    checkpoint = open_checkpoint(model_dir)
    captioner = Captioner(Engine(checkpoint), PromptBuilder(checkpoint), "tiny",
                          generation=GenerationSettings(max_new_tokens=2), video_options=VideoOptions(fps=float("inf")))
    records = {Path(r["path"]).name: r for r in captioner.caption([video_file, image_path])}
    assert "fps inf: must be a finite number above 0" in records["clip.mkv"]["error"]
    assert "caption" in records[image_path.name]


def test_a_huge_finite_fps_takes_every_frame_instead_of_overflowing(build_qwen2_5_vl, video_file):
    model_dir, _ = build_qwen2_5_vl()
    done = edgecm("run", "--model", str(model_dir), "--video", str(video_file), "-q", "hi", "--fps", "1e308",
                  "--max-new-tokens", "2")
    assert done.returncode == 0, done.stderr
    assert "kept" in done.stderr and "/24 image" in done.stderr  # the clip's 4 frames: 24 tokens


@pytest.mark.parametrize("scale", ["inf", "1e308", "1e-300"])
def test_rank_scale_extremes(build_llava, image_path, scale):
    """inf is refused; a huge finite scale keeps every token it may, a tiny one the fewest, neither overflows."""
    model_dir, _ = build_llava(**TINY)
    done = edgecm("run", "--model", str(model_dir), "--image", str(image_path), "-q", "hi", "--token-rank",
                  "sparsevlm", "--rank-scale", scale, "--max-new-tokens", "2")
    if scale == "inf":
        assert done.returncode == 2 and "--rank-scale: inf: use a finite number" in one_error_line(done.stderr)
    else:
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


def test_a_negative_dense_layer_is_refused(tmp_path):
    done = edgecm("run", "--model", str(tmp_path / "never-opened"), "-q", "hi", "--dense-layers=-1")
    assert done.returncode == 2
    assert "--dense-layers -1: layer -1 does not exist; layers are numbered from 0" in one_error_line(done.stderr)


@pytest.mark.parametrize("flags, message", [
    (["--sparsevlm-k", "2"], "--sparsevlm-k applies to --token-rank sparsevlm only, and the ranking here is core "
                             "(the default or the calibration)"),
    (["--no-recycle", "--token-rank", "fastv"], "--no-recycle applies to --token-rank sparsevlm only, and the ranking "
                                                "here is fastv (--token-rank)"),
    (["--rank-scale", "9"], "--rank-scale applies to --token-rank sparsevlm only"),
])
def test_sparsevlm_flags_under_another_ranking_are_refused_not_ignored(build_llava, flags, message):
    model_dir, _ = build_llava(**TINY)
    # --device fails only as the engine is built: this refusal comes before, from config.json alone.
    done = edgecm("run", "--model", str(model_dir), "-q", "hi", "--device", "not-a-device", *flags)
    assert done.returncode == 2 and message in one_error_line(done.stderr)
