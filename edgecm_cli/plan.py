"""``edgecm plan``: what a model needs under a memory budget on a device, phase by phase."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from edgecm.errors import EdgecmError

SHAPES_DIR = Path(__file__).resolve().parent.parent / "edgecm" / "data" / "shapes"
QUESTION_TOKENS = 44  # LLaVA-1.5's 620-token planning prompt less its 576 image tokens


def shapes() -> list[str]:
    return sorted(p.name for p in SHAPES_DIR.iterdir() if (p / "config.json").is_file())


def _config(args: argparse.Namespace):
    from edgecm.checkpoint import open_checkpoint
    from edgecm.config import load_model_config
    from edgecm_cli import open_model

    if args.shape:
        if args.shape not in shapes():
            raise EdgecmError(f"--shape {args.shape}: unknown; use one of {', '.join(shapes())}, or --model DIR")
        return load_model_config(SHAPES_DIR / args.shape), args.shape
    if args.model and Path(args.model).is_dir() and not any(Path(args.model).glob("*.safetensors")):
        return load_model_config(Path(args.model)), args.model  # a config.json alone is enough to plan
    if args.model:
        return open_checkpoint(args.model).config, args.model
    checkpoint, name = open_model(None)
    return checkpoint.config, name


def cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from edgecm_cli import format_bytes
    from runtime.planner import (
        Workload, format_min_budget, largest_batch, load_profile, make_plan, model_sizes, parse_bytes,
    )

    budget = parse_bytes(args.budget)
    profile = load_profile(args.profile)
    if not 0 < args.neuron_fraction <= 1:
        raise EdgecmError(f"--neuron-fraction {args.neuron_fraction}: must be in (0, 1]")
    for flag, value, least in (("--prompt-tokens", args.prompt_tokens, 1), ("--new-tokens", args.new_tokens, 1),
                               ("--kept-tokens", args.kept_tokens, 0)):
        if value is not None and value < least:
            raise EdgecmError(f"{flag} {value}: must be at least {least}")
    config, name = _config(args)
    weight_dtype = args.weights or profile.default_dtype
    if weight_dtype == "bfloat16" and not profile.supports_bf16:
        raise EdgecmError(f"--weights bfloat16: {profile.name} has no bfloat16; use float16 or nf4")
    quantised = weight_dtype in ("nf4", "int8")  # as --quant: resident weights quantised, streamed ones float16
    compute = "float32" if weight_dtype == "float32" else ("float16" if quantised else weight_dtype)
    sizes = model_sizes(config, compute, compute)
    prompt_tokens = args.prompt_tokens
    if prompt_tokens is None:  # one image at the size the family plans for, plus a question
        prompt_tokens = sizes.image_tokens + QUESTION_TOKENS if sizes.image_tokens else Workload.prompt_tokens
    if prompt_tokens < sizes.image_tokens:
        raise EdgecmError(
            f"--prompt-tokens {prompt_tokens}: below the {sizes.image_tokens} tokens of the image the plan assumes; "
            f"raise it or leave it out"
        )
    workload = Workload(
        prompt_tokens=prompt_tokens,
        new_tokens=args.new_tokens,
        kept_image_tokens=args.kept_tokens,
        neuron_fraction=args.neuron_fraction,
        compute_bytes=4 if compute == "float32" else 2,
    )
    resident = model_sizes(config, weight_dtype, compute)
    biggest = largest_batch(sizes, profile, budget, workload, resident)
    batch = biggest if args.batch_size == "auto" else args.batch_size
    plan = make_plan(sizes, profile, budget, replace(workload, batch=max(batch, 1)), resident=resident)
    if args.json:
        print(json.dumps({"model": name, "profile": profile.name, "weights": weight_dtype, "budget": budget,
                          "usable": plan.usable, "min_budget": plan.min_budget, "decode_resident": plan.decode_resident,
                          "layers_resident": plan.layers_resident,
                          "phases": plan.phases, "peak": plan.peak_bytes, "layer_bytes": sizes.layer,
                          "kv_bytes_per_token": sizes.kv_per_token, "batch": batch, "largest_batch": biggest}))
        return 0
    console = Console()
    of = f", batch of {batch}" if batch > 1 else ""
    table = Table(title=f"{name} on {profile.name}, budget {format_bytes(budget)} ({weight_dtype} weights{of})")
    table.add_column("phase")
    table.add_column("resident")
    table.add_column("bytes", justify="right")
    for phase, items in plan.phases.items():
        for i, (item, size) in enumerate(items.items()):
            table.add_row(phase if i == 0 else "", item, format_bytes(size))
        table.add_row("", f"[bold]{phase} peak[/]", f"[bold]{format_bytes(plan.peak(phase))}[/]", end_section=True)
    console.print(table)
    layers = sizes.num_layers
    console.print(
        f"streams {layers} layers of {format_bytes(sizes.layer)} in prefill; KV {format_bytes(sizes.kv_per_token)} per token; "
        f"usable {format_bytes(plan.usable)} after {format_bytes(profile.reserved_bytes)} reserved; "
        f"smallest workable budget {format_min_budget(plan.min_budget)}"
    )
    if plan.layers_resident:
        console.print("the whole model fits: every layer stays after its first use, later prompts read nothing")
    elif plan.decode_resident:
        console.print("decode set resident: decode moves no weights across PCIe")
    else:
        console.print("[yellow]decode set does not fit: compact FFN slices stream every token[/]")
    console.print(f"largest batch that keeps the plan of one sequence: {biggest} (KV cache and activations are per "
                  f"sequence; the weights are read once per step for all)")
    return 0
