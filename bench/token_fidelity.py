"""Token-pruning fidelity on held-out scenes of the shapes world (the paper's Table 2, on the demo).

    python3 bench/token_fidelity.py [--scenes 300] [--first-scene 0] [--per-scene 2] [--counts 64,32,16] [--model DIR]

Each held-out scene (seeds from edgecm.scenes.HELD_OUT_SEED_START, never
used in training) is asked ``--per-scene`` questions, the kinds taken in
rotation so that every kind is asked about equally often. ``--first-scene``
skips that many held-out scenes, so that candidate weights can be compared
on a range apart from the reported one (from 0). Every question is answered
greedily under each variant:

- dense: no pruning at all;
- core at the knee (the CoreMatching default token rule), with its mean kept count;
- core, fastv, random and sparsevlm at each of ``--counts`` kept image tokens
  (for sparsevlm: the visual tokens left after its last stage, aggregates
  included), and sparsevlm with its own adaptive count (the rank rule);
- core at the knee, and core and sparsevlm at the middle count, again with
  ``--keep-early-kv`` (layers 0..K-1 keep the dropped tokens' KV entries
  instead of the core-token-only cache).

Token variants decode with every FFN neuron (``--neurons dense``) so that the
table measures token pruning alone; one more row, "corematching default",
adds the default neuron budget to the knee. With a calibration (the model's
``edgecm calibrate`` record, or the demo's shipped one):

- ``calibrated``: the calibrated token setting and neuron budget, as ``run`` applies them, and the
  token setting alone with every FFN neuron;
- ``--k-sweep``: every ranking at the calibrated budget at every K of the
  calibration grid, neurons dense (with ``--only``, the sweep's rows run
  beside the variants named). An answer is right when it
equals the ground truth after lower-casing and trimming a final full stop;
a caption is right when it names exactly the scene's objects.

Writes ``--out``.json (every answer) and ``--out``.md (the table) with the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgecm import scenes  # noqa: E402
from edgecm.sparsity import DENSE, NeuronBudget, SparsitySettings, TokenRule  # noqa: E402

ANSWER_TOKENS = {"caption": 40}  # a four-object caption is about 20 tokens
SHORT_ANSWER_TOKENS = 6
KINDS = scenes.QUESTION_KINDS


def variants(counts: list[int]) -> list[tuple[str, SparsitySettings]]:
    tokens_only = SparsitySettings(neurons=NeuronBudget("dense"))
    out = [("dense", DENSE), ("core knee", tokens_only)]
    for n in counts:
        for rank in ("core", "fastv", "random", "sparsevlm"):
            out.append((f"{rank} {n}", replace(tokens_only, tokens=TokenRule("count", n), token_rank=rank)))
    out.append(("sparsevlm adaptive (rank rule)", replace(tokens_only, token_rank="sparsevlm")))
    middle = counts[len(counts) // 2]
    out.append(("core knee, early KV kept", replace(tokens_only, keep_early_kv=True)))
    for rank in ("core", "sparsevlm"):
        out.append((f"{rank} {middle}, early KV kept",
                    replace(tokens_only, tokens=TokenRule("count", middle), token_rank=rank, keep_early_kv=True)))
    out.append(("corematching default", SparsitySettings()))
    return out


def calibrated_variants(checkpoint, demo: bool, k_sweep: bool) -> list[tuple[str, SparsitySettings]]:
    """The calibrated setting, and with ``k_sweep`` each ranking at its budget at every K of the grid."""
    from edgecm.calibration_record import load_record
    from edgecm.demo import SHIPPED_CALIBRATION
    from runtime.token_calibration import RANKINGS, REFERENCE_RANKINGS, Candidate, layer_grid

    calibration, notice = load_record(checkpoint.path, SHIPPED_CALIBRATION if demo else None)
    if calibration is None:
        print(f"token_fidelity: no calibration applies ({notice or 'none made'}); no calibrated rows",
              file=sys.stderr)
        return []
    settings = calibration.apply(SparsitySettings())
    out = [("calibrated", settings), ("calibrated tokens, neurons dense", replace(settings, neurons=NeuronBudget("dense")))]
    if k_sweep and settings.prunes_tokens:
        tokens = settings.tokens
        for rank in (*RANKINGS, *REFERENCE_RANKINGS):
            if tokens.kind == "knee" and rank in ("fastv", "random"):
                continue  # no adaptive rule of their own
            for k in layer_grid(checkpoint.config.text.num_layers):
                candidate = Candidate(rank, k, tokens)
                out.append((candidate.label, candidate.settings(SparsitySettings())))
    return out


def held_out_questions(n_scenes: int, per_scene: int, first: int = 0) -> list[tuple[scenes.Scene, scenes.Question]]:
    """``per_scene`` questions for each held-out scene from the ``first``-th on, kinds in rotation."""
    return scenes.questions_in_rotation(scenes.HELD_OUT_SEED_START + first, n_scenes, per_scene)


def machine() -> str:
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=300)
    ap.add_argument("--first-scene", type=int, default=0,
                    help="skip this many held-out scenes (a validation range apart from the reported one)")
    ap.add_argument("--per-scene", type=int, default=1)
    ap.add_argument("--counts", default="64,32,16", help="kept image-token counts, comma-separated")
    ap.add_argument("--model", default=None, help="a checkpoint directory (default: the demo)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="variant names to run, separated by ';' (default: all)")
    ap.add_argument("--k-sweep", action="store_true", help="add every ranking at the calibrated budget at every K")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "token-fidelity-demo-cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from edgecm.checkpoint import open_checkpoint
    from edgecm.demo import demo_checkpoint_dir
    from edgecm.prompt import PromptBuilder
    from runtime.engine import Engine, GenerationSettings

    checkpoint = open_checkpoint(args.model or demo_checkpoint_dir())
    builder = PromptBuilder(checkpoint)
    engine = Engine(checkpoint)
    counts = [int(c) for c in args.counts.split(",")]
    chosen = variants(counts) + calibrated_variants(checkpoint, args.model is None, args.k_sweep)
    if args.only:
        names = {n.strip() for n in args.only.split(";")}  # names hold commas ("core knee, early KV kept")
        chosen = [(n, s) for n, s in chosen if n in names or (args.k_sweep and " K=" in n)]  # the sweep stays
    if args.first_scene < 0:
        ap.error(f"--first-scene must be 0 or more, got {args.first_scene}")
    questions = held_out_questions(args.scenes, args.per_scene, args.first_scene)
    rows: list[dict] = []
    started = time.time()
    for qi, (scene, question) in enumerate(questions):
        prompt = builder.build(question.text, scene.render())
        budget = ANSWER_TOKENS.get(question.kind, SHORT_ANSWER_TOKENS)
        for name, sparsity in chosen:
            result = engine.generate(prompt, GenerationSettings(max_new_tokens=budget), builder.stop_token_ids,
                                     sparsity=sparsity)
            answer = builder.decode(result.token_ids).strip()
            rows.append({
                "variant": name, "seed": scene.seed, "kind": question.kind, "question": question.text,
                "truth": question.answer, "answer": answer, "correct": scenes.answer_is_correct(question, answer),
                "kept_image_tokens": result.kept_image_tokens, "image_tokens": result.image_tokens,
                "prefill_s": result.timings.time_to_answer_s,
            })
        if (qi + 1) % 20 == 0:
            print(f"{qi + 1}/{len(questions)} questions, {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    summary = summarise(rows, [n for n, _ in chosen])
    record = {"machine": machine(), "model": str(args.model or "demo"), "scenes": args.scenes,
              "first_seed": scenes.HELD_OUT_SEED_START + args.first_scene, "questions": len(questions),
              "seconds": round(time.time() - started, 1), "summary": summary, "answers": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    table = markdown(summary, record)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


def summarise(rows: list[dict], names: list[str]) -> list[dict]:
    out = []
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        entry = {"variant": name, "n": len(mine)}
        for kind in KINDS:
            of_kind = [r for r in mine if r["kind"] == kind]
            entry[kind] = sum(r["correct"] for r in of_kind) / len(of_kind) if of_kind else None
        entry["overall"] = sum(r["correct"] for r in mine) / len(mine) if mine else None
        entry["mean_kept"] = sum(r["kept_image_tokens"] for r in mine) / len(mine) if mine else None
        entry["mean_prefill_s"] = sum(r["prefill_s"] for r in mine) / len(mine) if mine else None
        out.append(entry)
    return out


def markdown(summary: list[dict], record: dict) -> str:
    def pct(v):
        return "" if v is None else f"{100 * v:.1f}"

    image_tokens = record["answers"][0]["image_tokens"] if record["answers"] else 0
    lines = [
        f"Token-pruning fidelity on {record['scenes']} held-out scenes (seeds from {record['first_seed']}; "
        f"{record['questions']} questions), "
        f"model {record['model']}, {image_tokens} image tokens per image; {record['machine']}. "
        f"Exact-answer accuracy in %; kept = mean image tokens kept from layer K on (K = 2: layers 0 and 1 see "
        f"every token, unless the row names its K; the calibrated rows prune from the calibration's K; sparsevlm: "
        f"after its last stage, aggregates included); prefill s includes the vision tower, and its ratio to "
        f"dense's comes from the same run, question by question.",
        "",
        "| variant | " + " | ".join(KINDS) + " | overall | kept | prefill s | prefill x vs dense |",
        "|---" * (len(KINDS) + 5) + "|",
    ]
    dense = next((e for e in summary if e["variant"] == "dense"), None)
    for e in summary:
        speedup = f"{dense['mean_prefill_s'] / e['mean_prefill_s']:.2f}" if dense and e["mean_prefill_s"] else ""
        lines.append(f"| {e['variant']} | " + " | ".join(pct(e[k]) for k in KINDS)
                     + f" | **{pct(e['overall'])}** | {e['mean_kept']:.1f} | {e['mean_prefill_s']:.3f} | {speedup} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
