"""The ``edgecm`` command line.

All subcommands draw their flags from one registry (``FLAGS``), so a flag is
spelled, documented and defaulted once. Generated text goes to stdout, stats
and notices to stderr. A problem with the user's input is one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any, Sequence

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _defaults():
    # Defaults come from the library's dataclasses, the one source for them.
    from edgecm.sampling import SamplingSettings
    from runtime.engine import GenerationSettings

    return GenerationSettings(), SamplingSettings()


def _flag_registry() -> dict[str, tuple[tuple[str, ...], dict[str, Any]]]:
    gen, sampling = _defaults()
    return {
        "model": (
            ("--model",),
            dict(
                metavar="PATH",
                help="checkpoint directory (llava-hf or Llama, safetensors) or a LLaMA .gguf file; "
                "default: the embedded demo model, built on first use",
            ),
        ),
        "image": (("--image",), dict(metavar="PATH", help="image file (PNG, JPEG, WebP, ...); omit for a text-only prompt")),
        "question": (("--question", "-q"), dict(metavar="TEXT", required=True, help="the question or instruction")),
        "device": (("--device",), dict(default="cpu", metavar="cpu|cuda", help="compute device (default: %(default)s)")),
        "dtype": (
            ("--dtype",),
            dict(
                choices=("float32", "float16", "bfloat16"),
                help="compute dtype (default: float32 on CPU, the checkpoint's half type on CUDA)",
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
        "json": (("--json",), dict(action="store_true", help="print one JSON object with text, ids, timings and memory")),
    }


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    flags = _flag_registry()
    parser = _Parser(prog="edgecm", description="CoreMatching inference for LLaVA-family models on small GPUs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="answer one question about an image (or a text-only prompt)",
        description="Answer one question. Text streams to stdout; a stats line goes to stderr.",
    )
    for name in ("model", "image", "question", "device", "dtype", "max_new_tokens", "temperature", "top_p", "seed", "resident", "json"):
        args, kwargs = flags[name]
        run.add_argument(*args, **kwargs)
    run.set_defaults(handler=cmd_run)
    return parser


def _open_model(path: str | None):
    from edgecm.checkpoint import open_checkpoint
    from edgecm.demo import DEMO_NOTICE, demo_checkpoint_dir

    if path is None:
        print(f"edgecm: {DEMO_NOTICE}", file=sys.stderr)
        return open_checkpoint(demo_checkpoint_dir()), "demo"
    return open_checkpoint(path), path


def _format_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def cmd_run(args: argparse.Namespace) -> int:
    from edgecm.errors import EdgecmError
    from edgecm.prompt import PromptBuilder, TextStream
    from edgecm.sampling import SamplingSettings
    from edgecm.vision import load_image
    from runtime.engine import Engine, GenerationSettings

    if args.max_new_tokens < 1:
        raise EdgecmError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if not 0 < args.top_p <= 1:
        raise EdgecmError(f"--top-p {args.top_p}: must be in (0, 1]")
    image = load_image(args.image) if args.image else None  # before the model: bad input fails fast
    checkpoint, model_name = _open_model(args.model)
    builder = PromptBuilder(checkpoint)
    prompt = builder.build(args.question, image)
    engine = Engine(checkpoint, device=args.device, dtype=args.dtype, resident=args.resident)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingSettings(temperature=args.temperature, top_p=args.top_p, seed=args.seed),
    )
    stream = TextStream(builder)

    def show(token: int) -> None:
        piece = stream.push(token)
        if piece and not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()

    result = engine.generate(prompt, settings, builder.stop_token_ids, on_token=show)
    text = builder.decode(result.token_ids)
    if args.json:
        record = {
            "text": text,
            "token_ids": result.token_ids,
            "prompt_tokens": result.prompt_tokens,
            "image_tokens": result.image_tokens,
            "stop_reason": result.stop_reason,
            "timings": result.timings,
            "memory": result.memory,
            "model": model_name,
            "device": str(engine.device),
            "dtype": str(engine.dtype).replace("torch.", ""),
            "settings": asdict(settings),
        }
        print(json.dumps(record))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
    t, m = result.timings, result.memory
    peak = m["device_peak_allocated_bytes"] if m["device_peak_allocated_bytes"] is not None else m["rss_peak_bytes"]
    peak_kind = "device peak" if m["device_peak_allocated_bytes"] is not None else "peak RSS"
    print(
        f"edgecm: prefill {t['prefill_s'] + t['vision_s']:.2f} s ({result.prompt_tokens} tokens, "
        f"{result.image_tokens} image) | decode {t['decode_tokens_per_s']:.1f} tok/s "
        f"({len(result.token_ids)} tokens) | KV {_format_bytes(m['kv_cache_bytes'])} | "
        f"{peak_kind} {_format_bytes(peak)}",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    from edgecm.errors import EdgecmError

    hf_logging.set_verbosity_error()  # library notices are not for end users
    hf_logging.disable_progress_bar()
    try:
        return args.handler(args)
    except EdgecmError as exc:
        print(f"edgecm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nedgecm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
