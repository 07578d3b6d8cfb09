"""PyTorch's CUDA rules that can be checked without a GPU.

- sampling draws from a generator on the logits' device (torch.multinomial refuses one of another device);
- no torch.cuda call runs when the device is the CPU;
- every copy marked non_blocking is one whose synchronisation has been reviewed: a new one fails here until
  it is added, with the event or synchronize that makes it safe, to REVIEWED_NON_BLOCKING.

tests/test_cuda.py runs the CUDA paths themselves, on a GPU.
"""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path

import pytest
import torch

from edgecm.checkpoint import open_checkpoint
from edgecm.prompt import PromptBuilder
from edgecm.sampling import SamplingSettings, next_token, seeded_generator
from edgecm.sparsity import NeuronBudget, SparsitySettings, TokenRule
from edgecm.vision import load_image
from runtime.batch import generate_batch
from runtime.engine import Engine, GenerationSettings
from runtime.telemetry import memory_readout, nvml_snapshot

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = [ROOT / "edgecm", ROOT / "runtime"]

# (file, function) -> what makes the copy safe to use.
REVIEWED_NON_BLOCKING = {
    ("runtime/streamer.py", "_fetch"): "an event recorded after the copies on the copy stream; the compute stream "
    "waits on it (_receive) and the next write of the pinned buffer synchronises on it",
    ("runtime/measure.py", "host_to_device_gbs"): "_timed synchronises the device before reading the clock",
}
# Where torch.Generator may be made: the sampler's, on the logits' device, and the random token ranking's,
# on the CPU by design, so that a seed keeps the same tokens on every device.
# The last two draw CPU tensors only: the dtype timing's operands and a random checkpoint's weights.
REVIEWED_GENERATORS = {("edgecm/sampling.py", "seeded_generator"), ("edgecm/corematching.py", "random_scores"),
                       ("runtime/cpu_dtype.py", "measure"), ("edgecm/synthetic.py", "_random_tensor")}


def _calls(keyword: str | None = None, callee: str | None = None) -> set[tuple[str, str]]:
    """(file, enclosing function) of every call in the library with ``keyword``=True, or to ``callee``."""
    found = set()
    for folder in LIBRARY:
        for path in folder.rglob("*.py"):
            tree = ast.parse(path.read_text())
            for function in ast.walk(tree):
                if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(function):
                    if not isinstance(node, ast.Call):
                        continue
                    hit = keyword and any(k.arg == keyword and not (isinstance(k.value, ast.Constant) and
                                                                    not k.value.value) for k in node.keywords)
                    hit = hit or (callee and ast.unparse(node.func) == callee)
                    if hit:
                        found.add((str(path.relative_to(ROOT)), function.name))
    return found


def test_every_non_blocking_copy_has_its_synchronisation_reviewed():
    assert _calls(keyword="non_blocking") == set(REVIEWED_NON_BLOCKING)


def test_generators_are_made_only_where_their_device_was_reviewed():
    assert _calls(callee="torch.Generator") == REVIEWED_GENERATORS


def test_the_streamer_records_an_event_after_its_non_blocking_copies():
    """In the copy-stream block, the copies are followed by an event's record() in the same block."""
    source = inspect.getsource(sys.modules["runtime.streamer"].LayerStreamer._fetch)
    block = next(n for n in ast.walk(ast.parse(source.strip() if source.startswith("def") else
                                               "\n".join(l[4:] for l in source.splitlines())))
                 if isinstance(n, ast.With) and "torch.cuda.stream" in ast.unparse(n.items[0].context_expr))
    statements = [ast.unparse(s) for s in block.body]
    copy_at = next(i for i, s in enumerate(statements) if "non_blocking=True" in s)
    assert any(s.endswith(".record()") for s in statements[copy_at + 1:]), statements


def test_the_sampling_generator_is_on_the_logits_device_and_keeps_cpu_draws():
    logits = torch.randn(50)
    generator = seeded_generator(7, logits.device)
    assert generator.device == logits.device
    settings = SamplingSettings(temperature=1.0, seed=7)
    # The CPU's draws are those of torch's default generator with the same seed.
    old = [next_token(logits, settings, torch.Generator().manual_seed(7)) for _ in range(1)]
    assert [next_token(logits, settings, generator)] == old


@pytest.fixture(scope="module")
def llava(build_llava, image_path):
    model_dir, _ = build_llava(gqa=True, tied=False, layout="v5", sharded=True, chat_template=True)
    checkpoint = open_checkpoint(model_dir)
    return checkpoint, PromptBuilder(checkpoint).build("What is in the picture?", load_image(image_path))


def test_no_torch_cuda_call_runs_on_the_cpu(llava, monkeypatch):
    """Every torch.cuda function and Event/Stream is watched while the library runs on the CPU: streamed
    prefill, a held decode set, sampling, a batch and the telemetry. Calls made by torch or transformers
    themselves are theirs; only calls from edgecm's own files count."""
    calls = []

    def watch(name, original):
        def watched(*args, **kwargs):
            caller = Path(sys._getframe(1).f_code.co_filename).resolve()
            if any(caller.is_relative_to(folder) for folder in LIBRARY):
                calls.append(f"torch.cuda.{name} from {caller.relative_to(ROOT)}:{sys._getframe(1).f_lineno}")
            return original(*args, **kwargs)
        return watched

    for name, value in list(vars(torch.cuda).items()):
        if inspect.isfunction(value) or name in ("Event", "Stream"):
            monkeypatch.setattr(torch.cuda, name, watch(name, value))
    checkpoint, prompt = llava
    sparsity = SparsitySettings(tokens=TokenRule("count", 4), neurons=NeuronBudget("beta", 0.4))
    sampled = GenerationSettings(max_new_tokens=4, sampling=SamplingSettings(temperature=0.8, top_p=0.9, seed=1))
    smallest = Engine(checkpoint).plan_for(prompt.num_tokens, int(prompt.image_positions.numel()), 4, sparsity)
    engine = Engine(checkpoint, budget=str(smallest.min_budget))
    result = engine.generate(prompt, sampled, sparsity=sparsity)
    assert result.memory.plan == "decode set streams"
    images = int(prompt.image_positions.numel())
    batch = Engine(checkpoint, budget=str(Engine(checkpoint).plan_for(prompt.num_tokens, images, 4, sparsity,
                                                                      batch=2).min_budget))
    generate_batch(batch, [prompt, prompt], sampled, sparsity=sparsity)
    nvml_snapshot(engine.device)
    memory_readout(engine.device)
    assert calls == []
