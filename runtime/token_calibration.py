"""Calibrating token pruning: where (the prune layer K) and how (ranking, budget) a model keeps its answers.

The candidates are every ranking (core, core-ref, fastv, sparsevlm) at every K
of a grid over the depth (every tenth of it, and the paper's K = 2) and every
budget: the ranking's own adaptive rule where it has one (the knee; SparseVLM's
rank rule) and ratios of the image tokens from a half down to a sixteenth.
``random`` is measured at the same points as a reference line and is never
chosen. Each is measured as the neuron search measures a budget
(edgecm.fidelity): teacher-forced on the model's own dense greedy answers, the
share of answer positions whose argmax is the dense token (top-1 agreement),
and the share of answers reproduced whole (exact agreement: with every position
agreeing, greedy decoding gives the dense answer). Neurons stay dense here; the
neuron budget is searched afterwards, under the chosen token setting.

Why it is cheap: up to layer K-1 every candidate at K sees every token, so it
computes exactly what the dense model computes there. One dense pass per
prompt keeps, for each K of the grid, the rows entering layer K, the queries of
layer K-1 and its FFN statistics (what every ranking reads), and the dense KV
cache; a candidate then starts at layer K from those rows, with the KV cache of
layers 0..K-1 cut to its kept tokens, and runs only layers K..L-1 over the
kept tokens. The answer is teacher-forced in one pass over its tokens (they are
known), which computes what decoding them one by one computes. ``naive=True``
instead runs every candidate through ``Engine.generate``: the reference the
sweep is tested against, and what its time is compared with.

One prompt's dense record is held on the compute device at a time (rows and
queries of each K, and the prompt's KV cache), then dropped.

Cost, from the model's shapes (runtime.planner): prefill FLOPs with each layer
counted over the rows it really ran, the vision tower included, and the KV
bytes decode starts from. The choice is the cheapest candidate in prefill FLOPs
(then KV bytes) whose agreement meets the target; none meeting it keeps every
image token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

from edgecm.corematching import LayerActivationStats
from edgecm.fidelity import Reference
from edgecm.kv_cache import KVCache
from edgecm.model import decoder_layer
from edgecm.sparsity import DENSE, NeuronBudget, SparsitySettings, TokenRule
from edgecm.token_pruning import Rows, TokenPruner
from runtime.batch import pad, padded_rows, per_sequence_observer
from runtime.planner import kv_bytes, prefill_flops

RANKINGS = ("core", "core-ref", "fastv", "sparsevlm")
REFERENCE_RANKINGS = ("random",)  # measured beside the others, never chosen
ADAPTIVE = {"core": True, "core-ref": True, "fastv": False, "sparsevlm": True, "random": False}
BUDGET_RATIOS = (0.5, 0.25, 0.125, 0.0625)
DEFAULT_TARGET = 0.95


def layer_grid(num_layers: int) -> tuple[int, ...]:
    """K over the whole depth: every tenth of it, plus the paper's K = 2 (K >= 1, below the last layer)."""
    grid = {2} | {round(i * num_layers / 10) for i in range(1, 10)}
    return tuple(sorted(k for k in grid if 1 <= k < num_layers))


@dataclass(frozen=True)
class Candidate:
    rank: str
    k: int  # layers 0..K-1 see every token (SparseVLM: its first stage; the others keep their distance)
    tokens: TokenRule  # knee (the adaptive rule) or ratio:R

    def settings(self, base: SparsitySettings) -> SparsitySettings:
        """The candidate on top of ``base`` (its rho, beta, seed, ...), every FFN neuron kept."""
        settings = replace(base, mode="corematching", token_rank=self.rank, tokens=self.tokens,
                           neurons=NeuronBudget("dense"), keep_early_kv=False)
        if self.rank == "sparsevlm":
            return replace(settings, sparsevlm_k=self.k)
        return replace(settings, prune_layer=self.k, sparsevlm_k=None)

    @property
    def reference(self) -> bool:
        return self.rank in REFERENCE_RANKINGS

    @property
    def label(self) -> str:
        budget = "adaptive" if self.tokens.kind == "knee" else str(self.tokens)
        return f"{self.rank} {budget} K={self.k}"


def candidates(num_layers: int, grid: tuple[int, ...] | None = None) -> list[Candidate]:
    out = []
    for k in grid or layer_grid(num_layers):
        for rank in (*RANKINGS, *REFERENCE_RANKINGS):
            budgets = ([TokenRule("knee")] if ADAPTIVE[rank] else []) + [TokenRule("ratio", r) for r in BUDGET_RATIOS]
            out.extend(Candidate(rank, k, rule) for rule in budgets)
    return out


@dataclass
class CandidateResult:
    """One candidate over the whole calibration set; agreement is pooled over every answer position."""

    candidate: Candidate
    top1_agreement: float = 0.0
    exact_agreement: float = 0.0  # share of answers reproduced whole
    mean_kl: float = 0.0
    kept_image_tokens: float = 0.0  # mean over prompts with an image
    prefill_flops: float = 0.0  # mean over prompts
    kv_bytes: float = 0.0
    relative_prefill_flops: float = 1.0  # against the dense prefill of the same prompts
    relative_kv_bytes: float = 1.0
    positions: int = 0
    prompts: int = 0
    seconds: float = 0.0  # spent measuring this candidate
    _sums: dict = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        c = self.candidate
        record = {k: v for k, v in self.__dict__.items() if not k.startswith("_") and k != "candidate"}
        return {"rank": c.rank, "k": c.k, "tokens": str(c.tokens), "label": c.label, "reference": c.reference,
                **record}


@dataclass
class Outcome:
    """One candidate on one prompt."""

    logits: torch.Tensor  # (n, V) float32, one row per answer position
    rows_per_layer: list[int]
    kv_entries: list[int]
    kept_image_tokens: int


@dataclass
class DenseRecord:
    """What one prompt's dense prefill leaves for the candidates, per K of the grid."""

    prompt: object  # edgecm.prompt.Prompt
    rows: Rows  # the prompt's rows entering layer 0 (embeddings, positions, sequence indices, sources)
    cache: KVCache  # the dense KV cache of the prompt, every layer
    hidden: dict[int, torch.Tensor]  # K -> rows entering layer K (T, d)
    queries: dict[int, torch.Tensor]  # K -> rotary-embedded queries of layer K-1 (H, T, D)
    stats: dict[int, LayerActivationStats]  # K -> FFN statistics of layer K-1 (f(n), G(i), G(r))


def record_dense(engine, prompt, grid: tuple[int, ...]) -> DenseRecord:
    """The dense prefill of ``prompt``, keeping what a candidate at any K of ``grid`` starts from."""
    hidden = engine.embed(prompt)
    rows, _ = engine.start_sequence(hidden[0], prompt, DENSE)
    start = replace(rows, hidden=rows.hidden.clone())
    # Every row is present up to the first pruning, so a sequence index is its row (core-ref's r, as the
    # pruner takes it: the last prompt token where the prompt names none).
    reference_row = prompt.num_tokens - 1 if prompt.reference_index is None else prompt.reference_index
    cache = KVCache(engine.text.num_layers)
    record = DenseRecord(prompt, start, cache, {}, {}, {})
    wanted = {k - 1: k for k in grid}
    for index, weights in engine.streamer.stream(range(engine.text.num_layers)):
        stats = observe = None
        if index in wanted:
            stats = LayerActivationStats(DENSE.rho, rows.visual, frequency=True, reference_row=reference_row)

            def observe(q, keys, k=wanted[index]):
                record.queries[k] = q[0].clone()
        out = decoder_layer(rows.hidden[None], weights, engine.text, rows.cos, rows.sin, rows.order, cache, index,
                            observer=stats, attention_observer=observe)
        rows.hidden = out[0]
        del weights
        if index in wanted:
            record.hidden[wanted[index]] = rows.hidden.clone()
            record.stats[wanted[index]] = stats
    return record


def run_candidates(engine, record: DenseRecord, settings: list[SparsitySettings], answer: list[int]) -> list[Outcome]:
    """Candidates of one K on the recorded prompt, as one padded batch from layer K on, then the answer
    teacher-forced in one pass: per candidate, the logits of every answer position.

    The batch is laid out as runtime.batch lays one out (rows padded on the right, padding ordered after
    every real token), each candidate with its own kept tokens, KV cache row and SparseVLM stages."""
    text, prompt = engine.text, record.prompt
    layers = text.num_layers
    firsts = {s.ranking_layers(layers)[0] for s in settings}
    assert len(firsts) == 1, "one batch of candidates shares its K"
    first = firsts.pop()
    k = first + 1
    pruners, rows, survivors = [], [], []
    for candidate in settings:
        pruner = TokenPruner.start(candidate, layers, text.num_heads // text.num_kv_heads, record.rows,
                                   prompt.reference_index)
        start = replace(record.rows, hidden=record.hidden[k])
        probe = pruner.attention_probe(first, start)
        if probe is not None:
            kv = record.cache.layers[first]
            probe(record.queries[k], kv.keys[0, :, : kv.length])
        pruned = pruner.after_layer(first, start, record.stats.get(k))
        kept, kept_orders = (start, start.order) if pruned is None else pruned
        pruners.append(pruner)
        rows.append(kept)
        survivors.append(kept_orders)
    cache = KVCache(layers, reserve_tokens=len(answer))
    cache.copy_layers(record.cache, range(k), copies=len(settings))
    for done in range(k):  # the core-token-only KV cache
        cache.keep_orders(done, survivors)
    rows_per_layer = [[prompt.num_tokens] * k for _ in settings]
    hidden = pad([r.hidden for r in rows], max(r.length for r in rows), 0.0)
    order, cos, sin = padded_rows(rows)
    for index, weights in engine.streamer.stream(range(k, layers)):
        for count, r in zip(rows_per_layer, rows):
            count.append(r.length)
        probes = [p.attention_probe(index, r) for p, r in zip(pruners, rows)]
        observe = per_sequence_observer(probes, [r.length for r in rows]) if any(probes) else None
        hidden = decoder_layer(hidden, weights, text, cos, sin, order, cache, index, attention_observer=observe)
        del weights
        if not any(index in p.layers for p in pruners):
            continue
        survivors = []
        for b, pruner in enumerate(pruners):
            rows[b] = replace(rows[b], hidden=hidden[b, : rows[b].length])
            pruned = pruner.after_layer(index, rows[b], None)
            if pruned is not None:
                rows[b], kept_orders = pruned
            else:
                kept_orders = rows[b].order
            survivors.append(kept_orders)
        hidden = pad([r.hidden for r in rows], max(r.length for r in rows), 0.0)
        order, cos, sin = padded_rows(rows)
        for done in range(index + 1):
            cache.keep_orders(done, survivors)
    last = torch.tensor([r.length - 1 for r in rows], device=engine.device)
    logits = engine.head(hidden[torch.arange(len(rows), device=engine.device), last])[:, None]  # (B, 1, V)
    kv_entries = [cache.live(layer) for layer in range(layers)]
    if len(answer) > 1:
        logits = torch.cat([logits, _forced_answer(engine, prompt, answer[:-1], cache, len(rows))], dim=1)
    logits = logits.float().cpu()
    return [Outcome(logits[b], rows_per_layer[b], [entries[b] for entries in kv_entries], pruners[b].kept_tokens)
            for b in range(len(rows))]


def _forced_answer(engine, prompt, fed: list[int], cache: KVCache, rows: int) -> torch.Tensor:
    """Logits after each of the ``fed`` answer tokens for every cache row, (B, n, V), all in one pass over
    every layer: the tokens are known, and the causal rule lets each see only the prompt and the ones
    before it (never a padded slot, which is ordered after everything), as decoding them does."""
    device = engine.device
    ids = torch.tensor([fed] * rows, device=device)
    position = engine.family.next_position(engine.config, prompt)
    cos, sin = engine.rotary.cos_sin(torch.arange(position, position + len(fed), device=device), engine.dtype)
    order = torch.arange(prompt.num_tokens, prompt.num_tokens + len(fed), device=device).expand(rows, -1)
    hidden = engine.run_layers(F.embedding(ids, engine.embed_tokens), None, order, cache,
                               cos_sin=(cos.expand(rows, 1, -1, -1), sin.expand(rows, 1, -1, -1)))
    return engine.head(hidden)


def run_naive(engine, settings: SparsitySettings, ref: Reference) -> Outcome:
    """The same measurement through ``Engine.generate``: every layer, every decode step."""
    from runtime.engine import GenerationSettings

    result = engine.generate(ref.prompt, GenerationSettings(max_new_tokens=len(ref.tokens), stop_at_eos=False),
                             sparsity=settings, forced_tokens=ref.tokens, collect_logits=True)
    prefill_entries = [t - (len(ref.tokens) - 1) for t in result.kv_cache_tokens]  # before the fed answer
    return Outcome(result.logits, _rows_per_layer(engine, ref.prompt, result, settings), prefill_entries,
                   result.kept_image_tokens)


def _rows_per_layer(engine, prompt, result, settings: SparsitySettings) -> list[int]:
    """The rows each prefill layer ran over, read off a generation's selection (its stages for SparseVLM)."""
    layers = engine.text.num_layers
    rows = [prompt.num_tokens] * layers
    selection = result.selection
    if selection is None:
        return rows
    text = prompt.num_tokens - int(prompt.image_positions.numel())
    stages = (list(zip(selection.stage_layers, selection.stage_tokens)) if selection.stage_layers else
              [(settings.ranking_layers(layers)[0], result.kept_image_tokens)])
    for layer, left in stages:
        rows[layer + 1:] = [text + left] * (layers - layer - 1)
    return rows


def sweep(
    engine,
    refs: list[Reference],
    base: SparsitySettings = SparsitySettings(),
    grid: tuple[int, ...] | None = None,
    on_prompt: Callable[[int, int], None] | None = None,
    naive: bool = False,
    only: list[Candidate] | None = None,
    batch_size: int = 8,
) -> tuple[list[CandidateResult], float]:
    """Every candidate on every reference answer; (results in candidate order, seconds taken).

    Candidates of one K run ``batch_size`` at a time as one batch (those keeping similar counts together,
    so little is padding); ``naive`` runs each alone through the engine instead."""
    grid = grid or layer_grid(engine.text.num_layers)
    todo = only or candidates(engine.text.num_layers, grid)
    results = {c: CandidateResult(c) for c in todo}
    dense_flops = dense_kv = 0.0
    started = time.perf_counter()
    for number, ref in enumerate(refs, 1):
        prompt = ref.prompt
        image = int(prompt.image_positions.numel())
        dense_rows = [prompt.num_tokens] * engine.text.num_layers
        dense_flops += prefill_flops(engine.config, dense_rows, image)
        dense_kv += kv_bytes(engine.config, dense_rows, engine.dtype.itemsize)
        with torch.inference_mode():
            record = None if naive else record_dense(engine, prompt, tuple(sorted({c.k for c in todo})))
            for group in _batches(list(results), batch_size, one_by_one=naive):
                settings = [c.settings(base) for c in group]
                begun = time.perf_counter()
                outcomes = ([run_naive(engine, settings[0], ref)] if naive else
                            run_candidates(engine, record, settings, ref.tokens))
                share = (time.perf_counter() - begun) / len(group)
                for candidate, outcome in zip(group, outcomes):
                    results[candidate].seconds += share
                    _accumulate(engine, results[candidate], ref, outcome, image)
        del record
        if on_prompt is not None:
            on_prompt(number, len(refs))
    seconds = time.perf_counter() - started
    for result in results.values():
        _finish(result, dense_flops, dense_kv)
    return list(results.values()), seconds


def _batches(todo: list[Candidate], size: int, one_by_one: bool) -> list[list[Candidate]]:
    if one_by_one:
        return [[c] for c in todo]
    groups = []
    for k in sorted({c.k for c in todo}):
        # Adaptive rules keep most; then the ratios, largest first.
        at_k = sorted((c for c in todo if c.k == k), key=lambda c: -(c.tokens.value if c.tokens.kind == "ratio" else 1))
        groups.extend(at_k[i : i + size] for i in range(0, len(at_k), size))
    return groups


def _accumulate(engine, result: CandidateResult, ref: Reference, outcome: Outcome, image: int) -> None:
    sums = result._sums
    target = torch.tensor(ref.tokens)
    matches = outcome.logits.argmax(dim=-1) == target
    dense_logp = F.log_softmax(ref.logits.double(), dim=-1)
    logp = F.log_softmax(outcome.logits.double(), dim=-1)
    sums["agree"] = sums.get("agree", 0) + int(matches.sum())
    sums["exact"] = sums.get("exact", 0) + int(bool(matches.all()))
    sums["kl"] = sums.get("kl", 0.0) + float((dense_logp.exp() * (dense_logp - logp)).sum())
    sums["flops"] = sums.get("flops", 0) + prefill_flops(engine.config, outcome.rows_per_layer, image)
    sums["kv"] = sums.get("kv", 0) + kv_bytes(engine.config, outcome.kv_entries, engine.dtype.itemsize)
    if image:
        sums["kept"] = sums.get("kept", 0) + outcome.kept_image_tokens
        sums["images"] = sums.get("images", 0) + 1
    result.positions += len(ref.tokens)
    result.prompts += 1


def _finish(result: CandidateResult, dense_flops: float, dense_kv: float) -> None:
    sums = result._sums
    result.top1_agreement = sums["agree"] / result.positions
    result.exact_agreement = sums["exact"] / result.prompts
    result.mean_kl = sums["kl"] / result.positions
    result.prefill_flops = sums["flops"] / result.prompts
    result.kv_bytes = sums["kv"] / result.prompts
    result.relative_prefill_flops = sums["flops"] / dense_flops
    result.relative_kv_bytes = sums["kv"] / dense_kv
    result.kept_image_tokens = sums.get("kept", 0) / max(sums.get("images", 0), 1)


def choose(results: list[CandidateResult], target: float) -> CandidateResult | None:
    """The cheapest candidate (prefill FLOPs, then KV bytes) meeting ``target``; None: keep every token."""
    eligible = [r for r in results if not r.candidate.reference and r.top1_agreement >= target]
    return min(eligible, key=lambda r: (r.prefill_flops, r.kv_bytes), default=None)
