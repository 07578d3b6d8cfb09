"""What the token-calibration sweep costs, against the naive loop over the same candidates.

    python3 bench/token_sweep_cost.py [--prompts 6] [--threads 2] [--model DIR]

On the first --prompts of the demo's calibration set (its validation scenes;
the kinds in rotation, so captions are among them), every candidate of
``edgecm calibrate``'s grid is measured twice: by the sweep (one dense pass per
prompt, each candidate from its prune layer on, candidates of one K batched,
the answer teacher-forced in one pass) and naively (each candidate through
``Engine.generate``: every layer, every decode step). Both give the same
agreement for every candidate (checked here); the times are side by side in
one run. Writes bench/results/token-sweep-cost-<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32, help="as edgecm calibrate (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from edgecm.calibration_set import DEMO_CALIBRATION_SCENES, demo_validation
    from edgecm.checkpoint import open_checkpoint
    from edgecm.demo import demo_checkpoint_dir
    from edgecm.fidelity import dense_references
    from edgecm.prompt import PromptBuilder
    from runtime.engine import Engine
    from runtime.token_calibration import candidates, sweep

    checkpoint = open_checkpoint(demo_checkpoint_dir())
    builder = PromptBuilder(checkpoint)
    engine = Engine(checkpoint)
    items = demo_validation(args.prompts).items
    refs = dense_references(engine, [builder.build(i.question, i.image) for i in items], builder.stop_token_ids,
                            args.max_new_tokens)
    todo = candidates(checkpoint.config.text.num_layers)
    fast, fast_s = sweep(engine, refs, only=todo)
    naive, naive_s = sweep(engine, refs, only=todo, naive=True)
    worst = max(abs(a.top1_agreement - b.top1_agreement) for a, b in zip(fast, naive))
    answer_tokens = [len(r.tokens) for r in refs]
    machine = f"{platform.machine()} CPU, {args.threads} threads, torch {torch.__version__}"
    report = {
        "machine": machine, "command": "python3 bench/token_sweep_cost.py " + " ".join(sys.argv[1:]),
        "prompts": len(refs), "answer_tokens": answer_tokens, "candidates": len(todo),
        "sweep_s": fast_s, "naive_s": naive_s, "speedup": naive_s / fast_s,
        "sweep_s_per_prompt": fast_s / len(refs), "naive_s_per_prompt": naive_s / len(refs),
        "max_agreement_difference": worst,
        "extrapolated_to_calibration_set": {"prompts": DEMO_CALIBRATION_SCENES,
                                            "sweep_s": fast_s / len(refs) * DEMO_CALIBRATION_SCENES,
                                            "naive_s": naive_s / len(refs) * DEMO_CALIBRATION_SCENES},
    }
    lines = [f"# Token-calibration sweep against the naive loop ({machine})", "",
             f"`{report['command']}`: {len(todo)} candidates on the first {len(refs)} demo calibration scenes "
             f"(dense answers of {', '.join(map(str, answer_tokens))} tokens); the same agreement for every "
             f"candidate both ways (largest difference {worst:.3g}).", "",
             "| | seconds | per prompt | for the 60-scene calibration set |", "|---|---|---|---|",
             f"| sweep (shared prefix, batched from K) | {fast_s:.0f} | {fast_s / len(refs):.1f} | "
             f"{report['extrapolated_to_calibration_set']['sweep_s']:.0f} (extrapolated) |",
             f"| naive (Engine.generate per candidate) | {naive_s:.0f} | {naive_s / len(refs):.1f} | "
             f"{report['extrapolated_to_calibration_set']['naive_s']:.0f} (extrapolated) |",
             f"| naive / sweep | {naive_s / fast_s:.2f}x | | |", ""]
    slug = re.sub(r"[^a-z0-9]+", "-", f"{platform.machine()} cpu {args.threads} threads".lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"token-sweep-cost-{slug}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"token-sweep-cost-{slug}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if worst <= 1e-9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
