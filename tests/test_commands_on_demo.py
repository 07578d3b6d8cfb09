"""run, caption and show end to end on the embedded demo model (real language weights, 196 image tokens)."""

from __future__ import annotations

import json

import pytest

import edgecm_cli
from test_show import framed_patches

from edgecm.demo import SHIPPED_CALIBRATION
from edgecm_cli.show import PATCH_SCALE
from runtime.cpu_dtype import cpu_dtype


def test_caption_and_show_on_the_demo(demo_home, image_path, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(image_path.read_bytes())
    (folder / "b.png").write_text("not a picture")
    out = tmp_path / "captions.jsonl"
    assert edgecm_cli.main(["caption", str(folder), "--out", str(out), "--max-new-tokens", "4"]) == 0
    records = {r["path"].rsplit("/", 1)[1]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["a.png"]["image_tokens"] == 196 and "caption" in records["a.png"]
    assert "error" in records["b.png"]
    err = capsys.readouterr().err
    assert "world of coloured shapes" in err  # the demo says what it knows
    assert "calibrated on 60 demo validation scenes" in err  # and the measured setting it applies
    assert "keeps background" not in err  # which keeps the answers: no warning

    png = tmp_path / "show.png"
    assert edgecm_cli.main(["show", "--image", str(image_path), "-q", "What is shown?", "--out", str(png),
                            "--tokens", "ratio:0.1", "--token-rank", "core", "--max-new-tokens", "4"]) == 0
    kept = framed_patches(png, 14, 16 * PATCH_SCALE)
    assert len(kept) == 20  # ceil(0.1 * 196)
    assert "kept 20 of 196" in capsys.readouterr().out


def test_run_json_on_the_demo(demo_home, image_path, capsys):
    assert edgecm_cli.main(["run", "--image", str(image_path), "-q", "What is shown?", "--max-new-tokens", "4",
                            "--json", "--tokens", "count:64", "--token-rank", "core"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["image_tokens"] == 196 and record["kept_image_tokens"] == 64
    text_tokens = record["prompt_tokens"] - 196
    assert set(record["kv_cache_tokens"]) == {text_tokens + 64 + len(record["token_ids"]) - 1}


@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16"])
def test_the_readme_first_command_prunes_with_the_calibration_and_answers_right(demo_home, capsys, dtype):
    """The calibrated token setting, every FFN neuron (the README says why), in the dtype this CPU chose and in
    each of the two it chooses from."""
    from pathlib import Path

    shapes = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
    assert edgecm_cli.main(["run", "--image", str(shapes), "--question", "What is in the picture?", "--neurons",
                            "dense", "--json", *(["--dtype", dtype] if dtype else [])]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert record["dtype"] == (dtype or cpu_dtype().chosen)
    assert record["kept_image_tokens"] < record["image_tokens"] == 196  # it prunes
    shipped = json.loads(SHIPPED_CALIBRATION.read_text())
    assert record["calibrated"] and record["sparsity"]["token_rank"] == shipped["tokens"]["token_rank"]
    assert record["sparsity"]["tokens"] == shipped["tokens"]["tokens"]
    for thing in ("red circle", "green triangle", "orange square"):
        assert thing in record["text"], record["text"]
    assert "keeps background" not in captured.err


def test_the_demo_warns_about_pruning_only_where_it_prunes_an_image_otherwise(demo_home, image_path, capsys):
    assert edgecm_cli.main(["run", "--image", str(image_path), "-q", "What is shown?", "--max-new-tokens", "2",
                            "--mode", "dense"]) == 0
    err = capsys.readouterr().err
    assert "world of coloured shapes" in err and "token pruning" not in err
    assert edgecm_cli.main(["run", "-q", "Hello", "--max-new-tokens", "2"]) == 0
    assert "token pruning" not in capsys.readouterr().err
    # the paper's default setting, which the calibration did not choose on this model
    assert edgecm_cli.main(["run", "--image", str(image_path), "-q", "What is shown?", "--max-new-tokens", "2",
                            "--token-rank", "core", "--tokens", "knee", "--prune-layer", "2"]) == 0
    assert "keeps background and drops the objects" in capsys.readouterr().err


def test_chat_warns_about_pruning_an_image_attached_later(demo_home, image_path):
    import io

    from rich.console import Console

    from edgecm_cli.chat import Chat

    def attach(*flags: str) -> str:
        args = edgecm_cli.build_parser().parse_args(["chat", "--max-new-tokens", "2", *flags])
        out = io.StringIO()
        Chat(edgecm_cli.load_model(args), Console(file=out, width=400)).command(f"/image {image_path}")
        return out.getvalue()

    calibrated = attach()
    assert "image attached" in calibrated and "keeps background" not in calibrated
    pruned = attach("--token-rank", "core", "--tokens", "knee", "--prune-layer", "2")
    assert "image attached" in pruned and "keeps background and drops the objects" in pruned
    dense = attach("--mode", "dense")
    assert "image attached" in dense and "token pruning" not in dense
