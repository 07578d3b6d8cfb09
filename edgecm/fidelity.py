"""How close a sparse setting stays to the dense model, measured on a prompt set.

For each prompt the dense model answers greedily (up to N tokens, stopping at
EOS); each sparse setting is then teacher-forced on that answer. Reported:
- top-1 agreement: the share of answer positions where the sparse argmax is
  the dense model's token;
- mean KL(dense || sparse) of the next-token distributions;
- greedy exact-match length: tokens before the first disagreement, which is
  exactly how long free-running sparse greedy decoding would follow the
  dense answer (it sees the same tokens up to there);
- the fraction of FFN neurons decode uses, and decode tokens/s.

The engine is passed in (``runtime.engine.Engine``); this module only measures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from edgecm.errors import EdgecmError
from edgecm.sparsity import DENSE, SparsitySettings, TokenRule

PROMPTS_FILE = Path(__file__).parent / "data" / "prompts.jsonl"


def load_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    """Prompts from JSONL lines with a 'prompt' field, or plain lines (one prompt each).

    A line that is JSON but not an object with a text 'prompt' (a number, an array) is refused with its
    line number rather than read as text: it is almost surely a malformed set, not a question.
    """
    from edgecm.textfile import read_lines

    if not path.is_file():
        raise EdgecmError(f"{path}: no such prompt file; pass --prompts a JSONL or text file")
    fix = "pass --prompts a JSONL file of {\"prompt\": TEXT} lines, or a text file with one prompt a line"
    prompts = []
    for number, line in enumerate(read_lines(path, fix), 1):
        if not line.strip():
            continue
        start = line.lstrip()[:1]
        if start in ("{", "["):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if start == "{":
                    raise EdgecmError(f"{path}:{number}: not a JSON object with a 'prompt' field; fix that line") from None
                prompts.append(line)  # "[INST] ..." and the like: text that opens with a bracket
                continue
            if not isinstance(entry, dict):
                raise EdgecmError(f"{path}:{number}: a JSON {type(entry).__name__}, not an object with a 'prompt' "
                                  f"field; write {{\"prompt\": \"...\"}}, or the prompt as plain text")
            prompt = entry.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                shown = "missing" if "prompt" not in entry else json.dumps(entry["prompt"])
                raise EdgecmError(f"{path}:{number}: 'prompt' must be a non-empty text, not {shown}; fix that line")
            prompts.append(prompt)
        else:
            prompts.append(line)
    if not prompts:
        raise EdgecmError(f"{path}: no prompts in it; one prompt per line, or JSONL with a 'prompt' field")
    return prompts


@dataclass
class Reference:
    """The dense model's answer to one prompt."""

    prompt: object  # edgecm.prompt.Prompt
    tokens: list[int]
    logits: torch.Tensor  # (n, V)
    tokens_per_s: float


@dataclass
class Fidelity:
    setting: str
    top1_agreement: float
    mean_kl: float
    exact_match_tokens: float  # mean over prompts
    neuron_fraction: float
    decode_tokens_per_s: float
    positions: int

    def to_json(self) -> dict:
        return self.__dict__.copy()


def _generation(max_new_tokens: int):
    from runtime.engine import GenerationSettings  # the engine lives in runtime/; imported only when used

    return GenerationSettings(max_new_tokens=max_new_tokens)


def dense_references(engine, prompts: list, stop_ids: tuple[int, ...], max_new_tokens: int) -> list[Reference]:
    refs = []
    for prompt in prompts:
        r = engine.generate(prompt, _generation(max_new_tokens), stop_ids, sparsity=DENSE, collect_logits=True)
        refs.append(Reference(prompt, r.token_ids, r.logits, r.timings.decode_tokens_per_s))
    return refs


def measure(engine, refs: list[Reference], settings: SparsitySettings, label: str) -> Fidelity:
    """Teacher-force ``settings`` on every reference answer and pool the metrics over all positions."""
    agree = kl_sum = positions = 0.0
    exact, fractions, speeds = [], [], []
    for ref in refs:
        n = len(ref.tokens)
        r = engine.generate(
            ref.prompt,
            replace(_generation(n), stop_at_eos=False),
            sparsity=settings,
            forced_tokens=ref.tokens,
            collect_logits=True,
        )
        predicted = r.logits.argmax(dim=-1)
        target = torch.tensor(ref.tokens)
        matches = predicted == target
        agree += float(matches.sum())
        mismatches = (~matches).nonzero()
        exact.append(int(mismatches[0]) if mismatches.numel() else n)
        dense_logp = F.log_softmax(ref.logits.double(), dim=-1)
        sparse_logp = F.log_softmax(r.logits.double(), dim=-1)
        kl_sum += float((dense_logp.exp() * (dense_logp - sparse_logp)).sum())
        positions += n
        fractions.append(r.neuron_fraction)
        if n > 1:
            speeds.append(r.timings.decode_tokens_per_s)
    return Fidelity(
        setting=label,
        top1_agreement=agree / positions,
        mean_kl=kl_sum / positions,
        exact_match_tokens=sum(exact) / len(exact),
        neuron_fraction=sum(fractions) / len(fractions),
        decode_tokens_per_s=sum(speeds) / len(speeds) if speeds else 0.0,
        positions=int(positions),
    )


def neuron_only(settings: SparsitySettings) -> SparsitySettings:
    """The same neuron budget with every image token kept: calibration measures neurons alone."""
    return replace(settings, tokens=TokenRule("all"))
