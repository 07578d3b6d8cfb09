"""Flag values checked before any work: the argparse types (inf/nan refused for every float flag at once),
the sampling and pixel flags, what the model can take from its config.json alone, and SparseVLM's flags
under another ranking. Each refusal is one line naming the flag and the fix.
"""

from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """A float flag's type: inf and nan parse as floats, and pass a range check such as ``> 0``, so they are
    refused here, for every float flag at once (build_parser gives every ``type=float`` this type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: use a finite number, not inf or nan")
    return value


def check_model_takes_inputs(args: argparse.Namespace, checkpoint, model_name: str) -> None:
    """Refuse --image, --video or --videos that the model cannot take, from its config.json alone, so
    the refusal comes before any weight is read."""
    from edgecm.errors import EdgecmError
    from edgecm.families import FAMILIES

    if not checkpoint.config.is_multimodal:
        if getattr(args, "image", None):
            raise EdgecmError(f"--image: {model_name} is a text-only model and takes no image; drop --image or "
                              f"pass --model a vision-language checkpoint")
        if getattr(args, "inputs", None):
            raise EdgecmError(f"{model_name}: a text-only model cannot caption images; pass --model a "
                              f"vision-language checkpoint")
    flag = "--video" if getattr(args, "video", None) else "--videos" if getattr(args, "videos", False) else None
    if flag and not checkpoint.family.takes_video:
        with_video = ", ".join(a for f in FAMILIES if f.takes_video for a in f.architectures)
        raise EdgecmError(f"{flag}: {model_name} ({checkpoint.family.name}) takes no video; drop {flag} or pass "
                          f"--model a checkpoint that does ({with_video})")


def batch_size_flag(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text}: use a whole number of at least 1, or auto") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: use a whole number of at least 1")
    return value


def check_generation_flags(args: argparse.Namespace) -> None:
    from edgecm.errors import EdgecmError

    if args.max_new_tokens < 1:
        raise EdgecmError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if not 0 < args.top_p <= 1:
        raise EdgecmError(f"--top-p {args.top_p}: must be in (0, 1]")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise EdgecmError(f"--temperature {args.temperature}: must be 0 (greedy) or a positive number")
    if args.budget is not None:
        from runtime.planner import parse_bytes

        parse_bytes(args.budget)
    check_pixel_flags(args)


def check_pixel_flags(args: argparse.Namespace) -> None:
    """--min-pixels and --max-pixels, checked before the model opens (the processor checks them again)."""
    from edgecm.errors import EdgecmError
    from edgecm.families.qwen2_5_vl import check_min_pixels

    low, high = getattr(args, "min_pixels", None), getattr(args, "max_pixels", None)
    for flag, value in (("--min-pixels", low), ("--max-pixels", high)):
        if value is not None and value < 1:
            raise EdgecmError(f"{flag} {value}: must be a positive number of pixels")
    if low is not None and high is not None and low > high:
        raise EdgecmError(f"--min-pixels {low} is above --max-pixels {high}; lower it or raise --max-pixels")
    check_min_pixels(low, "--min-pixels")


def refuse_idle_sparsevlm_flags(args: argparse.Namespace, sparsity) -> None:
    """SparseVLM's own flags do nothing under another ranking; given anyway, they are refused rather than
    silently ignored. Checked on the final settings, as a calibration can choose sparsevlm itself."""
    from edgecm.errors import EdgecmError
    from edgecm.sparsity import SparsitySettings

    if sparsity.mode == "dense" or sparsity.token_rank == "sparsevlm":
        return
    given = [flag for flag, on in (("--sparsevlm-k", getattr(args, "sparsevlm_k", None) is not None),
                                   ("--no-recycle", getattr(args, "no_recycle", False)),
                                   ("--rank-scale", getattr(args, "rank_scale", SparsitySettings.rank_scale)
                                    != SparsitySettings.rank_scale)) if on]
    if given:
        source = "--token-rank" if getattr(args, "token_rank", None) else "the default or the calibration"
        raise EdgecmError(f"{given[0]} applies to --token-rank sparsevlm only, and the ranking here is "
                          f"{sparsity.token_rank} ({source}); add --token-rank sparsevlm, or drop {given[0]}")
