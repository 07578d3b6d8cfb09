"""``edgecm calibrate`` end to end: a calibration set of images, the token sweep, the record, its use."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

import edgecm_cli
from conftest import default_sigint
from tiny import write_test_image, write_wide_image

SHARDED = dict(gqa=True, tied=False, layout="v5", sharded=True, chat_template=True)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = edgecm_cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("edgecm: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture()
def model(build_llava, tmp_path):
    model_dir, _ = build_llava(**SHARDED)
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    return copy


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    write_test_image(folder / "a.png")
    write_wide_image(folder / "b.png")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "c.png")
    lines = [{"image": "a.png", "question": "Describe the picture in one sentence."},
             {"image": str(folder / "b.png"), "question": "What colours do you see?"},
             {"image": "c.png", "question": "What is shown?"}]
    (folder / "set.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return folder


def test_calibrate_chooses_tokens_and_neurons_and_run_applies_them(model, image_set, capsys, tmp_path):
    plot = tmp_path / "plot.png"
    code, out, err = run_cli(capsys, "calibrate", "--model", str(model), "--set", str(image_set / "set.jsonl"),
                             "--max-new-tokens", "6", "--target", "0.6", "--plot", str(plot))
    assert code == 0, err
    record = json.loads((model / "edgecm-calibration.json").read_text())
    assert record["calibration_set"]["prompts"] == 3 and record["fingerprint"]
    candidates = record["token_candidates"]
    assert {c["rank"] for c in candidates} == {"core", "core-ref", "fastv", "sparsevlm", "random"}
    assert {c["k"] for c in candidates} == {1, 2}
    eligible = [c for c in candidates if not c["reference"] and c["top1_agreement"] >= 0.6]
    assert eligible, "some candidate keeps 60 % of this tiny model's answers"
    cheapest = min(eligible, key=lambda c: (c["prefill_flops"], c["kv_bytes"]))
    assert record["token_choice"]["label"] == cheapest["label"]
    tokens = record["tokens"]
    assert tokens["token_rank"] == cheapest["rank"] and tokens["tokens"] == cheapest["tokens"]
    assert (tokens["sparsevlm_k"] if tokens["token_rank"] == "sparsevlm" else tokens["prune_layer"]) == cheapest["k"]
    assert "Wrote" in out and "tokens:" in err
    assert Image.open(plot).size[0] > 800

    code, out, err = run_cli(capsys, "run", "--model", str(model), "--image", str(image_set / "a.png"),
                             "-q", "What is shown?", "--max-new-tokens", "4", "--json")
    used = json.loads(out)["sparsity"]
    assert used["token_rank"] == tokens["token_rank"] and used["tokens"] == tokens["tokens"]
    assert used["neurons"] == record["neurons"]
    assert "calibrated on 3 prompts from set.jsonl" in err and "flags override it" in err
    # a flag overrides its own field only
    code, out, _ = run_cli(capsys, "run", "--model", str(model), "--image", str(image_set / "a.png"),
                           "-q", "What is shown?", "--max-new-tokens", "4", "--json", "--tokens", "count:3")
    used = json.loads(out)["sparsity"]
    assert used["tokens"] == "count:3" and used["token_rank"] == tokens["token_rank"]


def test_a_folder_with_one_question(model, image_set, capsys):
    code, out, err = run_cli(capsys, "calibrate", "--model", str(model), "--set", str(image_set),
                             "--question", "What is shown?", "--max-new-tokens", "4", "--prune-layers", "2",
                             "--token-ranks", "fastv", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["calibration_set"]["prompts"] == 3
    assert {c["rank"] for c in record["token_candidates"]} == {"fastv", "random"}
    assert {c["k"] for c in record["token_candidates"]} == {2}


def test_when_no_token_setting_meets_the_target_every_token_is_kept(model, image_set, capsys):
    """A target no pruned candidate can meet (agreement 1.0 on a random model) keeps token pruning off, says so,
    and run then prunes no image token."""
    code, out, err = run_cli(capsys, "calibrate", "--model", str(model), "--set", str(image_set / "set.jsonl"),
                             "--max-new-tokens", "6", "--target", "1.0", "--prune-layers", "1",
                             "--token-ranks", "fastv")
    assert code == 0, err
    record = json.loads((model / "edgecm-calibration.json").read_text())
    pruned = [c for c in record["token_candidates"] if not c["reference"]]
    assert pruned and all(c["top1_agreement"] < 1.0 for c in pruned)
    assert record["token_choice"] is None and record["tokens"] == {"tokens": "all"}
    assert "no token pruning reached agreement 1.0" in err and "every image token is kept" in err
    code, out, err = run_cli(capsys, "run", "--model", str(model), "--image", str(image_set / "a.png"),
                             "-q", "What is shown?", "--max-new-tokens", "2", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["kept_image_tokens"] == result["image_tokens"] > 0


@pytest.mark.parametrize("lines, needle", [
    ("", "the calibration set is empty"),
    ('{"image": "a.png", "question": "Hi?"}\nnot json\n', "set.jsonl:2: not JSON"),
    ('{"image": "a.png"}\n', 'set.jsonl:1: no "question"'),
    ('{"image": "missing.png", "question": "Hi?"}\n', "set.jsonl:1:"),
    ('{"image": "broken.png", "question": "Hi?"}\n', "broken.png: not an image file"),
    ('["a.png", "Hi?"]\n', "set.jsonl:1: not a JSON object"),
])
def test_bad_calibration_sets_are_one_line_errors(model, image_set, tmp_path, capsys, lines, needle):
    folder = tmp_path / "bad"
    folder.mkdir()
    shutil.copy(image_set / "a.png", folder / "a.png")
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "set.jsonl").write_text(lines)
    code, _, err = run_cli(capsys, "calibrate", "--model", str(model), "--set", str(folder / "set.jsonl"))
    assert_one_line_error(code, err, needle)


def test_other_bad_calibrate_input(model, image_set, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, needle in (
        (["--set", str(empty), "--question", "Hi?"], "no images in it"),
        (["--set", str(image_set)], "needs --question"),
        (["--set", str(image_set / "set.jsonl"), "--prune-layers", "2,3"], "--prune-layers 2,3: K=3 does not exist"),
        (["--set", str(image_set / "set.jsonl"), "--prune-layers", "0"], "K=0 does not exist"),
        (["--set", str(image_set / "set.jsonl"), "--token-ranks", "core,magic"], "magic is not a ranking"),
        (["--set", str(image_set / "set.jsonl"), "--plot", "out.jpg"], "give a .png"),
        (["--question", "Hi?"], "--question is the question asked of every image of a --set folder"),
    ):
        code, _, err = run_cli(capsys, "calibrate", "--model", str(model), *argv)
        assert_one_line_error(code, err, needle)
    assert not (model / "edgecm-calibration.json").exists()


def test_a_calibration_for_other_weights_is_not_applied(model, build_llava, image_set, capsys, tmp_path):
    other_dir, _ = build_llava(gqa=False, tied=True, layout="v5", sharded=False, chat_template=True)
    code, _, err = run_cli(capsys, "calibrate", "--model", str(model), "--set", str(image_set / "set.jsonl"),
                           "--max-new-tokens", "4", "--prune-layers", "1", "--target", "0.5")
    assert code == 0, err
    other = tmp_path / "other"
    shutil.copytree(other_dir, other)
    shutil.copy(model / "edgecm-calibration.json", other / "edgecm-calibration.json")
    code, out, err = run_cli(capsys, "run", "--model", str(other), "-q", "Count.", "--max-new-tokens", "3", "--json")
    assert code == 0, err
    assert "made for other weights" in err and "not applied" in err
    assert json.loads(out)["calibrated"] is False


def test_an_interrupted_calibration_leaves_the_previous_file_byte_for_byte(model, image_set, capsys):
    code, _, err = run_cli(capsys, "calibrate", "--model", str(model), "--prompts", str(image_set / "set.jsonl"),
                           "--limit", "1", "--max-new-tokens", "3")
    # (--prompts reads JSONL 'prompt' fields; this file has none, so that run fails on its first line)
    assert code == 2
    code, _, err = run_cli(capsys, "calibrate", "--model", str(model), "--limit", "2", "--max-new-tokens", "3")
    assert code == 0, err
    path = model / "edgecm-calibration.json"
    before = path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "edgecm_cli", "calibrate", "--model", str(model), "--set",
                             str(image_set / "set.jsonl"), "--max-new-tokens", "6"],
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    for line in proc.stderr:  # interrupted in the middle of the token sweep
        if "prompt 1 of 3 measured" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, rest
    assert path.read_bytes() == before
    assert not list(model.glob(".edgecm-calibration.json.*")), "no temporary file is left behind"


def calibrate_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecm_cli", "calibrate", *args], capture_output=True, text=True,
                          timeout=120)


PNG = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10"


@pytest.mark.parametrize("flag, content, needle", [
    ("--prompts", PNG, "a binary file, not text (it holds NUL bytes); pass --prompts a JSONL file"),
    ("--prompts", b"caf\xe9 au lait?\n", "prompts.txt:1: not UTF-8 text (byte 0xe9)"),
    ("--prompts", b'{"prompt": "Hi?"}\n{"prompt": 5}\n', "prompts.txt:2: 'prompt' must be a non-empty text, not 5"),
    ("--prompts", b'{"prompt": ""}\n', "prompts.txt:1: 'prompt' must be a non-empty text, not \"\""),
    ("--prompts", b'Plain question?\n["What is shown?", "a.png"]\n', "prompts.txt:2: a JSON list, not an object"),
    ("--set", PNG, "a binary file, not text (it holds NUL bytes); pass --set a JSONL file"),
    ("--set", b'{"image": "a.png", "question": "Hi?"}\n\xff\xfe\n', "prompts.txt:2: not UTF-8 text (byte 0xff)"),
])
def test_prompt_and_set_files_that_are_not_text_or_not_prompts(tmp_path, flag, content, needle):
    """Refused with the line at fault before the model is opened (it is never found here)."""
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    done = calibrate_process("--model", str(tmp_path / "never-opened"), flag, str(path))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and needle in done.stderr, done.stderr


def test_a_prompt_file_with_a_byte_order_mark_reads_its_first_line_as_json(tmp_path):
    from edgecm.fidelity import load_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "First?"}\n[INST] a bracket that is not JSON\n"quoted" text\n')
    assert load_prompts(path) == ["First?", "[INST] a bracket that is not JSON", '"quoted" text']
