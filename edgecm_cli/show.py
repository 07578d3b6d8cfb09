"""``edgecm show``: one picture of what CoreMatching chose for an image and a question.

Left: the image as the model sees it (the processor's crop), every patch
dimmed except the kept core tokens, which stay bright inside a magenta frame;
for a video, the first frame of each temporal patch, one panel under another.
Right: the image tokens' match scores |G(i) & Core(K)| sorted in descending
order with the knee marked (the paper's Figure 3), and the FFN neurons each
layer decodes with. The patch panel is drawn with PIL so its pixels are
exact; the charts come from matplotlib.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from edgecm.corematching import knee_index
from edgecm.errors import EdgecmError

if TYPE_CHECKING:
    from PIL import Image

KEPT_FRAME = (255, 0, 255)
PATCH_SCALE = 2  # the 336 px model view is drawn at 672 px
DIM = 0.25  # brightness of dropped patches
MIN_CHART_HEIGHT = 560


def model_view(pixels: torch.Tensor) -> "Image.Image":
    """(3, H, W) in [0, 1], as the family rebuilds the picture the vision tower saw -> an RGB image."""
    from PIL import Image

    return Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def draw_patches(view, grid: tuple[int, int], kept: set[int]):
    """The model view, scaled, with dropped patches dimmed and kept ones framed. Returns (image, frames drawn).

    ``grid`` is (rows, columns) of image tokens over the view, as the model's family lays them out.
    """
    from PIL import Image, ImageDraw

    rows, cols = grid
    width, height = view.width * PATCH_SCALE, view.height * PATCH_SCALE
    bright = view.resize((width, height), Image.NEAREST)
    dim = Image.eval(bright, lambda v: int(v * DIM))
    cell_w, cell_h = width / cols, height / rows
    canvas = dim.copy()
    draw = ImageDraw.Draw(canvas)
    frames = 0
    for index in sorted(kept):
        row, col = divmod(index, cols)
        box = (round(col * cell_w), round(row * cell_h), round((col + 1) * cell_w), round((row + 1) * cell_h))
        canvas.paste(bright.crop(box), box[:2])
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=KEPT_FRAME, width=2)
        frames += 1
    return canvas, frames


def score_chart(top, scores: torch.Tensor, kept: int) -> None:
    """Match scores sorted, the chord and the knee (the paper's Figure 3)."""
    ordered = torch.sort(scores, descending=True).values.tolist()
    top.plot(range(len(ordered)), ordered, color="#1f4e79", linewidth=1.6)
    if ordered:
        j = knee_index(torch.tensor(ordered))
        top.plot([0, len(ordered) - 1], [ordered[0], ordered[-1]], color="grey", linestyle=":", linewidth=1)
        top.axvline(j, color="#c0392b", linestyle="--", linewidth=1.2)
        top.scatter([j], [ordered[j]], color="#c0392b", zorder=3)
        right_half = j > len(ordered) / 2  # keep the label inside the axes
        top.annotate(
            f"knee j*={j}, tau={ordered[j]}",
            (j, ordered[j]),
            textcoords="offset points",
            xytext=(-8 if right_half else 8, 8),
            ha="right" if right_half else "left",
            color="#c0392b",
        )
    top.axvspan(-0.5, kept - 0.5, color="#f5b7f5", alpha=0.4, label=f"kept: {kept} of {len(ordered)}")
    top.set_title("image tokens by match score |G(i) ∩ Core(K-1)|", fontsize=10)
    top.set_xlabel("image tokens, sorted")
    top.set_ylabel("core neurons activated")
    top.legend(loc="upper right", fontsize=8)


def stage_chart(top, selection, image_tokens: int, num_layers: int) -> None:
    """SparseVLM's stages: the visual tokens each layer runs on."""
    present, counts = image_tokens, []
    stages = dict(zip(selection.stage_layers, selection.stage_tokens))
    for layer in range(num_layers):
        counts.append(present)
        present = stages.get(layer, present)  # a stage's layer runs on every token; its output is pruned
    top.step(range(num_layers), counts, where="mid", color="#1f4e79", linewidth=1.6)
    for layer in selection.stage_layers:
        top.axvline(layer + 0.5, color="#c0392b", linestyle="--", linewidth=1)
    top.set_ylim(0, image_tokens * 1.05)
    top.set_title(f"visual tokens per layer (SparseVLM stages; {selection.recycled} aggregates at the end)", fontsize=10)
    top.set_xlabel("layer")
    top.set_ylabel("visual tokens")


def charts(selection, image_tokens: int, kept: int, core_neurons: list[int], width: int, height_px: int,
           settings) -> "Image.Image":
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    dpi = 100
    height = max(height_px, MIN_CHART_HEIGHT)  # small towers give small panels; the charts stay readable
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, height / dpi), dpi=dpi)
    if settings.token_rank == "sparsevlm":
        stage_chart(top, selection, image_tokens, len(core_neurons))
    else:
        score_chart(top, selection.core_scores, kept)
    layers = list(range(len(core_neurons)))
    colors = ["#7f8c8d" if n == width else "#27ae60" for n in core_neurons]
    bottom.bar(layers, [n / width for n in core_neurons], color=colors)
    bottom.set_ylim(0, 1.05)
    bottom.set_title(f"FFN neurons used in decode per layer ({settings.neurons}; grey = dense)", fontsize=10)
    bottom.set_xlabel("layer")
    bottom.set_ylabel("fraction of F")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def where_pruned(result, settings, kept: int) -> str:
    """The header's account of what was kept, and where."""
    selection = result.selection
    if settings.token_rank == "sparsevlm":
        stages = ", ".join(f"{n} after layer {layer}" for n, layer in zip(selection.stage_tokens, selection.stage_layers))
        return (f"kept {kept} of {result.image_tokens} image tokens (+{selection.recycled} aggregates) in SparseVLM's "
                f"stages: {stages} ({settings.tokens})")
    return (f"kept {kept} of {result.image_tokens} image tokens from layer K={settings.prune_layer} on "
            f"({settings.tokens}, rank {settings.token_rank})")


def render(path: Path, views: list, grid: tuple[int, int], result, settings, question: str, answer: str, width: int) -> int:
    """Write the picture; returns how many patches were drawn as kept.

    ``views`` holds the image, or one frame per temporal patch of a video, whose tokens come grid after
    grid in the prompt; their panels are stacked top to bottom.
    """
    from PIL import Image, ImageDraw

    kept = set(result.selection.keep.tolist())
    per_view = grid[0] * grid[1]
    panels, frames = [], 0
    for v, view in enumerate(views):
        own = {i - v * per_view for i in kept if v * per_view <= i < (v + 1) * per_view}
        panel, drawn = draw_patches(view, grid, own)
        panels.append(panel)
        frames += drawn
    patches = Image.new("RGB", (panels[0].width, sum(p.height for p in panels)), "white")
    for v, panel in enumerate(panels):
        patches.paste(panel, (0, v * panels[0].height))
    chart = charts(result.selection, result.image_tokens, len(kept), result.core_neurons, width, patches.height,
                   settings)
    header = 58
    canvas = Image.new("RGB", (patches.width + chart.width, max(patches.height, chart.height) + header), "white")
    canvas.paste(patches, (0, header))
    canvas.paste(chart, (patches.width, header))
    draw = ImageDraw.Draw(canvas)
    answer = " ".join(answer.split())  # one header line, whatever the model wrote
    short = answer if len(answer) <= 140 else answer[:137] + "..."
    draw.text((10, 6), f"Q: {question}", fill="black")
    draw.text((10, 22), f"A: {short}", fill="black")
    draw.text(
        (10, 38),
        where_pruned(result, settings, len(kept)) + f"; KV {max(result.kv_cache_tokens)} tokens",
        fill="#555555",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        canvas.save(path)
    except (OSError, ValueError) as exc:
        raise EdgecmError(f"{path}: cannot write the picture ({exc}); pass --out a writable .png path") from None
    return frames


def cmd_show(args: argparse.Namespace) -> int:
    from edgecm.video import VideoOptions, read_video
    from edgecm.vision import load_image
    from edgecm_cli import check_generation_flags, load_model, sparsity_from_flags
    from edgecm_cli.terminal import for_stream

    check_generation_flags(args)
    if not sparsity_from_flags(args).prunes_tokens:
        raise EdgecmError("show draws token pruning; use --mode corematching with --tokens knee, count:N or ratio:R")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise EdgecmError(f"--out {out}: the picture is a PNG; give a path ending in .png")
    if out.is_dir():
        raise EdgecmError(f"--out {out}: is a folder; give a file path ending in .png")
    folder = out.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise EdgecmError(f"--out {out}: cannot write in {folder}; pass --out a path in a writable folder")
    if (args.image is None) == (args.video is None):
        raise EdgecmError("show draws one image or one video; pass --image PATH or --video DIR")
    image = load_image(args.image) if args.image else None
    video = read_video(args.video, VideoOptions(args.fps, args.max_frames)) if args.video else None
    loaded = load_model(args)  # refuses an --image or --video the model cannot take before loading it
    if not loaded.sparsity.prunes_tokens:
        raise EdgecmError("show draws token pruning, and the checkpoint's calibration keeps every image token; "
                          "pass --tokens knee, count:N or ratio:R")
    prompt = loaded.builder.build(args.question, image, video)
    result = loaded.engine.generate(prompt, loaded.generation, loaded.builder.stop_token_ids, sparsity=loaded.sparsity)
    rows, cols = grid = loaded.checkpoint.family.patch_grid(loaded.checkpoint.config, prompt)
    family, config, processor = loaded.checkpoint.family, loaded.checkpoint.config, loaded.builder.processor
    views = [family.model_view(config, prompt, processor)] if image is not None else list(family.video_view(config, prompt, processor))
    if result.image_tokens != len(views) * rows * cols:
        raise EdgecmError(f"the input has {result.image_tokens} tokens, not {len(views)} {rows}x{cols} patch grids; show needs one token per patch")
    answer = loaded.builder.decode(result.token_ids).strip()
    width = loaded.checkpoint.config.text.intermediate_size
    frames = render(out, [model_view(v) for v in views], grid, result, loaded.sparsity, args.question, answer, width)
    print(f"wrote {out}: kept {frames} of {result.image_tokens} image tokens; answer: {for_stream(sys.stdout)(answer)}")
    return 0
