"""Captioning throughput against batch size: edgecm's batched generation beside transformers' batched generate.

    python3 bench/throughput.py [--device cpu] [--threads 2] [--images 16] [--batches 1,2,4,8,16]

Two models, both built on the machine:
- the demo (SmolLM2-135M + the trained shapes tower; 196 image tokens), on
  held-out scenes, resident;
- a small LLaVA shape with random float16 weights (576 image tokens, as in
  bench/runtime.py), each batch size under the smallest budget the planner
  accepts for it, so every layer streams during prefill and the decode set
  streams too: the regime where one weight fetch per step serving many
  sequences matters most.

With ``--device cuda`` the LLaVA model is the LLaVA-1.5-7B shape under
``--budget`` (12GiB by default, a Titan Xp's), against transformers with
accelerate offloading what does not fit; a batch the budget cannot hold is
refused by the planner and shows as a failed row.

Every batch size captions the same --images images with --new-tokens forced
tokens each (EOS is ignored on both sides, so the work is equal), dense, and
reports images/s and generated tokens/s over the whole run, vision towers and
prefill included. transformers runs the same checkpoint resident with
``generate`` on batches built the way its processor builds them (left
padding, though one question to images of one size needs none), each run in
a fresh process, interleaved batch size by batch size since the machine's
speed drifts. Writes throughput-<device>.json and .md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "Write a short caption for this image."


def demo_images(count: int):
    from edgecm import scenes

    return [scenes.make_scene(scenes.HELD_OUT_SEED_START + 50_000 + i).render() for i in range(count)]


def bench_runtime():
    """bench/runtime.py as a module (its name is taken by the runtime package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_runtime", ROOT / "bench" / "runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def llava_config(kind: str) -> dict:
    """bench/runtime.py's small LLaVA on CPU; the LLaVA-1.5-7B shape (float16) for the GPU variant."""
    if kind == "llava-7b":
        config = json.loads((ROOT / "edgecm" / "data" / "shapes" / "llava-1.5-7b" / "config.json").read_text())
        config["torch_dtype"] = "float16"
        return config
    return bench_runtime().SMALL_LLAVA


def random_llava(kind: str, scratch: Path, device: str) -> Path:
    """A LLaVA checkpoint of ``kind``'s shape with random float16 weights, written once into ``scratch``."""
    # The 7B shape goes where bench/runtime.py and bench/gpu_check.py write it, so one copy serves all three.
    folder = "llava-1.5-7b" if kind == "llava-7b" else kind
    return bench_runtime().make_random_vlm(llava_config(kind), scratch / folder, device)


def llava_prompts(config: dict, count: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One token sequence (a question around 576 image placeholders) and ``count`` random images for it:
    a caption job asks one question of every image, so every prompt has the same length."""
    ids, first = bench_runtime().vlm_inputs(config)
    gen = torch.Generator().manual_seed(1)
    pixels = [first["pixel_values"]] + [torch.randn(first["pixel_values"].shape, generator=gen)
                                        for _ in range(count - 1)]
    return ids, pixels


# -- one side, one batch size ----------------------------------------------------------------------


def edgecm_prompts(checkpoint, kind: str, count: int) -> list:
    from edgecm.prompt import Prompt, PromptBuilder

    if kind == "demo":
        builder = PromptBuilder(checkpoint)
        return [builder.build(PROMPT, image) for image in demo_images(count)]
    config = llava_config(kind)
    ids, pixels = llava_prompts(config, count)
    return [Prompt(input_ids=ids, pixel_values=p, text="", image_token_id=config["image_token_index"]) for p in pixels]


def run_edgecm(model: Path, kind: str, batch: int, args, budget: str | None) -> dict:
    from edgecm.checkpoint import open_checkpoint
    from edgecm.sparsity import DENSE
    from runtime.batch import generate_batch
    from runtime.engine import Engine, GenerationSettings

    checkpoint = open_checkpoint(model)
    engine = Engine(checkpoint, device=args.device, budget=budget, dtype=args.dtype)
    settings = GenerationSettings(max_new_tokens=args.new_tokens, stop_at_eos=False)
    prompts = edgecm_prompts(checkpoint, kind, args.images)
    generate_batch(engine, prompts[:batch], GenerationSettings(max_new_tokens=2, stop_at_eos=False),
                   sparsity=DENSE)  # warm-up
    started = time.perf_counter()
    tokens = prefill_s = decode_s = decode_steps = 0
    for i in range(0, len(prompts), batch):
        results = generate_batch(engine, prompts[i : i + batch], settings, sparsity=DENSE)
        tokens += sum(len(r.token_ids) for r in results)
        timings = results[0].timings  # one batch, one set of timings
        prefill_s += timings.time_to_answer_s
        decode_s += timings.decode_s
        decode_steps += max(len(r.token_ids) for r in results) - 1  # the first token comes out of prefill
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": tokens, "plan": engine.last_plan.name,
            "decode_weights_read_bytes": results[0].memory.decode_weights_read_bytes,
            "prefill_s": prefill_s, "decode_s": decode_s, "decode_steps": decode_steps}


def transformers_inputs(model: Path, kind: str, count: int) -> list[dict]:
    """Model inputs per image, as transformers' processor gives them (left padding; no padding occurs, since
    one question to images of one size gives prompts of one length)."""
    if kind == "demo":
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(model))
        processor.tokenizer.padding_side = "left"
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
        return [dict(processor(images=[image], text=[text], return_tensors="pt")) for image in demo_images(count)]
    ids, pixels = llava_prompts(llava_config(kind), count)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": p} for p in pixels]


def run_transformers(model: Path, kind: str, batch: int, args) -> dict:
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dtype = torch.float16 if args.device == "cuda" else getattr(torch, args.dtype)  # on CPU: edgecm's dtype
    if kind == "llava-7b":  # 7B in float16 does not fit 12 GiB: accelerate offloads what does not fit
        from runtime.planner import GiB

        net = LlavaForConditionalGeneration.from_pretrained(
            str(model), dtype=dtype, device_map="auto", max_memory={0: 10 * GiB, "cpu": 200 * GiB}).eval()
    else:
        net = LlavaForConditionalGeneration.from_pretrained(str(model), dtype=dtype).to(args.device).eval()
    first = next(net.parameters()).device
    inputs = transformers_inputs(model, kind, args.images)
    eos = net.generation_config.eos_token_id or net.config.get_text_config().eos_token_id
    pad = eos[0] if isinstance(eos, (list, tuple)) else eos

    def generate(chunk: list[dict], n: int) -> int:
        batched = {key: torch.cat([c[key] for c in chunk]).to(first) for key in chunk[0]}
        batched["pixel_values"] = batched["pixel_values"].to(dtype)
        with torch.inference_mode():
            out = net.generate(**batched, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=pad)
        return (out.shape[1] - batched["input_ids"].shape[1]) * len(chunk)

    generate(inputs[:batch], 2)  # warm-up
    started = time.perf_counter()
    tokens = sum(generate(inputs[i : i + batch], args.new_tokens) for i in range(0, len(inputs), batch))
    plan = "accelerate offload, 10 GiB on the GPU" if kind == "llava-7b" else "resident"
    return {"seconds": time.perf_counter() - started, "tokens": tokens, "plan": plan}


def worker(args) -> None:
    spec = json.loads(args.worker)
    torch.set_num_threads(args.threads)
    if spec["side"] == "edgecm":
        row = run_edgecm(Path(spec["model"]), spec["model_kind"], spec["batch"], args, spec["budget"])
    else:
        row = run_transformers(Path(spec["model"]), spec["model_kind"], spec["batch"], args)
    print("RESULT " + json.dumps(row))


def run_in_process(spec: dict, args) -> dict:
    import subprocess

    command = [sys.executable, __file__, "--device", args.device, "--threads", str(args.threads), "--images",
               str(args.images), "--new-tokens", str(args.new_tokens), "--worker", json.dumps(spec),
               *(["--dtype", args.dtype] if args.dtype else [])]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"  {spec['side']} batch {spec['batch']}: failed ({tail})", file=sys.stderr)
        return {**spec, "error": tail}
    row = {**spec, **json.loads(lines[0][len("RESULT "):])}
    row["images_per_s"] = args.images / row["seconds"]
    row["tokens_per_s"] = row["tokens"] / row["seconds"]
    print(f"  {spec['side']} batch {spec['batch']}: {row['images_per_s']:.2f} images/s, "
          f"{row['tokens_per_s']:.1f} tokens/s ({row['seconds']:.0f} s, {row['plan']})", file=sys.stderr)
    return row


# -- the report ------------------------------------------------------------------------------------


def split_cells(row: dict | None, batch_one: dict | None, images: int) -> list[str]:
    """edgecm's vision + prefill seconds per image, decode milliseconds per step, and the gain ceiling."""
    if not row or "error" in row or "prefill_s" not in row:
        return ["-", "-", "-"]
    prefill = row["prefill_s"] / images
    step = 1000 * row["decode_s"] / row["decode_steps"] if row["decode_steps"] else 0.0
    ceiling = "-"
    if batch_one and "error" not in batch_one:
        ceiling = f"{batch_one['seconds'] / images / prefill:.2f}"
    return [f"{prefill:.3f}", f"{step:.0f}", ceiling]


def markdown(report: dict) -> str:
    lines = [f"# Captioning throughput on {report['device']}", "",
             f"`{report['command']}`; torch {report['torch']}, {report['threads']} threads, "
             f"{report.get('dtype', 'float32')}; {report['images']} "
             f"images per batch size, {report['new_tokens']} generated tokens each (EOS ignored), dense, greedy. "
             f"images/s and tokens/s are over the whole run: vision tower, prefill and decode. transformers runs the "
             f"same checkpoint resident with batched `generate` (left padding; one question to images of one size "
             f"gives prompts of one length, so no row is padded), each run in a fresh process.", "",
             "edgecm's time splits into vision tower + prefill per image, mostly compute over the prompt's tokens, "
             "so batching saves little of it, and decode per step, which reads the weights once for the whole batch. The ceiling "
             "is edgecm's batch-1 time per image over its vision + prefill time per image at that batch size: the "
             "gain over batch 1 that batching could give if decode cost nothing.", ""]
    for model in report["models"]:
        lines += [f"## {model['name']}", "", model["description"], "",
                  "| batch | edgecm images/s | edgecm tokens/s | edgecm x batch 1 | edgecm vision + prefill s/image | "
                  "edgecm decode ms/step | ceiling x batch 1 | edgecm plan | "
                  "transformers images/s | transformers tokens/s | transformers x batch 1 | edgecm / transformers |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = {(r["side"], r["batch"]): r for r in model["rows"]}
        base = {side: rows.get((side, 1)) for side in ("edgecm", "transformers")}
        for batch in model["batches"]:
            ours, theirs = rows.get(("edgecm", batch)), rows.get(("transformers", batch))

            def cells(row, side):
                if row is None:
                    return ["-", "-", "-"]
                if "error" in row:
                    return [f"failed: {row['error']}", "", ""]
                gain = row["images_per_s"] / base[side]["images_per_s"] if base[side] and "error" not in base[side] else 0
                return [f"{row['images_per_s']:.2f}", f"{row['tokens_per_s']:.1f}", f"{gain:.2f}"]

            ratio = "-"
            if ours and theirs and "error" not in ours and "error" not in theirs:
                ratio = f"{ours['images_per_s'] / theirs['images_per_s']:.2f}"
            plan = ours.get("plan", "") if ours else ""
            e, t = cells(ours, "edgecm"), cells(theirs, "transformers")
            split = split_cells(ours, base["edgecm"], report["images"])
            lines.append(f"| {batch} | {e[0]} | {e[1]} | {e[2]} | {split[0]} | {split[1]} | {split[2]} | {plan} | "
                         f"{t[0]} | {t[1]} | {t[2]} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--only", choices=("demo", "llava-streamed", "llava-7b"), help="run one model only")
    ap.add_argument("--budget", default="12GiB", help="the GPU variant's budget (LLaVA-1.5-7B shape)")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/edgecm-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"),
                    help="CPU compute dtype of both sides (default: the one edgecm measures for this CPU)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.device == "cpu" and args.dtype is None:
        from runtime.cpu_dtype import cpu_dtype

        args.dtype = cpu_dtype().chosen  # resolved once here, so every worker computes in the same dtype

    from edgecm.checkpoint import open_checkpoint
    from edgecm.demo import demo_checkpoint_dir
    from edgecm.sparsity import DENSE
    from runtime.engine import Engine
    from runtime.planner import format_min_budget

    batches = [int(b) for b in args.batches.split(",")]
    models = []
    todo = []
    if args.only in (None, "demo"):
        todo.append(("demo", demo_checkpoint_dir(), {},
                     "SmolLM2-135M-Instruct + the trained shapes tower (196 image tokens per image), resident"))
    if args.device == "cuda" and args.only in (None, "llava-7b"):
        model = random_llava("llava-7b", args.scratch, args.device)
        todo.append(("llava-7b", model, {b: args.budget for b in batches},
                     f"LLaVA-1.5-7B shape (576 image tokens), random float16 weights, edgecm under --budget "
                     f"{args.budget}; transformers with accelerate offload (10 GiB on the GPU, the rest in host memory)"))
    if args.device == "cpu" and args.only in (None, "llava-streamed"):
        model = random_llava("llava-streamed", args.scratch, args.device)
        checkpoint = open_checkpoint(model)
        prompt = edgecm_prompts(checkpoint, "llava-streamed", 1)[0]
        engine = Engine(checkpoint, device=args.device, dtype=args.dtype)
        # Each batch size runs under the smallest budget the planner accepts for it, so every one streams.
        budgets = {b: str(engine.plan_for(prompt.num_tokens, int(prompt.image_positions.numel()), args.new_tokens,
                                          DENSE, batch=b).min_budget) for b in batches}
        todo.append(("llava-streamed", model, budgets,
                     "small LLaVA (1024 wide, 12 layers; 576 image tokens), random float16 weights; each batch size "
                     "under the smallest budget the planner accepts for it ("
                     + ", ".join(f"{b}: {format_min_budget(int(v))}" for b, v in budgets.items())
                     + "), so every layer streams in prefill and the decode set streams in decode"))
    for kind, model, budget, description in todo:
        print(f"{kind}:", file=sys.stderr)
        rows = []
        for batch in batches:
            for side in ("edgecm", "transformers"):
                spec = {"side": side, "batch": batch, "model": str(model), "model_kind": kind,
                        "budget": budget[batch] if budget and side == "edgecm" else None}
                rows.append(run_in_process(spec, args))
        models.append({"name": kind, "description": description, "batches": batches, "rows": rows})
    name = bench_runtime().device_name(args.device)  # the same device naming as runtime-*.json
    report = {"device": name, "torch": torch.__version__, "threads": args.threads, "dtype": args.dtype or "float16",
              "images": args.images,
              "new_tokens": args.new_tokens, "command": "python3 bench/throughput.py " + " ".join(sys.argv[1:]),
              "models": models}
    slug = re.sub(r"[^a-z0-9]+", "-", (name + (f" {args.only}" if args.only else "")).lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"throughput-{slug}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"throughput-{slug}.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
