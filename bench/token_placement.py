"""Where kept image tokens fall: object patches against background, on held-out scenes of the shapes world.

    python3 bench/token_placement.py [--scenes 100] [--count 32] [--layers 2,4,8,14]

The shapes world knows which patch holds which object, so it can say what a
token rule keeps, apart from whether the answer survives (bench/token_fidelity.py
measures that). A patch is an object's when the object covers at least
PATCH_COVER of it, as in training. For each held-out scene and one of its
questions (the same rotation as token_fidelity.py):

1. The engine's own selections at its default layer (K = 2), dense neurons:
   CoreMatching at the knee, and core, fastv, random and sparsevlm keeping
   --count tokens; and the demo's calibrated token setting at its own K. Reported: tokens kept, the share of object patches kept
   (recall), the share of kept tokens that are object patches, and the share
   of objects with at least one patch kept.
2. A diagnostic of the core score, recomputed from transformers' own forward
   pass (the dense path edgecm matches) at several K: the object share among
   the --count highest and the --count lowest scores, with Core(K) counted as
   the specification says (every prompt token) and, to test whether the
   background outvotes the objects in f(n), over the text tokens only and
   over the image tokens only. These variants exist only here; the engine
   implements the specification. At the engine's K the recomputed
   every-token scores are checked against the engine's.

Writes ``--out``.json and ``--out``.md with the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after the root, so that `runtime` stays the package

from edgecm import scenes  # noqa: E402
from edgecm.corematching import core_neurons, knee_keep, match_scores, token_core_frequency, top_count  # noqa: E402
from edgecm.sparsity import NeuronBudget, SparsitySettings, TokenRule  # noqa: E402
from token_fidelity import held_out_questions, machine  # noqa: E402
from train_demo_vision import IMAGE_TOKENS, PATCH, PATCH_COVER, patch_cover  # noqa: E402

COUNTED_OVER = ("every prompt token (the specification)", "text tokens only", "image tokens only")


def engine_rules(count: int) -> list[tuple[str, SparsitySettings]]:
    tokens_only = SparsitySettings(neurons=NeuronBudget("dense"))
    rules = [("core knee", tokens_only)]
    for rank in ("core", "fastv", "random", "sparsevlm"):
        rules.append((f"{rank} {count}", replace(tokens_only, tokens=TokenRule("count", count), token_rank=rank)))
    return rules


def calibrated_rule(path: Path) -> list[tuple[str, SparsitySettings]]:
    """The demo's calibrated token setting (every FFN neuron), where a calibration applies and prunes."""
    from edgecm.calibration_record import load_record
    from edgecm.demo import SHIPPED_CALIBRATION

    calibration, _ = load_record(path, SHIPPED_CALIBRATION)
    if calibration is None:
        return []
    settings = replace(calibration.apply(SparsitySettings()), neurons=NeuronBudget("dense"))
    return [("calibrated", settings)] if settings.prunes_tokens else []


def placement(kept: torch.Tensor, objects: torch.Tensor) -> dict:
    """kept: image-token indices; objects: (objects, patches) bool."""
    chosen = torch.zeros(objects.shape[1], dtype=torch.bool)
    chosen[kept] = True
    any_object = objects.any(dim=0)
    return {
        "kept": int(chosen.sum()),
        "object_recall": float((chosen & any_object).sum() / any_object.sum().clamp(min=1)),
        "object_share_of_kept": float((chosen & any_object).sum() / chosen.sum().clamp(min=1)),
        "objects_seen": float((objects & chosen).any(dim=1).float().mean()),
    }


class ActivationTap:
    """The input of every down_proj of a transformers LLaVA (h_t of the specification), per forward."""

    def __init__(self, model, layers: list[int]):
        self.h: dict[int, torch.Tensor] = {}
        blocks = model.model.language_model.layers
        for layer in layers:
            blocks[layer].mlp.down_proj.register_forward_pre_hook(self._hook(layer))

    def _hook(self, layer: int):
        def keep(module, inputs):
            self.h[layer] = inputs[0][0].detach()
        return keep


def score_diagnostic(h: torch.Tensor, image: torch.Tensor, objects: torch.Tensor, count: int, rho: float,
                     beta: float) -> dict:
    """h: (T, F) at the layer read; image: (T,) bool; objects: (objects, patches) bool."""
    any_object = objects.any(dim=0)
    out = {}
    for name, rows in zip(COUNTED_OVER, (torch.ones_like(image), ~image, image)):
        scores = match_scores(h[image], core_neurons(token_core_frequency(h[rows], rho), beta))
        out[name] = {
            "top_object_share": float(any_object[top_count(scores, count)].float().mean()),
            "bottom_object_share": float(any_object[top_count(-scores, count)].float().mean()),
            "knee_object_recall": placement(knee_keep(scores), objects)["object_recall"],
            "scores": scores,
        }
    return out


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=100)
    ap.add_argument("--count", type=int, default=32, help="image tokens the fixed-count rules keep")
    ap.add_argument("--layers", default="2,4,8,14", help="K values for the score diagnostic (layer K-1 is read)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "token-placement-demo-cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from edgecm.checkpoint import open_checkpoint
    from edgecm.demo import demo_checkpoint_dir
    from edgecm.prompt import PromptBuilder
    from runtime.engine import Engine, GenerationSettings

    hf_logging.set_verbosity_error()
    path = demo_checkpoint_dir()
    checkpoint = open_checkpoint(path)
    builder = PromptBuilder(checkpoint)
    engine = Engine(checkpoint, dtype="float32")  # the reference below is float32: the scores must match exactly
    reference = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    ks = [int(k) for k in args.layers.split(",")]
    default = SparsitySettings()
    if default.prune_layer not in ks:
        ks.insert(0, default.prune_layer)
    tap = ActivationTap(reference, [k - 1 for k in ks])
    rules = engine_rules(args.count) + calibrated_rule(path)

    rows = []
    started = time.time()
    for scene, question in held_out_questions(args.scenes, 1):
        prompt = builder.build(question.text, scene.render())
        objects = patch_cover(scene, PATCH) >= PATCH_COVER
        row = {"seed": scene.seed, "question": question.text, "objects": len(scene.objects),
               "object_patches": int(objects.any(dim=0).sum()), "rules": {}, "diagnostic": {}}
        core_scores = None
        for name, sparsity in rules:
            result = engine.generate(prompt, GenerationSettings(max_new_tokens=1), builder.stop_token_ids,
                                     sparsity=sparsity)
            row["rules"][name] = placement(result.selection.keep, objects)
            if name == "core knee":
                core_scores = result.selection.core_scores
        with torch.inference_mode():
            ids = prompt.input_ids
            reference(input_ids=ids, pixel_values=prompt.pixel_values, attention_mask=torch.ones_like(ids))
        image = prompt.input_ids[0] == prompt.image_token_id
        for k in ks:
            found = score_diagnostic(tap.h[k - 1], image, objects, args.count, default.rho, default.beta)
            if k == default.prune_layer:
                # The recomputation must be the engine's score, or the variants beside it say nothing.
                row["score_mismatches"] = int((found[COUNTED_OVER[0]]["scores"] != core_scores).sum())
            row["diagnostic"][str(k)] = {n: {m: v for m, v in d.items() if m != "scores"} for n, d in found.items()}
        rows.append(row)
        if len(rows) % 20 == 0:
            print(f"{len(rows)}/{args.scenes} scenes, {time.time() - started:.0f} s", file=sys.stderr, flush=True)

    summary = summarise(rows, [n for n, _ in rules], ks)
    record = {"machine": machine(), "scenes": len(rows), "count": args.count, "prune_layer": default.prune_layer,
              "command": "python3 bench/token_placement.py " + " ".join(sys.argv[1:]),
              "seconds": round(time.time() - started, 1), "summary": summary, "scenes_detail": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    table = markdown(record)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


def summarise(rows: list[dict], rule_names: list[str], ks: list[int]) -> dict:
    return {
        "object_patch_share": mean(r["object_patches"] / IMAGE_TOKENS for r in rows),
        "score_mismatches": sum(r["score_mismatches"] for r in rows),
        "rules": {name: {metric: mean(r["rules"][name][metric] for r in rows) for metric in rows[0]["rules"][name]}
                  for name in rule_names},
        "diagnostic": {str(k): {name: {metric: mean(r["diagnostic"][str(k)][name][metric] for r in rows)
                                       for metric in rows[0]["diagnostic"][str(k)][name]}
                                for name in COUNTED_OVER}
                       for k in ks},
    }


def markdown(record: dict) -> str:
    s, n, k = record["summary"], record["count"], record["prune_layer"]

    def pct(v):
        return f"{100 * v:.1f}"

    lines = [
        f"# Where kept image tokens fall (demo, {record['scenes']} held-out scenes)", "",
        f"`{record['command']}`; {record['machine']}. Object patches are {pct(s['object_patch_share'])} % of the "
        f"{IMAGE_TOKENS} image tokens on average (a patch is an object's when the object covers at least {PATCH_COVER:.0%} "
        f"of it).", "",
        f"## The engine's selections (K = {k}, every FFN neuron)", "",
        "| rule | kept | object patches kept (recall) % | kept that are object patches % | objects with a patch kept % |",
        "|---|---|---|---|---|",
    ]
    for name, m in s["rules"].items():
        lines.append(f"| {name} | {m['kept']:.1f} | {pct(m['object_recall'])} | {pct(m['object_share_of_kept'])} | "
                     f"{pct(m['objects_seen'])} |")
    lines += [
        "", f"## The core score, recomputed: object share among the {n} highest and the {n} lowest scores", "",
        f"score(i) = |G(i) ∩ Core(K)|, read at layer K-1, with Core(K) counted over the tokens named. "
        f"Only the first is what the engine does; at K = {k} these scores differ from the engine's on "
        f"{s['score_mismatches']} of {IMAGE_TOKENS * record['scenes']} image tokens. The other two are diagnostics. "
        f"Chance is the object patch share above.", "",
        f"| K | Core(K) counted over | top {n} object share % | bottom {n} object share % | knee object recall % |",
        "|---|---|---|---|---|",
    ]
    for layer, by_set in s["diagnostic"].items():
        for name, m in by_set.items():
            lines.append(f"| {layer} | {name} | {pct(m['top_object_share'])} | {pct(m['bottom_object_share'])} | "
                         f"{pct(m['knee_object_recall'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
