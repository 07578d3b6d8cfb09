"""The edgecm command: JSON output, streaming text, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import edgecm_cli
from edgecm.checkpoint import open_checkpoint
from edgecm.prompt import PromptBuilder
from edgecm.vision import load_image
from edgecm.sparsity import DENSE, SparsitySettings
from runtime.engine import Engine, GenerationSettings

SHARDED = dict(gqa=True, tied=False, layout="v4", sharded=True, chat_template=True)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = edgecm_cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_json_reports_generation(build_llava, image_path, capsys):
    model_dir, _ = build_llava(**SHARDED)
    code, out, err = run_cli(
        capsys, "run", "--model", str(model_dir), "--image", str(image_path), "-q", "What is shown?",
        "--max-new-tokens", "12", "--json",
    )
    assert code == 0, err
    record = json.loads(out)
    for key in ("text", "token_ids", "prompt_tokens", "image_tokens", "timings", "memory"):
        assert key in record
    assert record["image_tokens"] == 16 and record["prompt_tokens"] > 16
    assert 1 <= len(record["token_ids"]) <= 12
    assert record["timings"]["prefill_s"] > 0 and record["memory"]["rss_peak_bytes"] > 0

    # The CLI's tokens are the engine's greedy tokens for the same prompt under the default CoreMatching settings.
    checkpoint = open_checkpoint(model_dir)
    builder = PromptBuilder(checkpoint)
    prompt = builder.build("What is shown?", load_image(image_path))
    expected = Engine(checkpoint).generate(
        prompt, GenerationSettings(max_new_tokens=12), builder.stop_token_ids, sparsity=SparsitySettings()
    )
    assert record["token_ids"] == expected.token_ids
    assert record["text"] == builder.decode(expected.token_ids)
    assert record["kept_image_tokens"] == expected.kept_image_tokens < 16
    assert record["kv_cache_tokens"] == expected.kv_cache_tokens
    assert record["kv_cache_bytes"] == record["memory"]["kv_cache_bytes"] > 0
    assert len(record["core_neurons"]) == 3 and record["sparsity"]["mode"] == "corematching"
    assert "prefill" in err and "tok/s" in err and f"kept {expected.kept_image_tokens}/16" in err


def test_run_sparsevlm_at_a_budget(build_llava, image_path, capsys):
    model_dir, _ = build_llava(**SHARDED)
    code, out, err = run_cli(
        capsys, "run", "--model", str(model_dir), "--image", str(image_path), "-q", "What is shown?",
        "--max-new-tokens", "6", "--token-rank", "sparsevlm", "--tokens", "count:4", "--json",
    )
    assert code == 0, err
    record = json.loads(out)
    assert record["kept_image_tokens"] == 4 and record["sparsity"]["token_rank"] == "sparsevlm"
    assert record["kv_cache_tokens"][-1] == record["prompt_tokens"] - 16 + 4 + len(record["token_ids"]) - 1
    assert "kept 4/16" in err


def test_run_dense_mode_matches_dense_engine(build_llava, image_path, capsys):
    model_dir, _ = build_llava(**SHARDED)
    code, out, _ = run_cli(
        capsys, "run", "--model", str(model_dir), "--image", str(image_path), "-q", "What is shown?",
        "--max-new-tokens", "12", "--json", "--mode", "dense",
    )
    checkpoint = open_checkpoint(model_dir)
    builder = PromptBuilder(checkpoint)
    prompt = builder.build("What is shown?", load_image(image_path))
    expected = Engine(checkpoint).generate(
        prompt, GenerationSettings(max_new_tokens=12), builder.stop_token_ids, sparsity=DENSE
    )
    record = json.loads(out)
    assert code == 0 and record["token_ids"] == expected.token_ids and record["kept_image_tokens"] == 16


def test_calibrate_writes_a_file_that_run_uses(build_llava, tmp_path, capsys):
    model_dir, _ = build_llava(**SHARDED)
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    code, out, err = run_cli(
        capsys, "calibrate", "--model", str(model), "--limit", "3", "--max-new-tokens", "6", "--resident", "--target", "0.5"
    )
    assert code == 0, err
    record = json.loads((model / "edgecm-calibration.json").read_text())
    assert record["target_top1_agreement"] == 0.5 and record["calibration_set"]["prompts"] == 3
    assert record["tokens"] is None  # text prompts: only the neurons are calibrated
    assert record["measured"] and "Wrote" in out and "agreement" in err
    if record["achieved"] is not None:
        assert record["achieved"]["top1_agreement"] >= 0.5
    code, out, _ = run_cli(capsys, "run", "--model", str(model), "-q", "Count.", "--max-new-tokens", "4", "--json")
    run_record = json.loads(out)
    assert run_record["calibrated"] and run_record["sparsity"]["neurons"] == record["neurons"]
    # an explicit flag wins over the file
    code, out, _ = run_cli(capsys, "run", "--model", str(model), "-q", "Count.", "--max-new-tokens", "4", "--json", "--neurons", "dense")
    assert json.loads(out)["sparsity"]["neurons"] == "dense"


def test_bad_sparsity_flags_fail_before_loading(capsys, tmp_path):
    for flags, needle in ((["--tokens", "kne"], "--tokens"), (["--neurons", "mass:3"], "--neurons"),
                          (["--dense-layers", "a,b"], "--dense-layers"), (["--rho", "0"], "--rho"),
                          (["--prune-layer", "0"], "--prune-layer 0: must be >= 1"),
                          (["--rank-scale", "0"], "--rank-scale")):
        code, _, err = run_cli(capsys, "run", "--model", str(tmp_path / "absent"), "-q", "hi", *flags)
        assert_one_line_error(code, err, needle)


def test_calibrate_bad_prompt_file(tmp_path, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    code, _, err = run_cli(capsys, "calibrate", "--model", str(tmp_path / "absent"), "--prompts", str(bad))
    assert_one_line_error(code, err, "prompts.jsonl:1", "'prompt'")


def test_run_streams_text_to_stdout_and_stats_to_stderr(build_llava, capsys):
    model_dir, _ = build_llava(**SHARDED)
    code, out, err = run_cli(capsys, "run", "--model", str(model_dir), "-q", "Count.", "--max-new-tokens", "6")
    assert code == 0
    assert out.endswith("\n") and "prefill" not in out
    assert err.count("\n") == 1 and "decode" in err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert err.count("\n") == 1, err
    assert err.startswith("edgecm: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_missing_model_directory(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, _, err = run_cli(capsys, "run", "--model", str(missing), "-q", "hi")
    assert_one_line_error(code, err, str(missing), "--model")


def test_missing_shard(build_llava, tmp_path, capsys):
    model_dir, _ = build_llava(**SHARDED)
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    code, _, err = run_cli(capsys, "run", "--model", str(broken), "-q", "hi")
    assert_one_line_error(code, err, shard.name, "missing", "re-download")


def test_truncated_shard(build_llava, tmp_path, capsys):
    model_dir, _ = build_llava(**SHARDED)
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    code, _, err = run_cli(capsys, "run", "--model", str(broken), "-q", "hi")
    assert_one_line_error(code, err, shard.name, "truncated")


def test_unsupported_architecture(build_llava, tmp_path, capsys):
    model_dir, _ = build_llava(**SHARDED)
    broken = tmp_path / "mistral"
    shutil.copytree(model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["Qwen2VLForConditionalGeneration"]
    (broken / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "run", "--model", str(broken), "-q", "hi")
    assert_one_line_error(code, err, "config.json", "Qwen2VLForConditionalGeneration", "not supported")


def test_file_that_is_not_an_image(build_llava, tmp_path, capsys):
    model_dir, _ = build_llava(**SHARDED)
    fake = tmp_path / "photo.jpg"
    fake.write_text("this is text, not a JPEG")
    code, _, err = run_cli(capsys, "run", "--model", str(model_dir), "--image", str(fake), "-q", "hi")
    assert_one_line_error(code, err, str(fake), "not an image")


def test_truncated_image(build_llava, image_path, tmp_path, capsys):
    model_dir, _ = build_llava(**SHARDED)
    cut = tmp_path / "cut.png"
    data = image_path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # half the pixel data gone, not only the trailer
    code, _, err = run_cli(capsys, "run", "--model", str(model_dir), "--image", str(cut), "-q", "hi")
    assert_one_line_error(code, err, str(cut))


@pytest.mark.parametrize("content", [b"not a gguf file at all", b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40])
def test_unreadable_gguf(tmp_path, capsys, content):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    code, _, err = run_cli(capsys, "run", "--model", str(bad), "-q", "hi")
    assert_one_line_error(code, err, str(bad), "GGUF")


def test_bad_flag_values(build_llava, capsys):
    model_dir, _ = build_llava(**SHARDED)
    code, _, err = run_cli(capsys, "run", "--model", str(model_dir), "-q", "hi", "--max-new-tokens", "0")
    assert_one_line_error(code, err, "--max-new-tokens")


def test_console_script_error_has_no_traceback(tmp_path):
    """The real entry point, in its own process: exit 2 and one line on stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "edgecm_cli", "run", "--model", str(tmp_path / "nope"), "-q", "hi"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_version_flag_prints_the_package_version():
    import edgecm

    result = subprocess.run([sys.executable, "-m", "edgecm_cli", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"edgecm {edgecm.__version__}\n" and result.stderr == ""


def test_control_characters_are_escaped_on_a_terminal_and_exact_elsewhere(control_parrot):
    import pexpect

    from conftest import CONTROL_ANSWER

    args = ["-m", "edgecm_cli", "run", "--model", str(control_parrot), "-q", "hi", "--max-new-tokens", "12"]
    # On a terminal (a pseudo-terminal, as a user's): every \x13 arrives as the four characters \x13.
    shown = pexpect.run(sys.executable, args=args, encoding="utf-8", timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert "\\x13" * 12 in shown and CONTROL_ANSWER not in shown, repr(shown)
    # Into a pipe: the exact text, as documented.
    piped = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and piped.stdout == CONTROL_ANSWER * 12 + "\n", repr(piped.stdout)
    # --json keeps the text exact (JSON escapes it).
    record = subprocess.run([sys.executable, *args, "--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(record.stdout)["text"] == CONTROL_ANSWER * 12 and CONTROL_ANSWER not in record.stdout


def test_escape_controls_keeps_newlines_tabs_and_text():
    from edgecm_cli.terminal import escape_controls

    text = "caf\u00e9 \u732b\tcolumn\nline\x1b[2J\x07\r\x7f\x9b"
    assert escape_controls(text) == "caf\u00e9 \u732b\tcolumn\nline" + r"\x1b[2J\x07\x0d\x7f\x9b"
    pieces = ["a\x13", "\x13b", "\n"]
    assert "".join(map(escape_controls, pieces)) == escape_controls("".join(pieces))  # streamed alike


def test_cli_defaults_are_the_library_defaults():
    """One source for every default: a flag left out means what the library means by leaving the field out."""
    import inspect

    from edgecm.sampling import SamplingSettings
    from edgecm.video import VideoOptions
    from runtime.batch import generate_batch
    from runtime.captioning import CAPTION_NEW_TOKENS, Captioner
    from runtime.planner import Workload
    from runtime.ray_captioning import WorkerSpec

    parser = edgecm_cli.build_parser()
    run = parser.parse_args(["run", "-q", "hi"])
    assert edgecm_cli.sparsity_from_flags(run) == SparsitySettings()
    assert inspect.signature(Engine.generate).parameters["sparsity"].default == SparsitySettings()
    assert inspect.signature(generate_batch).parameters["sparsity"].default == SparsitySettings()
    assert run.max_new_tokens == GenerationSettings().max_new_tokens
    assert (run.temperature, run.top_p, run.seed) == tuple(vars(SamplingSettings()).values())
    assert run.device == inspect.signature(Engine).parameters["device"].default
    assert (run.fps, run.max_frames) == (VideoOptions().fps, VideoOptions().max_frames)

    caption = parser.parse_args(["caption", "pictures", "--out", "captions.jsonl"])
    spec = WorkerSpec(model=None)
    assert caption.prompt == Captioner.prompt == spec.prompt
    assert caption.max_new_tokens == CAPTION_NEW_TOKENS == spec.max_new_tokens
    assert caption.batch_size == Captioner.batch_size == spec.batch_size
    assert edgecm_cli.sparsity_from_flags(caption) == SparsitySettings() == spec.sparsity
    assert (caption.temperature, caption.top_p, caption.seed, caption.device, caption.fps, caption.max_frames) == (
        spec.temperature, spec.top_p, spec.seed, spec.device, spec.fps, spec.max_frames)

    plan = parser.parse_args(["plan", "--budget", "12GiB"])
    workload = Workload()
    assert (plan.new_tokens, plan.kept_tokens, plan.neuron_fraction) == (
        workload.new_tokens, workload.kept_image_tokens, workload.neuron_fraction)


@pytest.mark.parametrize("command, says, not_says", [
    ("plan", "print the plan as one JSON object", "text, ids"),
    ("calibrate", "calibration record", "text, ids"),
    ("run", "text, ids, timings and memory", "plan"),
])
def test_each_command_describes_its_own_json(command, says, not_says):
    result = subprocess.run([sys.executable, "-m", "edgecm_cli", command, "--help"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "COLUMNS": "400"})
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith("--json"))
    assert says in line and not_says not in line, line
