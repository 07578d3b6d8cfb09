"""``edgecm calibrate``: measure neuron budgets against the dense model and keep the cheapest faithful one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

def cmd_calibrate(args: argparse.Namespace) -> int:
    from edgecm.calibration import DEFAULT_TARGET, search, write_calibration
    from edgecm.errors import EdgecmError
    from edgecm.fidelity import dense_references, load_prompts
    from edgecm.prompt import PromptBuilder
    from edgecm.sparsity import SparsitySettings
    from edgecm.vision import load_image
    from edgecm_cli import open_model
    from runtime.engine import Engine

    target = DEFAULT_TARGET if args.target is None else args.target
    if not 0 < target <= 1:
        raise EdgecmError(f"--target {target}: must be in (0, 1]")
    if args.limit is not None and args.limit < 1:
        raise EdgecmError(f"--limit {args.limit}: must be at least 1")
    texts = load_prompts(Path(args.prompts)) if args.prompts else load_prompts()
    texts = texts[: args.limit] if args.limit else texts
    image = load_image(args.image) if args.image else None
    base = SparsitySettings() if args.dense_above is None else SparsitySettings(dense_above=args.dense_above)
    checkpoint, model_name = open_model(args.model)
    builder = PromptBuilder(checkpoint, args.min_pixels, args.max_pixels)
    prompts = [builder.build(text, image) for text in texts]
    engine = Engine(
        checkpoint, device=args.device, dtype=args.dtype, resident=args.resident, budget=args.budget, quant=args.quant
    )
    print(f"edgecm: dense answers to {len(prompts)} prompts (up to {args.max_new_tokens} tokens each)", file=sys.stderr)
    refs = dense_references(engine, prompts, builder.stop_token_ids, args.max_new_tokens)

    def report(result) -> None:
        mark = "meets" if result.top1_agreement >= target else "below"
        print(
            f"edgecm: {result.setting:<10} agreement {result.top1_agreement:.3f} ({mark} {target}) | "
            f"KL {result.mean_kl:.3f} | neurons {result.neuron_fraction:.0%}",
            file=sys.stderr,
        )

    settings, result, measured = search(engine, refs, target, base, on_result=report)
    meta = {"model": model_name, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "image": args.image}
    path = write_calibration(checkpoint.path, settings, result, target, measured, meta)
    if args.json:
        print(path.read_text())
    elif result is None:
        print(f"no budget reached agreement {target}; decode stays dense. Wrote {path}")
    else:
        print(
            f"neurons {settings.neurons} (dense above {settings.dense_above:g}): agreement {result.top1_agreement:.3f}, "
            f"KL {result.mean_kl:.3f}, {result.neuron_fraction:.0%} of FFN neurons. Wrote {path}"
        )
    return 0
