"""edgecm show: the PNG exists and its highlighted patches are exactly the kept tokens."""

from __future__ import annotations

import pytest
from PIL import Image

import edgecm_cli
from edgecm.checkpoint import open_checkpoint
from edgecm.prompt import PromptBuilder
from edgecm.sparsity import SparsitySettings, TokenRule
from edgecm.vision import load_image
from edgecm_cli.show import KEPT_FRAME, PATCH_SCALE
from runtime.engine import Engine, GenerationSettings

TINY = dict(gqa=True, tied=False, layout="v5", sharded=False, chat_template=True)
HEADER = 58  # rows above the patch panel (edgecm_cli.show.render)


def framed_patches(png, grid: int, cell: int) -> set[int]:
    """Patch indices whose frame (top edge, middle pixel) is drawn in the kept colour."""
    image = Image.open(png).convert("RGB")
    found = set()
    for index in range(grid * grid):
        row, col = divmod(index, grid)
        if image.getpixel((col * cell + cell // 2, HEADER + row * cell)) == KEPT_FRAME:
            found.add(index)
    return found


@pytest.mark.parametrize("tokens, rank", [("knee", "core"), ("count:5", "core"), ("count:5", "sparsevlm")])
def test_show_highlights_exactly_the_kept_tokens(build_llava, image_path, tmp_path, capsys, tokens, rank):
    model_dir, _ = build_llava(**TINY)
    out = tmp_path / "show.png"
    code = edgecm_cli.main(["show", "--model", str(model_dir), "--image", str(image_path), "-q", "What is shown?",
                            "--out", str(out), "--tokens", tokens, "--token-rank", rank, "--max-new-tokens", "4"])
    assert code == 0 and out.is_file()
    checkpoint = open_checkpoint(model_dir)
    prompt = PromptBuilder(checkpoint).build("What is shown?", load_image(image_path))
    settings = SparsitySettings(tokens=TokenRule.parse(tokens), token_rank=rank)
    result = Engine(checkpoint).generate(prompt, GenerationSettings(max_new_tokens=4), sparsity=settings)
    grid = 32 // 8
    # Patches drawn are the original tokens kept; SparseVLM's aggregates have no patch of their own.
    assert framed_patches(out, grid, 8 * PATCH_SCALE) == set(result.selection.keep.tolist())
    drawn = result.kept_image_tokens - result.selection.recycled
    assert f"kept {drawn} of 16" in capsys.readouterr().out


def test_show_refuses_what_it_cannot_draw(build_llava, image_path, tmp_path, capsys):
    model_dir, _ = build_llava(**TINY)
    code = edgecm_cli.main(["show", "--model", str(model_dir), "--image", str(image_path), "-q", "x", "--out", str(tmp_path / "a.png"), "--tokens", "all"])
    assert code == 2 and "show draws token pruning" in capsys.readouterr().err
    code = edgecm_cli.main(["show", "--model", str(model_dir), "--image", str(image_path), "-q", "x", "--out", str(tmp_path / "a.jpg")])
    assert code == 2 and "PNG" in capsys.readouterr().err
