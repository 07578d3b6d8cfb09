"""Train the demo's vision tower and projector on the shapes world, SmolLM2 frozen.

    python3 bench/train_demo_vision.py [--out edgecm/data/demo_vision.safetensors]

Four stages, all seeded and logged (one JSON line per step in --log):

1. Tower warm-up (cheap, no language model): the CLIP tower learns, patch by
   patch, the colour and the shape of the object under each patch (or
   background), from linear heads on the features LLaVA reads; shape is
   scored on object patches only (see warm_up_tower). A tower trained from
   scratch through a frozen 135M language model alone would need far more
   steps than a 2-core CPU gives in two hours; this stage gives it local,
   patch-aligned features first, which is also what token pruning needs (an
   object's information stays in its own tokens).
2. A reading table (no vision tower): one input vector for each of the 18
   colour-shape kinds and one for background, plus one per patch position,
   learned through the frozen SmolLM2 on question/answer conversations in
   which each patch is given the vector of the object that really covers it.
   This asks the language model only one thing, which inputs it can read
   answers from, with 19 + 196 vectors to fit instead of a whole projector
   behind a tower; the kinds start as the sum of the colour word's and the
   shape word's embeddings.
3. Distillation (no language model): tower and projector learn to write,
   from the image, each patch's table vector for what it shows plus its
   position vector (mean squared error), so that the demo starts the last
   stage reading its images the way stage 2 found the language model reads
   best. The tower trains here too: stage 1 taught it what a patch shows,
   not where the patch is.
4. The LLaVA recipe: tower and projector are trained together through the
   frozen SmolLM2 on multi-turn question/answer conversations about each
   scene, with the loss on the answer tokens only. Every question a scene
   has shares one image, so the 196 image tokens are paid for once per
   conversation.

Stages 2 and 4 run the frozen language model under bfloat16 autocast (faster
on CPUs with bfloat16 matrix instructions); the trained weights are kept in
float32 until they are written.

The result is written in float16 to --out (the file edgecm ships and builds
the demo from), the loss curve to --curve.

``--resume WEIGHTS`` continues stage 4 from saved weights (stages 1 to 3 are
skipped) and appends to --log, so a run can be stopped and taken further; the
saves every --save-every steps are what make that safe. Seeds follow on from
the last scene the log records, so a resumed run never repeats a scene.

``--caption-order reading`` trains captions that name the objects in reading
order (row band by row band, see scenes.CAPTION_ORDERS) instead of left to
right: the order in which LLaVA's row-major image tokens first show them, so
the next object to name is the next one the sequence holds rather than the
next one by a coordinate the language model must read off each token.

The shipped weights are this script's default run followed by three resumed
ones with ``--drop-background`` (0.8 for 200 steps, then 0.3 for 500, then 0.3
for 600 with ``--caption-first 0.5 --caption-order reading``); the README's
"The demo model" gives the four commands and their times.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgecm import demo, scenes  # noqa: E402

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
PATCH = demo.VISION["patch_size"]
IMAGE_TOKENS = (demo.VISION["image_size"] // PATCH) ** 2  # 196
# A patch counts as an object's when the object covers at least this share of it.
PATCH_COVER = 0.2


def pixels(image) -> torch.Tensor:
    """PIL image (already IMAGE_SIZE square) -> normalised (3, H, W), as the CLIP processor gives it."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - CLIP_MEAN) / CLIP_STD


def patch_cover(scene: scenes.Scene, patch: int) -> torch.Tensor:
    """(objects, patches): the share of each patch that each of the scene's objects covers."""
    from PIL import Image, ImageDraw

    size = scenes.IMAGE_SIZE
    grid = size // patch
    covers = []
    for obj in scene.objects:
        mask = Image.new("L", (size, size), 0)
        scenes.draw_shape(ImageDraw.Draw(mask), obj, 1.0, 255)
        cover = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)
        covers.append(cover.view(grid, patch, grid, patch).mean(dim=(1, 3)).flatten())
    return torch.stack(covers) if covers else torch.zeros(0, grid * grid)


def patch_labels(scene: scenes.Scene, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch: colour index + 1 and shape index + 1 of the object covering it (0: background)."""
    covers = patch_cover(scene, patch)
    colour = torch.zeros(covers.shape[1], dtype=torch.long)
    shape = torch.zeros(covers.shape[1], dtype=torch.long)
    best = torch.zeros(covers.shape[1])
    for obj, cover in zip(scene.objects, covers):
        take = (cover >= PATCH_COVER) & (cover > best)
        colour[take] = list(scenes.COLOURS).index(obj.colour) + 1
        shape[take] = scenes.SHAPES.index(obj.shape) + 1
        best = torch.where(take, cover, best)
    return colour, shape


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def tower_features(model, images: torch.Tensor) -> torch.Tensor:
    """(N, patches, d_vision): what LLaVA's projector reads (the feature layer, CLS dropped)."""
    out = model.model.vision_tower(images, output_hidden_states=True)
    return out.hidden_states[demo.VISION_FEATURE_LAYER][:, 1:]


def warm_up_tower(model, args, log) -> None:
    """Stage 1: per-patch colour and shape classification from the features LLaVA reads."""
    tower = model.model.vision_tower
    d = tower.config.hidden_size
    heads = torch.nn.Linear(d, len(scenes.COLOURS) + 1 + len(scenes.SHAPES) + 1)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.warmup_lr, weight_decay=0.01)
    n_colour = len(scenes.COLOURS) + 1
    seed = 0
    for step in range(args.warmup_steps):
        batch = [scenes.make_scene(seed + i) for i in range(args.warmup_batch)]
        seed += args.warmup_batch
        x = torch.stack([pixels(s.render()) for s in batch])
        labels = [patch_labels(s, PATCH) for s in batch]
        colour = torch.stack([c for c, _ in labels]).flatten()
        shape = torch.stack([s for _, s in labels]).flatten()
        feats = tower_features(model, x)
        logits = heads(feats).flatten(0, 1)
        obj = colour > 0
        # Shape is scored on object patches only: averaged over every patch, the
        # background's (most patches, and trivially "no shape") drowns it, and the
        # tower learns colour but stays near chance on shape. Colour's own class 0
        # already tells object patches from background.
        loss = F.cross_entropy(logits[:, :n_colour], colour) + F.cross_entropy(logits[obj, n_colour:], shape[obj])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.warmup_steps, args.warmup_lr, 20)
        opt.zero_grad()
        loss.backward()
        opt.step()
        colour_acc = (logits[obj, :n_colour].argmax(-1) == colour[obj]).float().mean().item()
        shape_acc = (logits[obj, n_colour:].argmax(-1) == shape[obj]).float().mean().item()
        log({"stage": "tower", "step": step, "loss": loss.item(),
             "object_patch_colour_acc": colour_acc, "object_patch_shape_acc": shape_acc})
    args.next_seed = seed


def conversation(scene: scenes.Scene, rng: random.Random, caption_first: float = 0.0,
                 caption_order: str = "left-to-right") -> list[scenes.Question]:
    """Every question the scene has, in random order, the caption (in one of its phrasings) in about half.

    Every question rather than one of each kind: the image is paid for once per
    conversation, so each further question is cheap signal, and the kinds that
    a scene has several of (colour, shape, position) are the ones that bind a
    colour to a shape and a place, which is what the demo finds hardest.

    With probability ``caption_first`` the conversation opens with the caption
    instead. Shuffled in with a dozen other questions, the caption is the first
    turn in about one conversation in twenty, yet a caption is nearly always
    asked first and alone (`edgecm run`, `edgecm caption`), where no earlier
    answer has named an object. At 0 the draws are the same as before the
    option existed, so earlier runs replay exactly.

    ``caption_order`` is the order the caption names the objects in (see
    scenes.CAPTION_ORDERS); it changes the answer only, never a draw."""
    questions = scene.questions()
    chosen = [q for q in questions if q.kind != "caption"]
    caption = next(q for q in questions if q.kind == "caption")
    caption = replace(caption, answer=scenes.caption_of(scene.objects, caption_order))
    # The draws stay in the order each branch has always made them (shuffle, then phrasing; or the reverse).
    if caption_first > 0 and rng.random() < caption_first:
        rng.shuffle(chosen)
        return [replace(caption, text=rng.choice(scenes.CAPTION_PROMPTS))] + chosen
    if rng.random() < 0.5:
        chosen.append(replace(caption, text=rng.choice(scenes.CAPTION_PROMPTS)))
    rng.shuffle(chosen)
    return chosen


def encode_conversation(tokenizer, image_token_id: int, n_image: int, qas) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (T,) of a ChatML conversation with the image in the first user turn, and labels (T,)."""
    ids: list[int] = []
    labels: list[int] = []

    def add(text: str, learn: bool) -> None:
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(toks)
        labels.extend(toks if learn else [-100] * len(toks))

    add(SYSTEM, False)
    for i, q in enumerate(qas):
        add("<|im_start|>user\n", False)
        if i == 0:
            ids.extend([image_token_id] * n_image)
            labels.extend([-100] * n_image)
            add("\n", False)
        add(f"{q.text}<|im_end|>\n<|im_start|>assistant\n", False)
        add(f"{q.answer}<|im_end|>", True)
        add("\n", False)
    return torch.tensor(ids), torch.tensor(labels)


def patch_kinds(scene: scenes.Scene, patch: int) -> torch.Tensor:
    """Per patch: 0 for background, else 1 + colour index * len(SHAPES) + shape index."""
    colour, shape = patch_labels(scene, patch)
    return torch.where(colour > 0, 1 + (colour - 1) * len(scenes.SHAPES) + (shape - 1), 0)


def word_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise SystemExit(f"{word!r} is {len(ids)} tokens in this tokenizer; the reading table needs one")
    return ids[0]


def initial_table(tokenizer, embeddings: torch.Tensor) -> torch.Tensor:
    """(1 + colours x shapes, d): background as '.', each kind as its colour word plus its shape word."""
    rows = [embeddings[word_id(tokenizer, ".")]]
    for colour in scenes.COLOURS:
        for shape in scenes.SHAPES:
            rows.append(embeddings[word_id(tokenizer, " " + colour)] + embeddings[word_id(tokenizer, " " + shape)])
    return torch.stack(rows).float()


def answer_loss(model, tokenizer, scene, rng, image_rows, keep=None, caption_first=0.0,
                caption_order="left-to-right") -> tuple[torch.Tensor, int]:
    """Cross-entropy on the answer tokens of one conversation about ``scene``, its image tokens given.

    ``keep`` (bool, one per image token) leaves the other image tokens out of the
    sequence while every token keeps its position, as token pruning does."""
    cfg = model.config
    lm = model.model.language_model
    chat = conversation(scene, rng, caption_first, caption_order)
    ids, labels = encode_conversation(tokenizer, cfg.image_token_id, IMAGE_TOKENS, chat)
    x = lm.embed_tokens(ids[None]).clone()
    is_image = ids == cfg.image_token_id
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x[0, is_image] = image_rows().to(x.dtype)
        present = torch.ones_like(is_image)
        if keep is not None:
            present[is_image] = keep
        position_ids = torch.arange(len(ids))[present]
        hidden = lm(inputs_embeds=x[:, present], position_ids=position_ids[None]).last_hidden_state[0]
        # Position t predicts token t + 1: score only the positions that precede an answer token.
        targets = labels[present][1:]
        where = (targets != -100).nonzero().flatten()
        logits = model.lm_head(hidden[where])
    return F.cross_entropy(logits.float(), targets[where]), len(where)


def background_dropout(scene: scenes.Scene, rng: random.Random, most: float) -> torch.Tensor:
    """Keep mask over the image tokens: every object patch, and each background patch with
    probability 1 - p, p drawn per conversation in [0, most]. The engine drops image tokens
    (the knee, a count); a model that only ever saw all 196 reads the rest as noise."""
    objects = patch_kinds(scene, PATCH) > 0
    drop = rng.uniform(0.0, most)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    return objects | (torch.rand(len(objects), generator=gen) >= drop)


def train_reading_table(model, tokenizer, args, log) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2: the vectors the frozen language model reads scenes from best, given true patch labels."""
    embeddings = model.model.language_model.embed_tokens.weight.detach()
    table = initial_table(tokenizer, embeddings).requires_grad_(True)
    positions = torch.zeros(IMAGE_TOKENS, embeddings.shape[1], requires_grad=True)
    opt = torch.optim.Adam([table, positions], lr=args.table_lr)
    rng = random.Random(args.seed + 1)
    seed = args.next_seed
    for step in range(args.table_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.table_steps, args.table_lr, 20)
        scene = scenes.make_scene(seed)
        seed += 1
        kinds = patch_kinds(scene, PATCH)
        loss, answered = answer_loss(model, tokenizer, scene, rng, lambda: table[kinds] + positions)
        opt.zero_grad()
        loss.backward()
        opt.step()
        log({"stage": "table", "step": step, "loss": loss.item(), "answer_tokens": answered, "next_seed": seed})
    args.next_seed = seed
    return table.detach(), positions.detach()


def distil_projector(model, table: torch.Tensor, positions: torch.Tensor, args, log) -> None:
    """Stage 3: projector(tower features of a patch) -> table[what the patch shows] + positions[patch].

    The tower trains too: stage 1 taught it what each patch shows, not where the
    patch is, and the position vectors are a large part of the target."""
    projector = model.model.multi_modal_projector
    params = list(projector.parameters()) + list(model.model.vision_tower.parameters())
    opt = torch.optim.Adam(params, lr=args.distil_lr)
    seed = args.next_seed
    for step in range(args.distil_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.distil_steps, args.distil_lr, 20)
        batch = [scenes.make_scene(seed + i) for i in range(args.distil_batch)]
        seed += len(batch)
        targets = torch.stack([table[patch_kinds(s, PATCH)] + positions for s in batch])
        out = projector(tower_features(model, torch.stack([pixels(s.render()) for s in batch])))
        loss = F.mse_loss(out, targets) / targets.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        log({"stage": "distil", "step": step, "loss": loss.item(), "next_seed": seed})
    args.next_seed = seed


def train_language_stage(model, tokenizer, args, log) -> None:
    """Stage 4: tower + projector through the frozen language model, loss on answers only."""
    tower_params = list(model.model.vision_tower.parameters())
    proj_params = list(model.model.multi_modal_projector.parameters())
    opt = torch.optim.AdamW(
        [{"params": tower_params, "lr": args.tower_lr, "peak": args.tower_lr},
         {"params": proj_params, "lr": args.lr, "peak": args.lr}],
        weight_decay=0.0,
    )
    rng = random.Random(args.seed + args.step_offset)
    seed = args.next_seed
    started = time.time()

    def image_rows(scene):
        feats = model.model.get_image_features(pixel_values=pixels(scene.render())[None])
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        return torch.cat(list(feats), dim=0) if isinstance(feats, (list, tuple)) else feats.flatten(0, -2)

    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, group["peak"], 20)
        opt.zero_grad()
        total, answered = 0.0, 0
        for _ in range(args.accumulate):
            scene = scenes.make_scene(seed)
            seed += 1
            keep = background_dropout(scene, rng, args.drop_background) if args.drop_background > 0 else None
            loss, n = answer_loss(model, tokenizer, scene, rng, lambda: image_rows(scene), keep,
                                   args.caption_first, args.caption_order)
            (loss / args.accumulate).backward()
            total += loss.item()
            answered += n
        torch.nn.utils.clip_grad_norm_(tower_params + proj_params, 1.0)
        opt.step()
        log({"stage": "language", "step": args.step_offset + step, "loss": total / args.accumulate,
             "answer_tokens": answered, "elapsed_s": round(time.time() - started, 1), "next_seed": seed})
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save(model, args.out)


def resume_point(log_path: Path) -> tuple[int, int]:
    """(first unused scene seed, next stage-4 step) from a log written by an earlier run."""
    rows = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.is_file() else []
    language = [r for r in rows if r["stage"] == "language"]
    if not language:
        raise SystemExit(f"--resume: {log_path} records no stage-4 step to continue from")
    return language[-1]["next_seed"], language[-1]["step"] + 1


def load_trained(model, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    for prefix, module in (("vision_tower.", model.model.vision_tower),
                           ("multi_modal_projector.", model.model.multi_modal_projector)):
        own = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(own, strict=True)


def save(model, out: Path) -> None:
    from safetensors.torch import save_file

    state = {}
    for prefix, module in (("vision_tower.", model.model.vision_tower),
                           ("multi_modal_projector.", model.model.multi_modal_projector)):
        for k, v in module.state_dict().items():
            state[prefix + k] = v.detach().to(torch.float16).contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out)


STAGES = (
    ("tower", "1. tower warm-up (patch colour + shape)", "cross-entropy"),
    ("table", "2. reading table through frozen SmolLM2", "cross-entropy (answers)"),
    ("distil", "3. tower + projector distillation", "MSE / target power"),
    ("language", "4. tower + projector through SmolLM2", "cross-entropy (answers)"),
)


def plot_curve(log_path: Path, curve: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    fig, axes = plt.subplots(1, len(STAGES), figsize=(16, 3.6))
    for ax, (stage, title, ylabel) in zip(axes, STAGES):
        steps = [r["step"] for r in rows if r["stage"] == stage]
        loss = np.array([r["loss"] for r in rows if r["stage"] == stage])
        ax.plot(steps, loss, color="#bbbbbb", linewidth=0.8, label="per step")
        if len(loss) >= 10:
            k = 10 if stage != "table" else 25
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smooth, color="#1f5ad6", label=f"mean of {k}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    curve.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(curve, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table-steps", type=int, default=800, help="reading-table steps (stage 2), a conversation each")
    ap.add_argument("--table-lr", type=float, default=1e-2)
    ap.add_argument("--distil-steps", type=int, default=400)
    ap.add_argument("--distil-batch", type=int, default=16, help="scenes per distillation step")
    ap.add_argument("--distil-lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=700, help="stage-4 optimiser steps")
    ap.add_argument("--accumulate", type=int, default=2, help="conversations per stage-4 step")
    ap.add_argument("--lr", type=float, default=2e-4, help="projector peak learning rate in stage 4")
    ap.add_argument("--tower-lr", type=float, default=5e-5, help="tower peak learning rate in stage 4")
    ap.add_argument("--drop-background", type=float, default=0.0,
                    help="stage 4: leave out up to this share of background image tokens per conversation")
    ap.add_argument("--caption-first", type=float, default=0.0,
                    help="stage 4: share of conversations that open with the caption (see conversation())")
    ap.add_argument("--caption-order", choices=scenes.CAPTION_ORDERS, default="left-to-right",
                    help="stage 4: the order captions name objects in (see scenes.CAPTION_ORDERS)")
    ap.add_argument("--warmup-steps", type=int, default=600, help="tower warm-up steps (stage 1)")
    ap.add_argument("--warmup-batch", type=int, default=16)
    ap.add_argument("--warmup-lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=25)
    ap.add_argument("--out", type=Path, default=ROOT / "edgecm" / "data" / "demo_vision.safetensors")
    ap.add_argument("--log", type=Path, default=ROOT / "bench" / "results" / "train-demo-vision.jsonl")
    ap.add_argument("--curve", type=Path, default=ROOT / "docs" / "demo-vision-loss.png")
    ap.add_argument("--save-table", type=Path, help="also write stage 2's reading table here (torch.save)")
    ap.add_argument("--resume", type=Path, help="continue stage 4 from these saved weights, appending to --log")
    args = ap.parse_args()
    args.step_offset = 0
    if args.resume:
        args.next_seed, args.step_offset = resume_point(args.log)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    log_file = args.log.open("a" if args.resume else "w")
    started = time.time()

    def log(row: dict) -> None:
        row["wall_s"] = round(time.time() - started, 1)
        log_file.write(json.dumps(row) + "\n")
        log_file.flush()
        if row["step"] % 10 == 0:
            print(json.dumps(row), flush=True)

    gguf = demo.smollm2_gguf_path()
    with tempfile.TemporaryDirectory() as tmp:
        from edgecm.gguf_source import GGUFSource

        hidden = GGUFSource(gguf).config.text.hidden_size
        demo.build_demo(gguf, Path(tmp), vision_state=demo.random_vision_state(args.seed, hidden))
        model = LlavaForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32)
        from transformers import AutoProcessor

        tokenizer = AutoProcessor.from_pretrained(tmp).tokenizer
    model.train()
    for p in model.model.language_model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(False)
    # The projector starts with outputs at the scale of the token embeddings the model knows.
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.weight.mul_(0.1)
        model.model.multi_modal_projector.linear_2.bias.zero_()

    if args.resume:
        load_trained(model, args.resume)
    else:
        warm_up_tower(model, args, log)
        table, positions = train_reading_table(model, tokenizer, args, log)
        if args.save_table:
            torch.save({"table": table, "positions": positions}, args.save_table)
        distil_projector(model, table, positions, args, log)
        save(model, args.out)
    train_language_stage(model, tokenizer, args, log)
    log_file.close()
    plot_curve(args.log, args.curve)
    print(f"trained in {time.time() - started:.0f} s; weights: {args.out}; curve: {args.curve}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
