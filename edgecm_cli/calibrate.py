"""``edgecm calibrate``: measure where and how to prune tokens, then the neuron budget, against the dense model.

Token pruning first (runtime.token_calibration: every ranking x prune layer x budget, the cheapest meeting
--target), when the calibration set has images; then the neuron budget (edgecm.calibration) under the chosen
token setting. Both go into one record beside the checkpoint, which run, chat, caption and show then apply.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path


def _layer_list(text: str | None, num_layers: int) -> tuple[int, ...] | None:
    from edgecm.errors import EdgecmError

    if text is None:
        return None
    try:
        layers = tuple(sorted({int(x) for x in text.split(",")}))
    except ValueError:
        raise EdgecmError(f"--prune-layers {text}: use a comma-separated list of layer numbers, e.g. 2,9,18") from None
    bad = [k for k in layers if not 1 <= k < num_layers]
    if bad:
        raise EdgecmError(f"--prune-layers {text}: K={bad[0]} does not exist here; K goes from 1 to "
                          f"{num_layers - 1} (layers 0..K-1 see every token, the model has {num_layers} layers)")
    return layers


def _ranks(text: str | None) -> tuple[str, ...] | None:
    from edgecm.errors import EdgecmError
    from runtime.token_calibration import RANKINGS

    if text is None:
        return None
    ranks = tuple(r.strip() for r in text.split(","))
    unknown = [r for r in ranks if r not in RANKINGS]
    if unknown:
        raise EdgecmError(f"--token-ranks {text}: {unknown[0]} is not a ranking; use some of {', '.join(RANKINGS)}")
    return ranks


def cmd_calibrate(args: argparse.Namespace) -> int:
    from edgecm import __version__
    from edgecm.calibration import DEFAULT_TARGET, search
    from edgecm.calibration_record import write_record
    from edgecm.calibration_set import load_calibration_set
    from edgecm.errors import EdgecmError
    from edgecm.fidelity import dense_references
    from edgecm.prompt import PromptBuilder
    from edgecm.sparsity import SparsitySettings, TokenRule
    from edgecm_cli import check_pixel_flags, open_model
    from runtime.engine import Engine
    from runtime.token_calibration import candidates, choose, sweep

    target = DEFAULT_TARGET if args.target is None else args.target
    if not 0 < target <= 1:
        raise EdgecmError(f"--target {target}: must be in (0, 1]")
    if args.plot is not None and not args.plot.endswith(".png"):
        raise EdgecmError(f"--plot {args.plot}: give a .png file name")
    ranks = _ranks(args.token_ranks)
    check_pixel_flags(args)
    calibration_set = load_calibration_set(args.set, args.question, args.limit, demo=args.model is None,
                                           prompts=args.prompts, image=args.image)
    checkpoint, model_name = open_model(args.model)
    num_layers = checkpoint.config.text.num_layers
    grid = _layer_list(args.prune_layers, num_layers)  # checked against config.json, before any weight is read
    builder = PromptBuilder(checkpoint, args.min_pixels, args.max_pixels)
    prompts = []
    for item in calibration_set.items:
        try:
            prompts.append(builder.build(item.question, item.image))
        except EdgecmError as exc:
            raise EdgecmError(f"{item.source}: {exc}") from None
    engine = Engine(
        checkpoint, device=args.device, dtype=args.dtype, resident=args.resident, budget=args.budget, quant=args.quant
    )
    say = lambda text: print(f"edgecm: {text}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"dense answers to {len(prompts)} {calibration_set.description} (up to {args.max_new_tokens} tokens each)")
    refs = dense_references(engine, prompts, builder.stop_token_ids, args.max_new_tokens)
    base = SparsitySettings() if args.dense_above is None else SparsitySettings(dense_above=args.dense_above)
    record = {"model": model_name, "edgecm_version": __version__, "target_top1_agreement": target,
              "calibration_set": {**calibration_set.to_json(), "max_new_tokens": args.max_new_tokens}}

    has_images = any(p.image_positions.numel() for p in prompts)
    tokens = replace(base, tokens=TokenRule("all"))
    if has_images:
        todo = [c for c in candidates(num_layers, grid) if ranks is None or c.rank in ranks or c.reference]
        say(f"token pruning: {len(todo)} candidates (rankings x prune layers x budgets, random as a reference), "
            f"each from its prune layer on")
        results, seconds = sweep(engine, refs, base, grid, only=todo,
                                 on_prompt=lambda i, n: say(f"  prompt {i} of {n} measured"))
        chosen = choose(results, target)
        record.update(token_candidates=[r.to_json() for r in results], token_sweep_seconds=seconds,
                      token_choice=None if chosen is None else chosen.to_json())
        if chosen is None:
            best = max((r for r in results if not r.candidate.reference), key=lambda r: r.top1_agreement)
            say(f"no token pruning reached agreement {target} (best: {best.candidate.label}, "
                f"{best.top1_agreement:.3f}); every image token is kept")
            record["tokens"] = {"tokens": "all"}
        else:
            tokens = chosen.candidate.settings(base)
            say(f"tokens: {chosen.candidate.label}, agreement {chosen.top1_agreement:.3f}, exact answers "
                f"{chosen.exact_agreement:.0%}, prefill {chosen.relative_prefill_flops:.0%} of dense FLOPs "
                f"({seconds:.0f} s for the sweep)")
            record["tokens"] = {"token_rank": tokens.token_rank, "tokens": str(tokens.tokens),
                                "prune_layer": tokens.prune_layer, "sparsevlm_k": tokens.sparsevlm_k}
        if args.plot:
            from edgecm_cli.calibration_plot import draw

            say(f"wrote {draw(results, chosen, target, Path(args.plot), model_name)}")
    else:
        record["tokens"] = None  # a text-only set says nothing about image tokens

    def report(result) -> None:
        mark = "meets" if result.top1_agreement >= target else "below"
        say(f"neurons {result.setting:<10} agreement {result.top1_agreement:.3f} ({mark} {target}) | "
            f"KL {result.mean_kl:.3f} | neurons {result.neuron_fraction:.0%}")

    settings, result, measured = search(engine, refs, target, tokens, on_result=report)
    record.update(neurons=str(settings.neurons), dense_above=settings.dense_above,
                  achieved=None if result is None else result.to_json(), measured=[m.to_json() for m in measured])
    path = write_record(checkpoint.path, record)
    if args.json:
        print(path.read_text())
        return 0
    from edgecm.calibration_record import load_record

    calibration, _ = load_record(checkpoint.path)
    print(f"{calibration.describe()}. Wrote {path}")
    return 0
