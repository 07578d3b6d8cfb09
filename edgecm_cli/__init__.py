"""The ``edgecm`` command line.

All subcommands draw their flags from one registry (``_flag_registry``), so a
flag is spelled, documented and defaulted once; ``_commands`` says which
command takes which flags. Each command lives in its own module. Generated text goes to stdout, stats
and notices to stderr. A problem with the user's input is one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from edgecm_cli.checks import (  # noqa: F401 -- the commands import these from edgecm_cli
    batch_size_flag, check_generation_flags, check_model_takes_inputs, check_pixel_flags, finite_float,
    positive_int, refuse_idle_sparsevlm_flags,
)

EXIT_USAGE = 2
EXIT_FAILURE = 1  # the environment failed (a full disk, an unwritable stdout), not the user's input
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `cat` in the same place


def _defaults():
    # Defaults come from the library's dataclasses, the one source for them.
    from edgecm.sampling import SamplingSettings
    from edgecm.sparsity import SparsitySettings
    from runtime.engine import GenerationSettings

    return GenerationSettings(), SamplingSettings(), SparsitySettings()


def _flag_registry() -> dict[str, tuple[tuple[str, ...], dict[str, Any]]]:
    from edgecm.calibration import DEFAULT_TARGET
    from edgecm.quant import QUANT_KINDS
    from edgecm.sparsity import TOKEN_RANKS

    from edgecm.video import VideoOptions
    from edgecm_cli.plan import QUESTION_TOKENS
    from edgecm_cli.ray_address import RAY_CONNECT_TIMEOUT_S
    from runtime.captioning import AUTO_BATCH_LIMIT, CAPTION_PROMPT, Captioner
    from runtime.engine import DEFAULT_DEVICE
    from runtime.planner import Workload

    gen, sampling, sparse = _defaults()
    video, workload = VideoOptions(), Workload()
    return {
        "model": (
            ("--model",),
            dict(
                metavar="PATH",
                help="checkpoint directory (llava-hf, Qwen2.5-VL or Llama, safetensors) or a LLaMA .gguf file; "
                "default: the embedded demo model, built on first use",
            ),
        ),
        "image": (("--image",), dict(metavar="PATH", help="image file (PNG, JPEG, WebP, ...); omit for a text-only prompt")),
        "video": (
            ("--video",),
            dict(
                metavar="PATH",
                help="a video file (MP4, MKV, WebM, AVI, MOV...) or a folder of its frames, read in name order "
                "(Qwen2.5-VL)",
            ),
        ),
        "batch_size": (
            ("--batch-size",),
            dict(
                type=batch_size_flag, default=Captioner.batch_size, metavar="N|auto",
                help="sequences run together (caption: images); auto is the largest batch that keeps the memory "
                f"plan of one sequence (caption caps it at {AUTO_BATCH_LIMIT}) (default: %(default)s)",
            ),
        ),
        "ray": (
            ("--ray",),
            dict(
                nargs="?", const="local", default=None, metavar="auto|ADDRESS",
                help="caption on a Ray cluster with Ray Data: auto or ADDRESS joins a running cluster (ray start), "
                "--ray alone starts a local one. Needs pip install 'edgecm[ray]'",
            ),
        ),
        "ray_timeout": (
            ("--ray-timeout",),
            dict(type=float, default=RAY_CONNECT_TIMEOUT_S, metavar="S",
                 help="with --ray ADDRESS: give up joining the cluster after S seconds (default: %(default)s)"),
        ),
        "workers": (
            ("--workers",),
            dict(type=positive_int, default=None, metavar="N",
                 help="with --ray on CPU: N actors sharing the cluster's CPUs (default: one per 2 CPUs); "
                 "on GPU nodes one actor per GPU"),
        ),
        "videos": (
            ("--videos",),
            dict(action="store_true", help="search input folders for video files; a folder holding none is one video, its frames in name "
            "order (Qwen2.5-VL). Video files named directly are always videos"),
        ),
        "fps": (
            ("--fps",),
            dict(type=float, default=video.fps, metavar="F", help="frames per second sampled from a video file, or the rate of a folder of frames (default: %(default)s)"),
        ),
        "max_frames": (
            ("--max-frames",),
            dict(
                type=int, default=video.max_frames, metavar="N",
                help="most frames kept from a video, evenly spaced over it (default: %(default)s)",
            ),
        ),
        "min_pixels": (
            ("--min-pixels",),
            dict(
                type=int, metavar="N",
                help="dynamic-resolution models (Qwen2.5-VL): smallest image area in pixels after resizing "
                "(default: the checkpoint's processor)",
            ),
        ),
        "max_pixels": (
            ("--max-pixels",),
            dict(
                type=int, metavar="N",
                help="dynamic-resolution models (Qwen2.5-VL): largest image area in pixels after resizing; one image "
                "token per 28x28 pixels, so this caps what an image costs (default: the checkpoint's processor)",
            ),
        ),
        "question": (("--question", "-q"), dict(metavar="TEXT", required=True, help="the question or instruction")),
        "device": (("--device",), dict(default=DEFAULT_DEVICE, metavar="cpu|cuda", help="compute device (default: %(default)s)")),
        "dtype": (
            ("--dtype",),
            dict(
                choices=("float32", "float16", "bfloat16"),
                help="compute dtype (default on CPU: bfloat16 where a timed matmul shows this CPU computes it faster, else float32; on CUDA the checkpoint's half type)",
            ),
        ),
        "max_new_tokens": (
            ("--max-new-tokens",),
            dict(type=int, default=gen.max_new_tokens, metavar="N", help="most tokens to generate (default: %(default)s)"),
        ),
        "temperature": (
            ("--temperature",),
            dict(
                type=float, default=sampling.temperature, metavar="T", help="sampling temperature; 0 is greedy (default: %(default)s)"
            ),
        ),
        "top_p": (("--top-p",), dict(type=float, default=sampling.top_p, metavar="P", help="nucleus sampling mass (default: %(default)s)")),
        "seed": (("--seed",), dict(type=int, default=sampling.seed, help="sampling seed (default: %(default)s)")),
        "resident": (
            ("--resident",),
            dict(
                action="store_true",
                help="keep each decoder layer in memory after its first use, so decode reads no weights from "
                "disk (needs memory for the whole model); default: stream layers for every pass",
            ),
        ),
        "run_budget": (
            ("--budget",),
            dict(
                metavar="SIZE",
                help="device memory this run may use, e.g. 12GiB: the planner keeps resident what fits and streams "
                "the rest; on CUDA the allocator enforces it (default: what the device has free)",
            ),
        ),
        "quant": (
            ("--quant",),
            dict(
                choices=QUANT_KINDS,
                help="quantise the weights kept on the device with bitsandbytes: nf4 (any CUDA card, CPU) or int8 "
                "(CUDA compute capability 7.5+, CPU); on CPU both save memory but run slowly (bitsandbytes "
                "dequantises per matmul there); default: none",
            ),
        ),
        "json": (("--json",), dict(action="store_true", help="print one JSON object with text, ids, timings and memory")),
        "plan_json": (
            ("--json",),
            dict(action="store_true", help="print the plan as one JSON object: budget, usable and smallest workable "
                 "bytes, what each phase holds, bytes per layer and per KV token, the batch and the largest one"),
        ),
        "calibrate_json": (
            ("--json",),
            dict(action="store_true", help="print the calibration record written beside the checkpoint, as JSON"),
        ),
        "mode": (
            ("--mode",),
            dict(choices=("dense", "corematching"),
                 help=f"dense: no pruning at all (default: {sparse.mode}, with the checkpoint's calibration)"),
        ),
        "tokens": (
            ("--tokens",),
            dict(
                metavar="RULE",
                help="image tokens kept from --prune-layer on (sparsevlm: after its last stage): knee, all, count:N or "
                f"ratio:R (default: the checkpoint's calibration, else {sparse.tokens})",
            ),
        ),
        "token_rank": (
            ("--token-rank",),
            dict(
                choices=TOKEN_RANKS,
                help="which image tokens: core matching, core-ref (the released code's criterion: overlap with the "
                "first token of the assistant's header), or the FastV / seeded random / SparseVLM baselines at the "
                f"same budget (default: the checkpoint's calibration, else {sparse.token_rank})",
            ),
        ),
        "neurons": (
            ("--neurons",),
            dict(
                metavar="BUDGET",
                help=f"decode FFN neurons per layer: beta:B (the fraction B most frequently core), mass:S (fewest neurons "
                f"carrying share S of the prompt's activation mass) or dense (default: the checkpoint's "
                f"calibration file if present, else {sparse.neurons})",
            ),
        ),
        "rho": (("--rho",), dict(type=float, default=sparse.rho, help="token-wise core fraction (default: %(default)s)")),
        "beta": (
            ("--beta",),
            dict(type=float, default=sparse.beta, help="sentence-wise core fraction in layer K-1, for token matching (default: %(default)s)"),
        ),
        "prune_layer": (
            ("--prune-layer",),
            dict(type=int, metavar="K", help="the first layer without the dropped tokens, as in FastV: layers 0..K-1 "
                 f"see every token and layer K-1 ranks them (default: the checkpoint's calibration, else "
                 f"{sparse.prune_layer})"),
        ),
        "sparsevlm_k": (
            ("--sparsevlm-k",),
            dict(type=int, metavar="K", help="sparsevlm: move its first stage to layer K-1, the later stages keeping "
                 "their distance (default: the checkpoint's calibration, else the published layers scaled by depth)"),
        ),
        "dense_above": (
            ("--dense-above",),
            dict(
                type=float,
                metavar="F",
                help=f"with mass:S, keep a layer dense when it needs more than this fraction of its neurons "
                f"(default: calibration file, else {sparse.dense_above})",
            ),
        ),
        "dense_layers": (
            ("--dense-layers",),
            dict(default=",".join(map(str, sparse.dense_layers)), metavar="LIST",
                 help="layers that always decode dense, e.g. 0,1,29"),
        ),
        "target": (
            ("--target",),
            dict(type=float, default=None, metavar="A",
                 help=f"teacher-forced top-1 agreement to reach (default: {DEFAULT_TARGET})"),
        ),
        "prompts": (
            ("--prompts",),
            dict(metavar="FILE", help="prompt set: JSONL with a 'prompt' field per line, or one prompt per line "
                 "(default: the 33 prompts shipped with edgecm)"),
        ),
        "limit": (("--limit",), dict(type=int, metavar="N", help="use only the first N prompts")),
        "calibration_set": (
            ("--set",),
            dict(metavar="FILE.jsonl|DIR", help='images with questions to calibrate on: a JSONL file of {"image": PATH, '
                 '"question": TEXT} lines, or a folder of images with --question (default for the demo: 60 '
                 "validation scenes of its world; else --prompts)"),
        ),
        "set_question": (
            ("--question",),
            dict(metavar="TEXT", help="with --set FOLDER: the question asked of every image"),
        ),
        "prune_layers": (
            ("--prune-layers",),
            dict(metavar="LIST", help="the prune layers K to try, e.g. 2,9,18 (default: every tenth of the depth, and 2)"),
        ),
        "token_ranks": (
            ("--token-ranks",),
            dict(metavar="LIST", help="the rankings to try (default: core,core-ref,fastv,sparsevlm; random is always "
                 "measured as a reference and never chosen)"),
        ),
        "plot": (
            ("--plot",),
            dict(metavar="FILE.png", help="draw agreement against prefill cost for every candidate, and against K at "
                 "the chosen budget"),
        ),
        "inputs": (
            ("inputs",),
            dict(nargs="+", metavar="INPUT", help="image files, folders (searched recursively) or .txt/.lst files listing paths"),
        ),
        "out": (("--out",), dict(required=True, metavar="FILE.jsonl", help="output JSONL; an existing file is resumed")),
        "retry_errors": (
            ("--retry-errors",),
            dict(action="store_true", help="caption again the images whose last line in --out is an error (a file "
                 "that was missing, since restored); the new line is appended and counts, the old one stays"),
        ),
        "prompt": (
            ("--prompt",),
            dict(default=CAPTION_PROMPT, metavar="TEXT", help="instruction for every image (default: %(default)r)"),
        ),
        "shard": (
            ("--shard",),
            dict(metavar="I/N", help="caption only shard I of N (0 <= I < N), chosen by a hash of each path"),
        ),
        "png_out": (("--out",), dict(required=True, metavar="FILE.png", help="where to write the picture")),
        "budget": (("--budget",), dict(required=True, metavar="SIZE", help="device memory budget, e.g. 12GiB")),
        "profile": (
            ("--profile",),
            dict(default="titan-xp", metavar="NAME", help="device profile: a name in profiles/ or a JSON file (default: %(default)s)"),
        ),
        "shape": (("--shape",), dict(metavar="NAME", help="plan a published shape without weights: llava-1.5-7b, llava-1.5-13b, "
                                                            "qwen2.5-vl-3b, qwen2.5-vl-7b")),
        "weights": (
            ("--weights",),
            dict(
                choices=("float32", "float16", "bfloat16", *QUANT_KINDS),
                help="weight format (default: the profile's dtype); nf4/int8 quantise the resident weights while "
                "streamed layers stay float16, as --quant does",
            ),
        ),
        "prompt_tokens": (
            ("--prompt-tokens",),
            dict(
                type=int, metavar="N",
                help=f"prompt length incl. image tokens (default: one image at the model's planned size + a "
                f"{QUESTION_TOKENS}-token question, 620 for LLaVA-1.5; {workload.prompt_tokens} for a text-only model)",
            ),
        ),
        "new_tokens": (
            ("--new-tokens",),
            dict(type=int, default=workload.new_tokens, metavar="N", help="tokens to generate (default: %(default)s)"),
        ),
        "kept_tokens": (
            ("--kept-tokens",),
            dict(type=int, default=workload.kept_image_tokens, metavar="N",
                 help="image tokens kept from layer K on (default: %(default)s)"),
        ),
        "neuron_fraction": (
            ("--neuron-fraction",),
            dict(type=float, default=workload.neuron_fraction, metavar="F",
                 help="share of FFN neurons in the decode set (default: %(default)s)"),
        ),
        "profile_out": (
            ("--out",),
            dict(metavar="FILE.json", help="also write the profile here, e.g. profiles/my-gpu.json; checked before "
                 "measuring, and its folder is made only if that folder's parent exists (no deeper)"),
        ),
        "scratch": (("--scratch",), dict(default=".", metavar="DIR", help="directory for the disk test file (default: %(default)s)")),
        "quick": (("--quick",), dict(action="store_true", help="small sizes: seconds instead of a minute, noisier figures")),
        "keep_early_kv": (
            ("--keep-early-kv",),
            dict(action="store_true", help="keep dropped tokens' KV entries in layers 0..K-1 (default: core tokens only)"),
        ),
        "no_recycle": (
            ("--no-recycle",),
            dict(action="store_true", help="sparsevlm: drop pruned tokens instead of merging the most relevant into "
                 "aggregate tokens"),
        ),
        "rank_scale": (
            ("--rank-scale",),
            dict(type=float, default=sparse.rank_scale, metavar="S",
                 help="sparsevlm: tokens kept per unit of rank of the raters' attention, per 576 image tokens "
                 "(default: %(default)s)"),
        ),
    }


CALIBRATE_NEW_TOKENS = 32  # answers to score, not to read: shorter keeps calibration quick
SHOW_NEW_TOKENS = 32
SPARSITY_FLAGS = ("mode", "tokens", "token_rank", "neurons", "rho", "beta", "prune_layer", "sparsevlm_k", "dense_above",
                  "dense_layers", "keep_early_kv", "no_recycle", "rank_scale")
# Flags a calibration also sets: given on the command line, each overrides the calibrated value.
CALIBRATED_FLAGS = ("mode", "tokens", "token_rank", "prune_layer", "sparsevlm_k", "neurons", "dense_above")


def sparsity_from_flags(args: argparse.Namespace, calibration=None):
    """SparsitySettings: the library's defaults, then a checkpoint's calibration (an
    edgecm.calibration_record.Calibration) where one is given, then every flag given on the command line.

    Commands call it once without a record before opening the model, so a bad
    flag fails before any loading.
    """
    from dataclasses import replace

    from edgecm.sparsity import NeuronBudget, SparsitySettings, TokenRule, parse_layer_list

    settings = SparsitySettings(
        rho=args.rho,
        beta=args.beta,
        dense_layers=parse_layer_list(args.dense_layers),
        keep_early_kv=args.keep_early_kv,
        recycle=not args.no_recycle,
        rank_scale=args.rank_scale,
        seed=args.seed,
    )
    if calibration is not None:
        settings = calibration.apply(settings)
    given = {name: getattr(args, name) for name in CALIBRATED_FLAGS if getattr(args, name, None) is not None}
    parse = {"tokens": TokenRule.parse, "neurons": NeuronBudget.parse}
    return replace(settings, **{name: parse.get(name, lambda v: v)(value) for name, value in given.items()})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _commands():
    from edgecm_cli.calibrate import cmd_calibrate
    from edgecm_cli.plan import cmd_plan
    from edgecm_cli.profile import cmd_profile
    from edgecm_cli.caption import cmd_caption
    from edgecm_cli.chat import cmd_chat
    from edgecm_cli.show import cmd_show
    from runtime.captioning import CAPTION_NEW_TOKENS

    model = ("model", "device", "dtype", "resident", "run_budget", "quant", "min_pixels", "max_pixels")
    sampling = ("max_new_tokens", "temperature", "top_p", "seed")
    return {
        "run": (
            "answer one question about an image (or a text-only prompt)",
            "Answer one question. Text streams to stdout; a stats line goes to stderr.",
            ("image", "video", "fps", "max_frames", "question", *model, *sampling, "json", *SPARSITY_FLAGS),
            cmd_run,
            {},
        ),
        "chat": (
            "multi-turn terminal chat with a live memory and speed panel",
            "Chat in the terminal. Answers stream with a live panel (memory, KV cache, kept image tokens, "
            "FFN neurons, prefill time, tok/s). Commands: /image PATH, /video DIR, /stats, /reset, /help, /quit. "
            "Ctrl-C stops an answer, Ctrl-D leaves.",
            ("image", "video", "fps", "max_frames", *model, *sampling, *SPARSITY_FLAGS),
            cmd_chat,
            {},
        ),
        "caption": (
            "caption many images into a JSONL file, resumable",
            "Caption image files, folders (recursively) and text files listing paths. One JSON line per image, "
            "flushed and fsynced as written; run again with the same --out to resume.",
            ("inputs", "out", "retry_errors", "prompt", "shard", "batch_size", "ray", "ray_timeout", "workers", "videos", "fps",
             "max_frames", *model,
             *sampling, *SPARSITY_FLAGS),
            cmd_caption,
            {"max_new_tokens": CAPTION_NEW_TOKENS},
        ),
        "show": (
            "draw the kept core tokens, the knee curve and the core-neuron counts",
            "Run one question and draw a PNG: the image (or, for --video, the first frame of each temporal patch, "
            "top to bottom) with the kept core tokens highlighted on the patch grid, the sorted match-score curve "
            "with the knee marked, and the core neurons per layer.",
            ("image", "video", "fps", "max_frames", "question", "png_out", *model, *sampling, *SPARSITY_FLAGS),
            cmd_show,
            {"max_new_tokens": SHOW_NEW_TOKENS},
        ),
        "calibrate": (
            "measure where and how to prune tokens, and the neuron budget, against the dense model",
            "Answer a calibration set densely; teacher-force every token-pruning candidate (ranking x prune layer "
            "K x budget, each run from its K on) and then candidate neuron budgets on those answers; write the "
            "cheapest setting meeting --target to edgecm-calibration.json beside the checkpoint, which run, chat, "
            "caption and show then use. Progress on stderr, the result on stdout.",
            ("calibration_set", "set_question", "image", "prompts", "limit", "target", "prune_layers", "token_ranks",
             "plot", "max_new_tokens", *model, "dense_above", "calibrate_json"),
            cmd_calibrate,
            {"max_new_tokens": CALIBRATE_NEW_TOKENS},
        ),
        "plan": (
            "show what a model needs under a memory budget, phase by phase",
            "Compute bytes per layer, per KV token and for the vision tower, and what is resident in the vision, "
            "prefill and decode phases under --budget on a device profile. Works from a checkpoint, a config.json "
            "alone, or a published --shape. A budget nothing fits in is refused with the smallest that would work.",
            ("model", "shape", "budget", "profile", "weights", "prompt_tokens", "new_tokens", "kept_tokens",
             "neuron_fraction", "batch_size", "plan_json"),
            cmd_plan,
            {"batch_size": 1},
        ),
        "profile": (
            "measure this machine and write a device profile",
            "Measure disk read (page cache dropped), memory copy bandwidth, host-to-device transfers (pinned and "
            "pageable, on CUDA) and matmul TFLOP/s, with a progress display; print the profile as JSON and write "
            "it with --out, for `edgecm plan --profile FILE`.",
            ("device", "profile_out", "scratch", "quick"),
            cmd_profile,
            {},
        ),
    }


def build_parser() -> argparse.ArgumentParser:
    from edgecm import __version__

    flags = _flag_registry()
    parser = _Parser(prog="edgecm", description="CoreMatching inference for LLaVA-family models on small GPUs.")
    # argparse's version action prints and exits as it is parsed, before the missing COMMAND is noticed.
    parser.add_argument("--version", action="version", version=f"edgecm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    for name, (summary, description, flag_names, handler, overrides) in _commands().items():
        command = sub.add_parser(name, help=summary, description=description)
        for flag in flag_names:
            args, kwargs = flags[flag]
            if flag in overrides:  # a command whose own default differs (e.g. shorter captions)
                kwargs = {**kwargs, "default": overrides[flag]}
            if kwargs.get("type") is float:
                kwargs = {**kwargs, "type": finite_float}
            command.add_argument(*args, **kwargs)
        command.set_defaults(handler=handler)
    return parser


def demo_directory():
    """The demo checkpoint, built first if need be; a build is said on stderr as it starts, as it writes
    some hundreds of MiB the user did not ask for by name."""
    from edgecm.demo import demo_checkpoint_dir

    def say(path, size: int) -> None:
        print(f"edgecm: building the demo model into {path} (about {size / 2**20:.0f} MiB, once); "
              f"set EDGECM_HOME to keep it elsewhere", file=sys.stderr)

    return demo_checkpoint_dir(on_build=say)


def open_model(path: str | None):
    from edgecm.checkpoint import open_checkpoint
    from edgecm.demo import DEMO_NOTICE

    if path is None:
        print(f"edgecm: {DEMO_NOTICE}", file=sys.stderr)
        return open_checkpoint(demo_directory()), "demo"
    return open_checkpoint(path), path


@dataclass
class Loaded:
    """Everything a command needs to answer: the model, its prompt builder, the engine and the settings."""

    checkpoint: Any
    model_name: str
    builder: Any
    engine: Any
    sparsity: Any
    calibration: dict | None
    generation: Any


def demo_pruning_notice(model_name: str, sparsity, calibration, num_layers: int) -> str | None:
    """What to tell a user whose images the demo is about to prune with another token setting than its
    measured one, or None where it does not prune or prunes as calibrated."""
    if model_name != "demo" or not sparsity.prunes_tokens:
        return None
    from edgecm.demo import DEMO_PRUNING_NOTICE

    def pruning(settings) -> tuple:  # what decides the kept tokens
        return (settings.token_rank, settings.tokens, settings.ranking_layers(num_layers), settings.keep_early_kv)

    if calibration is not None and calibration.tokens is not None:
        if pruning(calibration.apply(sparsity)) == pruning(sparsity):
            return None
    return DEMO_PRUNING_NOTICE


def checkpoint_calibration(checkpoint, model_name: str):
    """The checkpoint's calibration (the demo's shipped one where none was made beside it), told on stderr:
    what it sets and how well it measured, or why a record found was not applied."""
    from edgecm.calibration_record import load_record
    from edgecm.demo import SHIPPED_CALIBRATION

    calibration, notice = load_record(checkpoint.path, SHIPPED_CALIBRATION if model_name == "demo" else None)
    if notice:
        print(f"edgecm: {notice}", file=sys.stderr)
    return calibration


def load_model(args: argparse.Namespace) -> Loaded:
    from edgecm.prompt import PromptBuilder
    from edgecm.sampling import SamplingSettings
    from runtime.engine import Engine, GenerationSettings
    from runtime.planner import parse_bytes

    checkpoint, model_name = open_model(args.model)
    calibration = checkpoint_calibration(checkpoint, model_name)
    sparsity = sparsity_from_flags(args, calibration)
    refuse_idle_sparsevlm_flags(args, sparsity)
    sparsity.check_layers(checkpoint.config.text.num_layers)  # only config.json has been read so far
    check_model_takes_inputs(args, checkpoint, model_name)
    if calibration is not None and sparsity.mode != "dense":
        print(f"edgecm: {calibration.describe()}; flags override it", file=sys.stderr)
    notice = demo_pruning_notice(model_name, sparsity, calibration, checkpoint.config.text.num_layers)
    if notice and any(getattr(args, name, None) for name in ("image", "video", "inputs")):
        print(f"edgecm: {notice}", file=sys.stderr)
    generation = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingSettings(temperature=args.temperature, top_p=args.top_p, seed=args.seed),
    )
    dtype = args.dtype
    if dtype is None and args.device == "cpu":  # resolved here, as the engine would, to say so if it measured
        from runtime.cpu_dtype import cache_path, cpu_dtype

        dtype = cpu_dtype(on_measured=lambda choice: print(
            f"edgecm: measured this CPU once for its compute dtype: {choice.chosen} ({choice.reason}); kept in "
            f"{cache_path()}, --dtype overrides it", file=sys.stderr)).chosen
    engine = Engine(
        checkpoint, device=args.device, dtype=dtype, resident=args.resident, budget=args.budget, quant=args.quant
    )
    if args.budget is not None and parse_bytes(args.budget) > engine.budget:
        print(f"edgecm: --budget {args.budget} is more than the {engine.device.type} device has; "
              f"planning with all of it ({format_bytes(engine.budget)})", file=sys.stderr)
    return Loaded(
        checkpoint=checkpoint,
        model_name=model_name,
        builder=PromptBuilder(checkpoint, args.min_pixels, args.max_pixels),
        engine=engine,
        sparsity=sparsity,
        calibration=calibration,
        generation=generation,
    )


def stats_line(result) -> str:
    """The one-line summary ``run`` prints after an answer."""
    t, m = result.timings, result.memory
    peak_kind, peak = m.peak
    return (
        f"prefill {t.time_to_answer_s:.2f} s ({result.prompt_tokens} tokens, "
        f"kept {result.kept_image_tokens}/{result.image_tokens} image) | decode {t.decode_tokens_per_s:.1f} tok/s "
        f"({len(result.token_ids)} tokens, {result.neuron_fraction:.0%} FFN neurons) | "
        f"KV {format_bytes(m.kv_cache_bytes)} ({max(result.kv_cache_tokens)} tokens) | "
        f"{peak_kind} {format_bytes(peak)} | {m.plan} (budget {format_bytes(m.budget_bytes)})"
    )


def format_bytes(n: int | None) -> str:
    from runtime.planner import format_size

    return "n/a" if n is None else format_size(n)


def cmd_run(args: argparse.Namespace) -> int:
    from edgecm.prompt import TextStream
    from edgecm.video import VideoOptions, read_video
    from edgecm.vision import load_image
    from edgecm_cli.terminal import for_stream

    check_generation_flags(args)
    sparsity_from_flags(args)  # bad flags and bad input fail before the model loads
    image = load_image(args.image) if args.image else None
    video = read_video(args.video, VideoOptions(args.fps, args.max_frames)) if args.video else None
    loaded = load_model(args)
    builder = loaded.builder
    prompt = builder.build(args.question, image, video)
    stream = TextStream(builder)
    visible = for_stream(sys.stdout)  # control characters escaped on a terminal, exact into a pipe
    pipe = {"closed": False}

    def show(token: int) -> None:
        piece = stream.push(token)
        if piece and not args.json and not pipe["closed"]:
            try:
                sys.stdout.write(visible(piece))
                sys.stdout.flush()
            except BrokenPipeError:  # the reader left (| head): stop generating, keep the stats
                quiet_broken_pipe()
                pipe["closed"] = True

    result = loaded.engine.generate(
        prompt, loaded.generation, builder.stop_token_ids, on_token=show, sparsity=loaded.sparsity,
        should_stop=lambda: pipe["closed"],
    )
    text = builder.decode(result.token_ids)
    try:
        if args.json:
            print(json.dumps(result_record(loaded, result, text)))
        elif not pipe["closed"]:
            sys.stdout.write("\n")
            sys.stdout.flush()
    except BrokenPipeError:
        quiet_broken_pipe()
        pipe["closed"] = True
    print(f"edgecm: {stats_line(result)}", file=sys.stderr)
    return EXIT_BROKEN_PIPE if pipe["closed"] else 0


def result_record(loaded: Loaded, result, text: str) -> dict:
    """The machine-readable account of one answer (run --json, and the base of a caption line)."""
    return {
        "text": text,
        **result.to_json(),
        "model": loaded.model_name,
        "device": str(loaded.engine.device),
        "dtype": str(loaded.engine.dtype).replace("torch.", ""),
        "settings": asdict(loaded.generation),
        "sparsity": loaded.sparsity.to_json(),
        "calibrated": loaded.calibration is not None,
        "quant": loaded.engine.quant,
    }


def main(argv: Sequence[str] | None = None) -> int:
    from edgecm_cli.interrupt import noting_interrupts
    from edgecm_cli.streams import guard_streams, reserve_closed_streams

    closed = reserve_closed_streams()  # first: no file opened later may take a closed stream's number
    streams = sys.stdout, sys.stderr
    guard_streams()
    try:
        with noting_interrupts():
            return _main(argv, closed)
    finally:
        sys.stdout, sys.stderr = streams  # a caller in the same process gets its own streams back


def writes_stdout(args: argparse.Namespace) -> bool:
    """Whether the command's product is what it prints (refused with a closed stdout)."""
    return args.command in ("run", "chat", "plan") or (args.command == "profile" and not args.out)


def _main(argv: Sequence[str] | None, closed: set[int] = frozenset()) -> int:
    from edgecm_cli.interrupt import is_interrupt
    from edgecm_cli.streams import StdoutError, refuse_closed

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        # The command as typed, for messages that say how to resume it.
        args.command_line = ["edgecm", *(sys.argv[1:] if argv is None else argv)]
        from transformers.utils import logging as hf_logging

        from edgecm.errors import EdgecmError

        hf_logging.set_verbosity_error()  # library notices are not for end users
        hf_logging.disable_progress_bar()
        try:
            refuse_closed(args.command, closed, writes_stdout(args))
            code = args.handler(args)
            sys.stdout.flush()  # what is still buffered fails here, not in Python's own flush at exit
            return code
        except StdoutError as exc:  # not the user's input: the stream failed
            print(f"edgecm: error: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        except EdgecmError as exc:
            print(f"edgecm: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    except BrokenPipeError:
        return quiet_broken_pipe()
    except BaseException as exc:  # Ctrl-C during imports, loading, prefill or decode alike
        if not is_interrupt(exc):
            raise
        print("\nedgecm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def quiet_broken_pipe() -> int:
    """The reader of stdout went away (``| head``): stop quietly, as ``cat`` does.

    stdout is pointed at /dev/null so that Python's final flush at exit does not
    raise again and print a second error.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
