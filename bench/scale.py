"""Real scale on a CPU host: a LLaVA-1.5-7B-shaped checkpoint under host-memory budgets, beside accelerate.

    python3 bench/scale.py --scratch /work/scale [--budgets 5,8,12] [--dtypes float32,bfloat16]
                           [--variants dense,corematching,sparsevlm] [--accelerate 5,8,12] [--new-tokens 3]

The checkpoint (random float16 weights in the llava-hf layout, about 13 GiB)
is written once into --scratch by edgecm.synthetic, tensor by tensor, so it
never sits whole in memory. The prompt is LLaVA-1.5's layout: BOS, 8 words,
576 image tokens and 32 more words (617 tokens), a seeded random 336 px image.

Every run is a fresh process. Peak RSS is the kernel's high-water mark of
that process (VmHWM: anonymous and mapped file pages, from start to end, load
included), against the budget. The files are read once before the first run,
so every run starts from the same page cache. edgecm runs under ``Engine(...,
device="cpu", budget=B, dtype=D)``:

- dense: every layer streamed as the plan says;
- corematching: 64 image tokens kept (random weights make the knee
  meaningless), the paper's neuron budget beta 0.4;
- sparsevlm: the same budget, tokens chosen by SparseVLM's stages.

Beside it, transformers with accelerate's offload under the same host
budget: ``from_pretrained(dtype=float16, device_map="auto", max_memory={"cpu":
B})``, the rest left on disk in an offload folder; prefill is generate's time
to its first token, decode the tokens after.

Bytes read per token are what one decode step reads from files (streamed
layers and spilled slices); weight bytes per token are every weight byte a step
touches, and decode GB/s is that times tok/s, against the profile's memory
bandwidth. Writes --out.json and --out.md with the CPU and its flags.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GiB = 1024**3
SEED = 0
WORDS = 40
KEPT_TOKENS = 64


def checkpoint_dir(scratch: Path, shape: str) -> Path:
    """The random checkpoint of ``shape``, written once (a marker file says it is complete)."""
    from edgecm.synthetic import published_shape, write_random_llava

    out = scratch / f"random-{shape}"
    done = out / "edgecm-scale-complete"
    if done.is_file():
        return out
    text, vision = published_shape(shape)
    print(f"writing {out} (tensor by tensor)", file=sys.stderr)
    started = time.perf_counter()
    write_random_llava(out, text, vision, dtype=torch.float16, seed=SEED)
    done.write_text(f"{time.perf_counter() - started:.0f} s\n")
    return out


def inputs(model: Path):
    """The same 617-token prompt in every process: ids around 576 image placeholders, and a seeded image."""
    config = json.loads((model / "config.json").read_text())
    vision = config["vision_config"]
    image_token = config.get("image_token_id", config.get("image_token_index"))
    generator = torch.Generator().manual_seed(SEED)
    words = torch.randint(4, 400, (WORDS,), generator=generator).tolist()  # the tokenizer's own ids
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    ids = torch.tensor([[1, *words[:8], *[image_token] * tokens, *words[8:]]])
    pixels = torch.randn(1, 3, vision["image_size"], vision["image_size"], generator=generator)
    return ids, pixels, image_token


def high_water_mark() -> int:
    """The kernel's peak resident set of this process, in bytes (Linux)."""
    text = Path("/proc/self/status").read_text()
    return int(text.split("VmHWM:")[1].split()[0]) * 1024


def run_edgecm(spec: dict) -> dict:
    from edgecm.checkpoint import open_checkpoint
    from edgecm.prompt import Prompt
    from edgecm.sparsity import DENSE, NeuronBudget, SparsitySettings, TokenRule
    from runtime.engine import Engine, GenerationSettings

    ids, pixels, image_token = inputs(Path(spec["model"]))
    sparsity = {
        "dense": DENSE,
        "corematching": SparsitySettings(tokens=TokenRule("count", KEPT_TOKENS), neurons=NeuronBudget("beta", 0.4)),
        "sparsevlm": SparsitySettings(tokens=TokenRule("count", KEPT_TOKENS), neurons=NeuronBudget("beta", 0.4),
                                      token_rank="sparsevlm"),
    }[spec["variant"]]
    checkpoint = open_checkpoint(spec["model"])
    prompt = Prompt(input_ids=ids, text="", pixel_values=pixels, image_grid_thw=None, image_token_id=image_token)
    engine = Engine(checkpoint, device="cpu", budget=spec["budget"], dtype=spec["dtype"])
    settings = GenerationSettings(max_new_tokens=spec["new_tokens"], stop_at_eos=False)
    result = engine.generate(prompt, settings, sparsity=sparsity)
    t, m = result.timings, result.memory
    steps = len(result.token_ids) - 1
    return {
        "vision_s": t.vision_s,
        "prefill_s": t.first_token_s,
        "decode_tokens_per_s": t.decode_tokens_per_s,
        "peak_rss_bytes": high_water_mark(),
        "budget_bytes": engine.budget,
        "plan": m.plan,
        "plan_peak_bytes": m.plan_peak_bytes,
        "bytes_read_per_token": m.decode_weights_read_bytes / steps if steps else 0,
        "weight_bytes_per_token": m.decode_weight_bytes_per_token,
        "decode_set_bytes": m.decode_set_bytes,
        "spilled_bytes": m.decode_set_host_bytes,
        "kept_image_tokens": result.kept_image_tokens,
        "prompt_tokens": result.prompt_tokens,
    }


def run_accelerate(spec: dict) -> dict:
    from transformers import LlavaForConditionalGeneration, LogitsProcessor, LogitsProcessorList
    from transformers.utils import logging as hf_logging

    from runtime.planner import parse_bytes

    hf_logging.set_verbosity_error()
    ids, pixels, _ = inputs(Path(spec["model"]))
    offload = Path(spec["scratch"]) / f"offload-{os.getpid()}"
    dtype = getattr(torch, spec["dtype"])
    net = LlavaForConditionalGeneration.from_pretrained(
        spec["model"], dtype=dtype, device_map="auto", max_memory={"cpu": parse_bytes(spec["budget"])},
        offload_folder=str(offload),
    ).eval()
    stamps: list[float] = []

    class Clock(LogitsProcessor):  # called once per generated token, when its logits are ready
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    started = time.perf_counter()
    with torch.inference_mode():
        net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels.to(dtype),
                     max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"], do_sample=False,
                     logits_processor=LogitsProcessorList([Clock()]))
    finished = time.perf_counter()
    decode_s = finished - stamps[0]
    placed = sorted({str(d) for d in getattr(net, "hf_device_map", {}).values()})
    return {
        "vision_s": None,
        "prefill_s": stamps[0] - started,
        "decode_tokens_per_s": (spec["new_tokens"] - 1) / decode_s,
        "peak_rss_bytes": high_water_mark(),
        "budget_bytes": parse_bytes(spec["budget"]),
        "plan": f"device_map auto over {', '.join(placed)}",
        "prompt_tokens": int(ids.shape[1]),
    }


def run_in_process(spec: dict) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    label = f"{spec['engine']} {spec['variant']} {spec['dtype']} {spec['budget']}"
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"  {label}: failed ({tail})", file=sys.stderr)
        return {**spec, "error": tail}
    row = {**spec, **json.loads(lines[0][len("RESULT "):]), "wall_s": time.perf_counter() - started}
    print(f"  {label}: prefill {row['prefill_s']:.1f} s, decode {row['decode_tokens_per_s']:.3f} tok/s, "
          f"peak {row['peak_rss_bytes'] / GiB:.2f} GiB of {row['budget_bytes'] / GiB:.2f} ({row['wall_s']:.0f} s)",
          file=sys.stderr)
    return row


def warm_page_cache(model: Path) -> None:
    for shard in sorted(model.glob("*.safetensors")):
        with open(shard, "rb", buffering=0) as fh:
            while fh.read(64 * 2**20):
                pass


def cpu_flags() -> list[str]:
    """The flags that decide this bench's matrix products, as runtime.cpu_dtype reads them."""
    from runtime.cpu_dtype import cpu_flags as all_flags

    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "avx512_vnni")
    flags = all_flags()
    return [f for f in wanted if f in flags]


def markdown(report: dict) -> str:
    lines = [f"# edgecm at LLaVA-1.5-7B scale on {report['machine']}", "",
             f"`{report['command']}`; torch {report['torch']}, {report['threads']} threads, CPU flags "
             f"{', '.join(report['cpu_flags']) or 'none of note'}; {report['prompt_tokens']} prompt tokens (576 "
             f"image), {report['new_tokens']} new tokens, one fresh process per row. Peak RSS is the process's "
             f"high-water mark (VmHWM) against the budget; read/token is what a decode step reads from files, "
             f"weights/token every weight byte it touches; decode GB/s is weights/token x tok/s, "
             f"against {report['peak_bandwidth_gbs']} GB/s memory bandwidth ({report['profile']}).", "",
             "| engine | variant | dtype | budget GiB | prefill s | decode tok/s | peak RSS GiB | peak / budget | "
             "read/token GB | weights/token GB | decode GB/s | % of peak bw | plan |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        head = f"| {r['engine']} | {r['variant']} | {r['dtype']} | {r['budget']} "
        if "error" in r:
            lines.append(head + f"| failed: {r['error']} |||||||||")
            continue
        weights = r.get("weight_bytes_per_token")
        gbs = weights * r["decode_tokens_per_s"] / 1e9 if weights else None
        share = f"{gbs / report['peak_bandwidth_gbs']:.0%}" if gbs and report["peak_bandwidth_gbs"] else "n/a"
        read = r.get("bytes_read_per_token")
        lines.append(
            head + f"| {r['prefill_s']:.1f} | {r['decode_tokens_per_s']:.3f} | {r['peak_rss_bytes'] / GiB:.2f} | "
            f"{r['peak_rss_bytes'] / r['budget_bytes']:.2f} | {'n/a' if read is None else f'{read / 1e9:.2f}'} | "
            f"{'n/a' if weights is None else f'{weights / 1e9:.2f}'} | {'n/a' if gbs is None else f'{gbs:.1f}'} | "
            f"{share} | {r['plan']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scratch", default="/tmp/edgecm-scale", help="where the checkpoint is written (once)")
    ap.add_argument("--shape", default="llava-1.5-7b")
    ap.add_argument("--budgets", default="5,8,12", help="GiB, comma-separated")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--variants", default="dense,corematching,sparsevlm")
    ap.add_argument("--accelerate", default="5,8,12", help="budgets (GiB) for transformers + accelerate; '' for none")
    ap.add_argument("--accelerate-dtype", default="float16")
    ap.add_argument("--new-tokens", type=int, default=3)
    ap.add_argument("--profile", default="dev-x86-2core-cpu", help="whose memory bandwidth the decode is set against")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale-llava-7b-x86-64-cpu-2-threads"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        row = run_edgecm(spec) if spec["engine"] == "edgecm" else run_accelerate(spec)
        print("RESULT " + json.dumps(row))
        return
    from runtime.planner import load_profile

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    model = checkpoint_dir(scratch, args.shape)
    warm_page_cache(model)
    base = {"model": str(model), "scratch": str(scratch), "new_tokens": args.new_tokens}
    specs = []
    for budget in [b for b in args.budgets.split(",") if b]:
        for dtype in args.dtypes.split(","):
            for variant in args.variants.split(","):
                specs.append({**base, "engine": "edgecm", "variant": variant, "dtype": dtype, "budget": f"{budget}GiB"})
        if budget in args.accelerate.split(","):
            specs.append({**base, "engine": "transformers + accelerate", "variant": "dense",
                          "dtype": args.accelerate_dtype, "budget": f"{budget}GiB"})
    rows = [run_in_process(spec) for spec in specs]
    profile = load_profile(args.profile)
    ok = [r for r in rows if "error" not in r]
    report = {
        "command": "python3 bench/scale.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores)",
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "profile": profile.name,
        "peak_bandwidth_gbs": profile.memory_bandwidth_gbs,
        "prompt_tokens": ok[0]["prompt_tokens"] if ok else None,
        "new_tokens": args.new_tokens,
        "checkpoint_bytes": sum(f.stat().st_size for f in model.glob("*.safetensors")),
        "rows": rows,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
