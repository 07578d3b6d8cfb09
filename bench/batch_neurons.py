"""What one shared decode set costs a batch: top-1 agreement with dense, and the neuron share, against batch size.

    python3 bench/batch_neurons.py [--batches 1,2,4,8,16] [--prompts 16] [--new-tokens 24]

A batch decodes with one set of core neurons per layer, chosen from all its
sequences' tokens (f(n) and activation mass summed). Batch size 1 is the
per-image choice of single runs. For each batch size the same prompts run in
consecutive batches, teacher-forced on the dense model's own greedy answers,
and we report, pooled over every answer position:
- top-1 agreement: the share of positions where the sparse argmax is the
  dense token;
- the share of FFN neurons decode used (mean over batches and layers);
- the share of layers kept dense by the default's 90 % rule.

Models: SmolLM2-135M-Instruct (real weights, the shipped text prompts) and
the demo (its trained tower; held-out scenes with a caption prompt, so
answers are long enough to measure). Settings: the default (knee tokens,
mass 0.98 neurons) and the paper's beta 0.4. Writes batch-neurons-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def settings():
    from edgecm.sparsity import NeuronBudget, SparsitySettings

    return {"default (knee, mass 0.98)": SparsitySettings(),
            "beta 0.4": SparsitySettings(neurons=NeuronBudget("beta", 0.4))}


def prompts_for(kind: str, count: int):
    from edgecm.checkpoint import open_checkpoint
    from edgecm.demo import demo_checkpoint_dir, smollm2_gguf_path
    from edgecm.fidelity import load_prompts
    from edgecm.prompt import PromptBuilder

    if kind == "smollm2":
        checkpoint = open_checkpoint(smollm2_gguf_path())
        builder = PromptBuilder(checkpoint)
        texts = load_prompts()
        return checkpoint, builder, [builder.build(texts[i % len(texts)]) for i in range(count)]
    from edgecm import scenes

    checkpoint = open_checkpoint(demo_checkpoint_dir())
    builder = PromptBuilder(checkpoint)
    images = [scenes.make_scene(scenes.HELD_OUT_SEED_START + 60_000 + i).render() for i in range(count)]
    return checkpoint, builder, [builder.build(scenes.CAPTION_PROMPTS[0], image) for image in images]


def measure(kind: str, args) -> dict:
    from edgecm.sparsity import DENSE
    from runtime.batch import generate_batch
    from runtime.engine import Engine, GenerationSettings

    checkpoint, builder, prompts = prompts_for(kind, args.prompts)
    engine = Engine(checkpoint)
    dense = [engine.generate(p, GenerationSettings(max_new_tokens=args.new_tokens), builder.stop_token_ids,
                             collect_logits=True, sparsity=DENSE) for p in prompts]
    answers = [d.token_ids for d in dense]
    rows = []
    for name, sparsity in settings().items():
        for batch in args.batches:
            agree = positions = 0
            shares, dense_layers = [], []
            started = time.perf_counter()
            for start in range(0, len(prompts), batch):
                chunk = slice(start, start + batch)
                forced = answers[chunk]
                per = [GenerationSettings(max_new_tokens=len(a), stop_at_eos=False) for a in forced]
                results = generate_batch(engine, prompts[chunk], per, sparsity=sparsity, collect_logits=True,
                                         forced_tokens=forced)
                for result, answer in zip(results, forced):
                    agree += int((result.logits.argmax(-1) == torch.tensor(answer)).sum())
                    positions += len(answer)
                shares.append(results[0].neuron_fraction)
                dense_layers.append(sum(n is None for n in results[0].decode_neurons) / len(results[0].decode_neurons))
            rows.append({"setting": name, "batch": batch, "top1_agreement": agree / positions,
                         "neuron_share": sum(shares) / len(shares), "dense_layer_share": sum(dense_layers) / len(dense_layers),
                         "positions": positions, "seconds": round(time.perf_counter() - started, 1)})
            print(f"  {kind} {name} batch {batch}: top-1 {rows[-1]['top1_agreement']:.3f}, "
                  f"neurons {rows[-1]['neuron_share']:.3f}", file=sys.stderr, flush=True)
    return {"model": kind, "prompts": len(prompts), "rows": rows}


def markdown(report: dict) -> str:
    lines = [f"# One decode set per batch, on {report['device']}", "",
             f"`{report['command']}`; {report['prompts']} prompts per model, teacher-forced on the dense greedy "
             f"answer (up to {report['new_tokens']} tokens). Batch 1 is each prompt's own core neurons.", ""]
    for model in report["models"]:
        lines += [f"## {model['model']}", "", "| setting | batch | top-1 agreement with dense | FFN neurons used | "
                  "layers kept dense |", "|---|---|---|---|---|"]
        for r in model["rows"]:
            lines.append(f"| {r['setting']} | {r['batch']} | {100 * r['top1_agreement']:.1f}% | "
                         f"{100 * r['neuron_share']:.1f}% | {100 * r['dense_layer_share']:.0f}% |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--only", choices=("smollm2", "demo"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    models = [measure(kind, args) for kind in ("smollm2", "demo") if args.only in (None, kind)]
    device = f"{platform.machine()} CPU ({os.cpu_count()} cores)"
    report = {"device": device, "torch": torch.__version__, "threads": args.threads, "prompts": args.prompts,
              "new_tokens": args.new_tokens, "command": "python3 bench/batch_neurons.py " + " ".join(sys.argv[1:]),
              "models": models}
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"batch-neurons-{slug}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"batch-neurons-{slug}.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
